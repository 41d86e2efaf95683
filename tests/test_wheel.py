"""The wheel: `python -m build --wheel --no-isolation` builds one that installs into a fresh
venv and passes a smoke test there; the import-time check names mismatched torch versions;
setup.py's CUDA switches are validated (the CUDA wheel itself: `make cuda-wheel`).

The fresh venv borrows torch from this environment through a .pth file (appended after
its own site-packages) instead of installing it again, which would take minutes; the
package itself comes only from the wheel, which the smoke test verifies.
"""
import ast
import os
import pathlib
import platform
import re
import runpy
import subprocess
import sys
import sysconfig

import pytest
import torch

import consequential_ext as cx
from consequential_ext._build_check import check_versions

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = r"""
import sys
import torch
import consequential_ext as cx

venv = sys.argv[1]
assert cx.__file__.startswith(venv), f"imported from {cx.__file__}, not the wheel in {venv}"
assert "cpu" in cx.ops.available_backends("ridge_solve", "cpu"), "compiled ops missing"
assert torch.ops.consequential_ext.built_with_torch() == torch.__version__

# docs/design.md §2: with N <= D, one SGD step with lr=1 and a tiny ridge puts every output on
# its target.
torch.manual_seed(0)
layer = cx.CLinear(12, 3, ridge=1e-9, dtype=torch.float64)
x, t = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
(0.5 * (layer(x) - t).square().sum(-1).mean()).backward()
with torch.no_grad():
    for p in layer.parameters():
        p -= p.grad
assert (layer(x) - t).abs().max() < 1e-6, (layer(x) - t).abs().max()
conv = cx.consequentialize(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3)))
conv(torch.randn(4, 2, 6, 6)).sum().backward()
assert torch.isfinite(conv[0].weight.grad).all()
print("smoke ok", cx.__version__)
"""


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, \
        f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built in the source tree, so it reuses the objects of the in-place build (ninja skips
    what is up to date); the wheel goes to a temporary directory."""
    outdir = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir),
          str(ROOT)], env=env, cwd=ROOT)
    wheels = list(outdir.glob("consequential_ext-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_installs_into_fresh_venv_and_passes_smoke_test(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                ).stdout.strip()
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    pathlib.Path(site, "_borrowed_torch.pth").write_text(
        "\n".join(dict.fromkeys([torch_site, sysconfig.get_paths()["purelib"]])) + "\n")
    # --no-index: torch (the one dependency) must already be satisfied, never downloaded.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "-q",
          "--disable-pip-version-check", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run([str(python), "-c", SMOKE, str(venv)], cwd=tmp_path, env=env).stdout
    assert "smoke ok" in out


def test_wheel_is_abi3_and_ships_the_extension(wheel):
    import zipfile
    glibc = platform.libc_ver()[1].split(".")
    # Py_LIMITED_API is 3.10; the build machine's glibc is the newest the binary can need.
    assert wheel.name.endswith(f"-cp310-abi3-manylinux_{glibc[0]}_{glibc[1]}_x86_64.whl"), \
        wheel.name
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "consequential_ext/_C.abi3.so" in names
    assert "consequential_ext/distributed.py" in names
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    release = torch.__version__.split("+")[0]
    requires = re.findall(r"^Requires-Dist: (torch.*)$", metadata, re.MULTILINE)
    assert requires == [f"torch=={release}"]


def test_version_check_names_both_versions():
    with pytest.raises(ImportError, match=r"torch 2\.13\.0\+cpu.*torch 2\.12\.1"):
        check_versions("2.13.0+cpu", "2.12.1")
    check_versions("2.13.0+cpu", "2.13.0+cu128")  # same release: same CPU ABI


def test_import_fails_loudly_under_another_torch():
    code = "import torch; torch.__version__ = '2.99.0'; import consequential_ext"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert f"built against torch {torch.__version__}" in result.stderr
    assert "torch 2.99.0 is running" in result.stderr


def test_import_without_compiled_extension_uses_the_reference(tmp_path):
    # docs/scale.md: without any compiled _C the pure-PyTorch reference ops serve. A copy of
    # the package without _C must import and match a float64 reference (explicit solve).
    import shutil
    shutil.copytree(ROOT / "consequential_ext", tmp_path / "consequential_ext",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    code = """
import torch, consequential_ext as cx
assert cx.ops.available_backends("ridge_solve", "cpu") == ["reference"]
torch.manual_seed(0)
layer = cx.CLinear(3, 2, ridge=0.1, dtype=torch.float64)
x = torch.randn(7, 3, dtype=torch.float64)
layer(x).square().sum().backward()
X = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1).T
G = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
dz = 2 * layer(x).detach()
A = X @ X.T / 7 + 0.1 * torch.eye(4, dtype=torch.float64)
expect = torch.linalg.solve(A, (dz.T @ X.T).T).T   # G_plain (A + lambda I)^-1, A symmetric
assert torch.allclose(G, expect, atol=1e-10), (G - expect).abs().max()
print("reference ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference ok" in result.stdout


def test_this_build_matches_running_torch():
    assert torch.ops.consequential_ext.built_with_torch() == torch.__version__
    assert cx.ops.available_backends("ridge_solve", "cpu")[0] == "cpu"


# ---- setup.py's CUDA switches (problem 3 of the CUDA-wheel issue), without building ----

SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="cx_setup")  # main() not run


@pytest.mark.parametrize("spec, cubins, ptx", [
    ("90a;80", ["sm_90a", "sm_80"], ["80"]),          # the default
    ("90a", ["sm_90a"], ["90"]),                       # portable PTX, never compute_90a
    ("90a;", ["sm_90a"], ["90"]),                      # empty entries ignored
    (" 8.6 , 9.0a ;100f ", ["sm_86", "sm_90a", "sm_100f"], ["86"]),
    ("8.0;9.0+PTX;120", ["sm_80", "sm_90", "sm_120"], ["90"]),  # torch's +PTX marks
])
def test_gencode_flags(spec, cubins, ptx):
    flags = SETUP["_gencode_flags"](spec, "CX_CUDA_ARCH_LIST")
    sass = [f"-gencode=arch=compute_{c[3:]},code={c}" for c in cubins]
    assert flags == sass + [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx]


@pytest.mark.parametrize("spec, message", [
    ("sm_90", r"'sm_90' is not a compute capability"),
    ("9", r"'9' is not a compute capability"),
    ("Ampere", r"'Ampere' is not"),
    (";", r"no compute capability given"),
    ("90a+PTX", r"runs on that architecture only; write '90\+PTX'"),
])
def test_gencode_flags_reject_bad_entries(spec, message):
    with pytest.raises(SETUP["BuildConfigError"], match=rf"TORCH_CUDA_ARCH_LIST: .*{message}"):
        SETUP["_gencode_flags"](spec, "TORCH_CUDA_ARCH_LIST")


def test_arch_list_prefers_ours_then_torchs_then_the_default():
    arch_list = SETUP["arch_list"]
    both = {"CX_CUDA_ARCH_LIST": "80", "TORCH_CUDA_ARCH_LIST": "8.6"}
    assert arch_list(both) == ("80", "CX_CUDA_ARCH_LIST")
    assert arch_list({"CX_CUDA_ARCH_LIST": " ", "TORCH_CUDA_ARCH_LIST": "8.6"}) == \
        ("8.6", "TORCH_CUDA_ARCH_LIST")
    assert arch_list({}) == ("90a;80", "the default arch list")


def _fake_toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("")
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return str(root)


def test_find_toolkit_behind_a_wrapper_script(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "wrapper" / "nvcc"  # like /usr/local/bin/nvcc: its parent has no include/
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho '#$ _HERE_={home}/bin' >&2\n")
    wrapper.chmod(0o755)
    found = SETUP["find_toolkit"]({}, lambda name: str(wrapper), defaults=())
    assert found == (home, None)


def test_find_toolkit_says_what_is_missing(tmp_path):
    find = SETUP["find_toolkit"]
    home = _fake_toolkit(tmp_path / "cuda")
    assert find({"CUDA_HOME": home}, lambda name: None, defaults=()) == (home, None)
    home_without_headers = tmp_path / "bare"
    (home_without_headers / "bin").mkdir(parents=True)
    assert find({"CUDA_HOME": str(home_without_headers)}, lambda name: None, defaults=()) == \
        (None, f"CUDA_HOME={home_without_headers} is not a CUDA toolkit (no bin/nvcc with "
               f"include/cuda_runtime_api.h)")
    found, why = find({}, lambda name: None, defaults=(str(tmp_path / "nowhere"),))
    assert found is None
    assert "no nvcc on PATH" in why and "nowhere" in why and "set CUDA_HOME" in why


@pytest.mark.parametrize("env, message", [
    ({"FORCE_CUDA": "yes"}, r"FORCE_CUDA must be 0 or 1, got 'yes'"),
    ({"FORCE_CUDA": "1", "FORCE_ONLY_CPU": "1"}, r"FORCE_CUDA=1 and FORCE_ONLY_CPU=1 contradict"),
    ({"MAX_JOBS": "two"}, r"MAX_JOBS must be a positive integer, got 'two'"),
    ({"FORCE_ONLY_CPU": "1", "NVCC_THREADS": "0"}, r"NVCC_THREADS must be a positive integer"),
])
def test_setup_rejects_bad_switches(env, message, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SETUP["BuildConfigError"], match=message):
        SETUP["_extension"]()


def test_setup_says_why_it_cannot_build_cuda():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    result = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, FORCE_CUDA="1"))
    assert result.returncode == 1
    assert f"consequential_ext setup.py: FORCE_CUDA=1, but torch {torch.__version__} is a " \
           f"build without CUDA: install a CUDA build of torch" in result.stderr, result.stderr


def test_triton_backend_needs_no_numpy():
    """A minimal install (torch + triton) has no numpy; the Triton kernels import without it
    unless TRITON_INTERPRET=1 (the interpreter needs numpy)."""
    code = ("import sys; sys.modules['numpy'] = None\n"  # any `import numpy` now fails
            "import consequential_ext as cx\n"
            "ops = ('im2col_gram', 'ridge_solve')\n"
            "print([cx.ops.available_backends(op, 'cuda') for op in ops])")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = _run([sys.executable, "-c", code], cwd=ROOT, env=env)
    for backends in ast.literal_eval(result.stdout):
        assert backends[-2:] == ["triton", "reference"], backends
