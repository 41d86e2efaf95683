import os
import random
import zlib

import pytest
import torch

# Triton kernels run through the interpreter on machines without a GPU (CI). Must be set
# before any module defining @triton.jit kernels is imported. bench/gpu_suite.py sets
# TRITON_INTERPRET=0 explicitly to run them natively.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Every test draws its random inputs from a seed fixed by CX_TEST_SEED (default 0) and its own
# node id: a run is reproducible, and `CX_TEST_SEED=1 ...`, `=2`, ... draws fresh inputs to
# check that no tolerance depends on a lucky draw.
def _test_seed() -> int:
    return int(os.environ.get("CX_TEST_SEED", "0"))


def pytest_report_header(config):
    return f"CX_TEST_SEED={_test_seed()}"


@pytest.fixture(autouse=True)
def _seed_random_inputs(request):
    seed = zlib.crc32(f"{_test_seed()}:{request.node.nodeid}".encode())
    torch.manual_seed(seed)
    random.seed(seed)
