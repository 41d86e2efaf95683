"""Builds consequential_ext._C: the CPU operators always, the CUDA ones when torch has CUDA.

Switches (as in pytorch_scatter / FlashAttention):
  FORCE_CUDA=1        build the CUDA sources even if torch reports no CUDA
  FORCE_ONLY_CPU=1    never build the CUDA sources
  CX_CUDA_ARCH_LIST   nvcc -gencode list, default "90a;80" (sm_90a + a portable PTX target)
  MAX_JOBS            parallel compile jobs (read by torch's BuildExtension / ninja)
  NVCC_THREADS        nvcc --threads
  DEBUG=1             -O0 -g
"""
import glob
import os
import re

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.getenv("DEBUG", "0") == "1"


def _version():
    with open(os.path.join(HERE, "consequential_ext", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _build_cuda():
    if os.getenv("FORCE_ONLY_CPU", "0") == "1":
        return False
    if os.getenv("FORCE_CUDA", "0") == "1":
        return True
    # Never decided by torch.cuda.is_available(): build machines often have no GPU.
    return torch.version.cuda is not None and CUDA_HOME is not None


def _gencode_flags():
    flags = []
    for arch in os.getenv("CX_CUDA_ARCH_LIST", "90a;80").split(";"):
        arch = arch.strip().replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    last = os.getenv("CX_CUDA_ARCH_LIST", "90a;80").split(";")[-1].strip().replace(".", "")
    flags.append(f"-gencode=arch=compute_{last},code=compute_{last}")  # PTX for newer GPUs
    return flags


def _extension():
    cuda = _build_cuda()
    sources = sorted(["csrc/ops.cpp"] + glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    extra = {"cxx": opt + ["-std=c++20"]}
    if torch._C.has_openmp:  # at::parallel_for in the CPU kernels is OpenMP, as in torch
        extra["cxx"].append("-fopenmp")
    macros = [("CX_TORCH_VERSION", f'"{torch.__version__}"')]
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + _gencode_flags()
        if os.getenv("NVCC_THREADS"):
            nvcc.append(f"--threads={os.getenv('NVCC_THREADS')}")
        extra["nvcc"] = nvcc
        macros.append(("CX_WITH_CUDA", None))
        return CUDAExtension("consequential_ext._C", sources, extra_compile_args=extra,
                             define_macros=macros, py_limited_api=True,
                             include_dirs=[os.path.join(HERE, "csrc")])
    return CppExtension("consequential_ext._C", sources, extra_compile_args=extra,
                        define_macros=macros, py_limited_api=True,
                        include_dirs=[os.path.join(HERE, "csrc")])


setup(
    version=_version(),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
