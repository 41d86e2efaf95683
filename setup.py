"""Builds consequential_ext._C: the CPU operators always, the CUDA ones when torch has CUDA
and a CUDA toolkit is found.

Switches (as in pytorch_scatter / FlashAttention):
  FORCE_CUDA=1        build the CUDA sources, or fail saying what is missing
  FORCE_ONLY_CPU=1    never build the CUDA sources
  CUDA_HOME           the toolkit (default: the one holding the nvcc on PATH, through any
                      wrapper script, else /usr/local/cuda)
  CX_CUDA_ARCH_LIST   compute capabilities to compile, default "90a;80" (see _gencode_flags);
                      TORCH_CUDA_ARCH_LIST (torch's spelling, "8.0;9.0a+PTX") when it is unset
  MAX_JOBS            parallel compile jobs (read by torch's BuildExtension / ninja)
  NVCC_THREADS        nvcc --threads
  DEBUG=1             -O0 -g (release builds carry no debug info)

The wheel requires the torch release it was built against: the binary loads under no other.
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "90a;80"
_RUNTIME_HEADER = os.path.join("include", "cuda_runtime_api.h")


class BuildConfigError(ValueError):
    """A switch or the environment cannot give the build asked for (reported, no traceback)."""


def _flag(name):
    value = os.getenv(name, "0")
    if value not in ("0", "1", ""):
        raise BuildConfigError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _count(name):
    """A positive integer switch, or None when unset."""
    value = os.getenv(name, "").strip()
    if value and not (value.isdigit() and int(value) > 0):
        raise BuildConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value) if value else None


def _version():
    with open(os.path.join(HERE, "consequential_ext", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _is_toolkit(home):
    return os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(home, _RUNTIME_HEADER))


def _nvcc_own_dir(nvcc):
    """The bin folder of the real nvcc behind ``nvcc`` (which may be a wrapper script)."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return match.group(1).strip() if match else None


def find_toolkit(environ=os.environ, which=shutil.which, defaults=("/usr/local/cuda",)):
    """(CUDA toolkit root, None) or (None, why none was found).

    torch guesses CUDA_HOME as the parent of the nvcc on PATH; when that nvcc is a wrapper
    script (/usr/local/bin/nvcc) the guess has no headers, so ask nvcc where it lives.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            home = environ[var]
            if _is_toolkit(home):
                return home, None
            return None, f"{var}={home} is not a CUDA toolkit (no bin/nvcc with {_RUNTIME_HEADER})"
    tried = []
    nvcc = which("nvcc")
    if nvcc:
        for bin_dir in (os.path.dirname(os.path.realpath(nvcc)), _nvcc_own_dir(nvcc)):
            if bin_dir:
                home = os.path.dirname(bin_dir)
                if _is_toolkit(home):
                    return home, None
                tried.append(home)
    for home in defaults:
        if _is_toolkit(home):
            return home, None
        tried.append(home)
    where = f"nvcc on PATH is {nvcc}" if nvcc else "no nvcc on PATH"
    if tried:
        where += f"; no bin/nvcc with {_RUNTIME_HEADER} in {', '.join(dict.fromkeys(tried))}"
    return None, f"no CUDA toolkit found ({where}): set CUDA_HOME"


def library_header_dirs():
    """Include folders of the CUDA library wheels torch depends on (nvidia/cu13/include,
    or nvidia/<library>/include for CUDA 12): cuBLAS/cuSPARSE/... headers a bare toolkit
    may lack. Searched after every other folder (-idirafter), so the toolkit's own
    headers win."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted({folder for root in nvidia.__path__
                   for folder in glob.glob(os.path.join(root, "*", "include"))})


_ARCH = re.compile(r"(\d+)\.?(\d)([af]?)(\+PTX)?")


def _gencode_flags(spec, source):
    """nvcc -gencode flags for ``spec``: compute capabilities such as "90a;80" or
    "8.0 9.0a+PTX" (separated by ';', ',' or spaces). Each is compiled to SASS. PTX, which
    the driver compiles for GPUs newer than the list, is embedded for the entries marked
    +PTX, or else for the lowest one: without its 'a'/'f' suffix, since arch-specific PTX
    (compute_90a) runs on that one architecture only."""
    archs, ptx = [], []
    for entry in filter(None, re.split(r"[;,\s]+", spec)):
        match = _ARCH.fullmatch(entry)
        if not match:
            raise BuildConfigError(f"{source}: {entry!r} is not a compute capability such as "
                                   f"'80', '8.6', '90a' or '8.0+PTX' (got {spec!r})")
        major, minor, suffix, plus_ptx = match.groups()
        arch = f"{int(major)}{minor}"
        archs.append(arch + suffix)
        if plus_ptx:
            if suffix:
                raise BuildConfigError(f"{source}: {entry!r}: PTX for compute_{arch}{suffix} "
                                       f"runs on that architecture only; write '{arch}+PTX'")
            ptx.append(arch)
    if not archs:
        raise BuildConfigError(f"{source}: no compute capability given (got {spec!r})")
    ptx = ptx or [min((re.sub("[af]$", "", a) for a in archs), key=int)]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in dict.fromkeys(archs)] + \
           [f"-gencode=arch=compute_{a},code=compute_{a}" for a in dict.fromkeys(ptx)]


def arch_list(environ=os.environ):
    """(spec, the variable it came from)."""
    for var in ("CX_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        if environ.get(var, "").strip():
            return environ[var], var
    return DEFAULT_ARCH_LIST, "the default arch list"


def cuda_toolkit_to_build():
    """The toolkit root when the CUDA sources are built, else None; BuildConfigError when
    FORCE_CUDA=1 cannot be honoured. Never decided by torch.cuda.is_available(): build
    machines often have no GPU."""
    force, only_cpu = _flag("FORCE_CUDA"), _flag("FORCE_ONLY_CPU")
    if force and only_cpu:
        raise BuildConfigError("FORCE_CUDA=1 and FORCE_ONLY_CPU=1 contradict each other")
    if only_cpu:
        return None
    if torch.version.cuda is None:
        if force:
            raise BuildConfigError(f"FORCE_CUDA=1, but torch {torch.__version__} is a build "
                                   f"without CUDA: install a CUDA build of torch")
        return None
    home, why = find_toolkit()
    if home is None:
        if force:
            raise BuildConfigError(f"FORCE_CUDA=1, but {why}")
        if os.getenv("CUDA_HOME") or os.getenv("CUDA_PATH"):  # asked for, so not ignored
            raise BuildConfigError(why)
        print(f"consequential_ext: building the CPU operators only: {why}", file=sys.stderr)
    return home


def _extension():
    cuda_home = cuda_toolkit_to_build()
    if cuda_home:  # torch.utils.cpp_extension reads it once, when imported
        os.environ["CUDA_HOME"] = cuda_home
        if "torch.utils.cpp_extension" in sys.modules:
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    _count("MAX_JOBS")  # read by torch's BuildExtension, which would fail with a traceback
    nvcc_threads = _count("NVCC_THREADS")
    # -g0 overrides the -g of Python's own CFLAGS.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    extra = {"cxx": opt + ["-std=c++20"]}
    if torch._C.has_openmp:  # at::parallel_for in the CPU kernels is OpenMP, as in torch
        extra["cxx"].append("-fopenmp")
    kwargs = dict(define_macros=[("CX_TORCH_VERSION", f'"{torch.__version__}"')],
                  py_limited_api=True, include_dirs=[os.path.join(HERE, "csrc")])
    # The libstdc++ torch loads, shared: a compiler that links its own statically (the lent
    # GPU machine's g++ did: `_C` listed no libstdc++) puts a second copy in the process, and
    # a check's message then crashed at its first number (locale facets of one copy, facet
    # ids of the other; -static-libstdc++ here cuts the message there instead).
    if sys.platform.startswith("linux"):
        kwargs["extra_link_args"] = ["-l:libstdc++.so.6"]
    sources = sorted(["csrc/ops.cpp"] + glob.glob("csrc/cpu/*.cpp"))
    if not cuda_home:
        return CppExtension("consequential_ext._C", sources, extra_compile_args=extra, **kwargs)

    spec, source = arch_list()
    gencode = _gencode_flags(spec, source)
    headers = library_header_dirs()
    for folder in headers:
        extra["cxx"] += ["-idirafter", folder]
    nvcc = (opt if debug else ["-O3"]) + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    nvcc += gencode
    if nvcc_threads:
        nvcc.append(f"--threads={nvcc_threads}")
    extra["nvcc"] = nvcc
    kwargs["define_macros"].append(("CX_WITH_CUDA", None))
    print(f"consequential_ext: CUDA build with the toolkit {cuda_home} for torch "
          f"{torch.__version__}; {source}: {' '.join(g.rsplit('=', 1)[1] for g in gencode)}; "
          f"library headers: {', '.join(headers) or 'none beside the toolkit'}", file=sys.stderr)
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return CUDAExtension("consequential_ext._C", sources, extra_compile_args=extra, **kwargs)


def platform_tag():
    """manylinux_2_X for the glibc 2.X of the build machine, the newest the binary can need
    (not auditwheel-repaired: the libraries _C links come with the torch wheel it pins)."""
    libc, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or libc != "glibc":
        return None  # setuptools' default tag
    major, minor = version.split(".")[:2]
    return f"manylinux_{major}_{minor}_{platform.machine()}"


def main():
    try:
        extension = _extension()
    except BuildConfigError as error:
        sys.exit(f"consequential_ext setup.py: {error}")
    from torch.utils.cpp_extension import BuildExtension
    # Py_LIMITED_API is 3.10 (torch's cpp_extension sets it), as requires-python.
    wheel_options = {"py_limited_api": "cp310"}
    tag = platform_tag()
    if tag:
        wheel_options["plat_name"] = tag
    setup(
        version=_version(),
        # The binary loads only under the torch release it was compiled against (any local
        # build of it: +cpu, +cu130).
        install_requires=[f"torch=={torch.__version__.split('+', 1)[0]}"],
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": wheel_options},
    )


if __name__ == "__main__":  # as under pip / python -m build; tests import the helpers
    main()
