"""The wheel: `python -m build --wheel --no-isolation` builds one that installs into a fresh
venv and passes a smoke test there; the import-time check names mismatched torch versions.

The fresh venv borrows torch from this environment through a .pth file (appended after
its own site-packages) instead of installing it again, which would take minutes; the
package itself comes only from the wheel, which the smoke test verifies.
"""
import os
import pathlib
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

# DESIGN.md §2: with N <= D, one SGD step with lr=1 and a tiny ridge puts every output on
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
    assert wheel.name.endswith("-cp39-abi3-linux_x86_64.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "consequential_ext/_C.abi3.so" in names
    assert "consequential_ext/distributed.py" in names


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


def test_this_build_matches_running_torch():
    assert torch.ops.consequential_ext.built_with_torch() == torch.__version__
    assert cx.ops.available_backends("ridge_solve", "cpu")[0] == "cpu"
