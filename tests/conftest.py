import os

# Triton kernels run through the interpreter on machines without a GPU (CI). Must be set
# before any module defining @triton.jit kernels is imported. bench/gpu_suite.py sets
# TRITON_INTERPRET=0 explicitly to run them natively.
os.environ.setdefault("TRITON_INTERPRET", "1")
