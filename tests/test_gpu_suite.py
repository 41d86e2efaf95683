"""bench/gpu_suite.py's non-GPU parts — arguments, stage order, budget, output files, table —
with the GPU stages stubbed, so the script works the first time it meets a GPU."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_suite.py"


@pytest.fixture
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timing_rows():
    return [
        {"op": "im2col_gram", "shape": "resnet20.stage1", "dtype": "float32", "provider": "cuda",
         "D": 145, "ms": 0.125, "max_rel_err": 3e-7},
        {"op": "im2col_gram", "shape": "resnet20.stage1", "dtype": "float32", "provider": "reference",
         "D": 145, "ms": 1.5, "max_rel_err": 1e-7},
        {"op": "im2col_gram", "shape": "resnet20.stage1", "dtype": "float32", "provider": "triton",
         "D": 145, "error": "RuntimeError: boom"},
        {"op": "ridge_solve", "shape": "vgg.conv3", "dtype": "float32", "provider": "cuda",
         "D": 2305, "ms": 4.25, "max_rel_err": 2e-5},
    ]


@pytest.fixture
def stubbed(suite, monkeypatch):
    """Replace every GPU-touching stage; record the order they ran in."""
    calls = []
    monkeypatch.setattr(suite, "environment_info", lambda: {"device": "FakeGPU H0", "torch": "x"})

    def build(out_dir, budget):
        calls.append("build")
        return {"rc": 0, "seconds": 1.0}

    def tests(out_dir, budget, which):
        calls.append(f"tests_{which}")
        return {"rc": 0, "summary": f"3 passed ({which})"}

    def timings(out_dir, budget, quick):
        calls.append(f"timings(quick={quick})")
        return {"rows": _timing_rows(), "skipped": ["ridge_solve many-small"],
                "matmul_ceiling": {"bf16_tflops": 700.0}}

    def stage(name):
        def run(out_dir, budget, *quick):
            calls.append(name)
            return {"rc": 0, "seconds": 1.0}
        return run

    monkeypatch.setattr(suite, "build_extension", build)
    monkeypatch.setattr(suite, "run_tests", tests)
    monkeypatch.setattr(suite, "time_everything", timings)
    monkeypatch.setattr(suite, "run_harness", stage("harness"))
    monkeypatch.setattr(suite, "run_sanitizer",
                        lambda out_dir, budget, tool: stage(tool)(out_dir, budget))
    monkeypatch.setattr(suite, "time_triton_suite", stage("triton_kernels"))
    return calls


def test_full_run_writes_json_and_table(suite, stubbed, tmp_path, capsys):
    out = tmp_path / "out"
    assert suite.main(["--out", str(out), "--quick"], environ={}) == 0
    assert stubbed == ["build", "tests_cuda", "tests_triton", "timings(quick=True)", "harness",
                       "memcheck", "racecheck", "triton_kernels", "tests_all"]
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["quick"] is True and results["build"]["rc"] == 0
    assert results["timings"]["rows"][0]["provider"] == "cuda"
    table = (out / "results.md").read_text()
    assert "FakeGPU H0" in table and "bf16_tflops 700.0" in table
    header = next(line for line in table.splitlines() if line.startswith("| op |"))
    assert header.split("|")[5:8] == [" cuda ", " triton ", " reference "]   # provider order
    gram_row = next(line for line in table.splitlines() if "| im2col_gram | resnet20.stage1" in line)
    assert "0.125" in gram_row and "1.500" in gram_row and "error" in gram_row and "3.0e-07" in gram_row
    assert "skipped (time budget): ridge_solve many-small" in table
    assert "results.md" in capsys.readouterr().out


def test_skip_flags_skip_build_and_tests(suite, stubbed, tmp_path):
    assert suite.main(["--out", str(tmp_path), "--skip-build", "--skip-tests"], environ={}) == 0
    assert stubbed == ["timings(quick=False)", "harness", "triton_kernels"]
    assert json.loads((tmp_path / "results.json").read_text())["build"] == {"skipped": "--skip-build"}


def test_failed_build_stops_later_stages_and_fails(suite, stubbed, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "build_extension", lambda out_dir, budget: {"rc": 1, "tail": "nvcc: error"})
    assert suite.main(["--out", str(tmp_path)], environ={}) == 1
    assert stubbed == []
    assert "rc=1" in (tmp_path / "results.md").read_text()


def test_crashing_stage_is_recorded_and_the_rest_still_runs(suite, stubbed, tmp_path, monkeypatch):
    def boom(out_dir, budget, quick):
        raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setattr(suite, "time_everything", boom)
    assert suite.main(["--out", str(tmp_path)], environ={}) == 1
    assert stubbed == ["build", "tests_cuda", "tests_triton", "harness", "memcheck",
                       "racecheck", "triton_kernels", "tests_all"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "illegal memory access" in results["timings"]["error"]
    assert "illegal memory access" in (tmp_path / "results.md").read_text()


def test_out_dir_from_argument_then_environment(suite):
    assert suite.resolve_out_dir("a", {"OUT": "b"}) == Path("a")
    assert suite.resolve_out_dir(None, {"OUT": "b"}) == Path("b")
    assert suite.resolve_out_dir(None, {}) == ROOT / "results" / "gpu_suite"


def test_out_from_environment_is_used_by_main(suite, stubbed, tmp_path):
    assert suite.main(["--skip-build", "--skip-tests"], environ={"OUT": str(tmp_path)}) == 0
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()


def test_budget_argument_is_validated(suite):
    assert suite.parse_args([]).budget_s == suite.DEFAULT_BUDGET_S
    with pytest.raises(SystemExit):
        suite.parse_args(["--budget-s", "5"])


def test_budget_counts_down_on_its_clock(suite):
    now = [100.0]
    budget = suite.Budget(60.0, clock=lambda: now[0])
    assert budget.allows(40)
    now[0] += 10
    assert budget.remaining() == 50.0 and not budget.allows(40)   # 15 s kept in reserve


def test_the_whole_tests_stage_is_skipped_when_out_of_budget(suite, stubbed, tmp_path, monkeypatch):
    monkeypatch.setattr(suite.Budget, "allows", lambda self, seconds: False)
    assert suite.main(["--out", str(tmp_path)], environ={}) == 0
    assert stubbed == ["build", "tests_cuda", "timings(quick=False)"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tests_all"]["skipped"] and results["tests_triton"]["skipped"]


def test_quick_shapes_are_a_subset_with_the_vgg_layer(suite):
    quick = suite.selected_shapes(True)
    assert 0 < len(quick) < len(suite.selected_shapes(False))
    assert {s[0] for s in quick} == set(suite.QUICK_SHAPES)


def test_run_logged_reports_rc_timeout_and_log(suite, tmp_path):
    ok = suite.run_logged([sys.executable, "-c", "print('hello'); raise SystemExit(3)"],
                          tmp_path / "a.log", timeout=30)
    assert ok["rc"] == 3 and "hello" in ok["tail"] and (tmp_path / "a.log").exists()
    slow = suite.run_logged([sys.executable, "-c", "import time; time.sleep(30)"],
                            tmp_path / "b.log", timeout=1)
    assert slow["rc"] == 124


def test_script_runs_from_the_repository_root():
    help_text = subprocess.run([sys.executable, "bench/gpu_suite.py", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--out", "--quick", "--skip-build", "--skip-tests", "--budget-s"):
        assert flag in help_text


def test_results_hold_no_machine_paths(suite, stubbed, tmp_path):
    """Committed as they are: no --out (a scratch folder of the GPU machine) and log tails
    with paths relative to the checkout."""
    assert suite.main(["--out", str(tmp_path), "--skip-build", "--skip-tests"], environ={}) == 0
    assert "out" not in json.loads((tmp_path / "results.json").read_text())["args"]
    logged = suite.run_logged([sys.executable, "-c", f"print({str(ROOT / 'csrc' / 'ops.cpp')!r})"],
                              tmp_path / "log", timeout=60)
    assert logged["rc"] == 0 and "csrc/ops.cpp" in logged["tail"] and str(ROOT) not in logged["tail"]


def test_memcheck_and_harness_commands(suite, monkeypatch, tmp_path):
    monkeypatch.setattr(suite.shutil, "which", lambda name: None)
    assert "no compute-sanitizer" in suite.run_sanitizer(tmp_path, suite.Budget(600),
                                                         "memcheck")["skipped"]
    ran = []
    monkeypatch.setattr(suite, "run_logged",
                        lambda cmd, log, timeout, env=None: ran.append((cmd, log.name, timeout))
                        or {"rc": 0, "tail": "== ERROR SUMMARY: 0 errors\n"})
    monkeypatch.setattr(suite.shutil, "which", lambda name: "/usr/bin/" + name)
    assert suite.run_sanitizer(tmp_path, suite.Budget(600),
                               "memcheck")["summary"] == "ERROR SUMMARY: 0 errors"
    suite.run_harness(tmp_path, suite.Budget(600))
    (memcheck, log, timeout), (harness, hlog, htimeout) = ran
    assert memcheck[:3] == ["/usr/bin/compute-sanitizer", "--tool", "memcheck"]
    assert memcheck[-2:] == ["-k", suite.SANITIZED_TESTS["memcheck"]] and log == "memcheck.log" \
        and timeout == 120
    assert harness[1:] == ["-m", "bench", "--only", "layer_step,real_models", "--device", "cuda",
                           "--out", str(tmp_path / "bench")] and htimeout == 180


def test_gram_callables_agree_with_the_reference(suite, monkeypatch):
    """The providers the suite times, Triton's exact-float32 one included, on a CPU tensor
    (Triton interpreted, as conftest sets): each returns the same Gram."""
    import consequential_ext as cx
    from consequential_ext.ops import _backends, reference
    monkeypatch.setattr(cx.ops, "available_backends", lambda op, device: ["triton", "reference"])
    monkeypatch.setattr(_backends, "available_backends", lambda op, device: ["triton", "reference"])
    shape = ("odd", 2, 3, 4, 7, 6, 3, 2, 1)
    x = torch.randn(2, 3, 7, 6)
    calls = suite._gram_callables(x, shape)
    assert list(calls) == ["triton", "triton.ieee", "reference", "cudnn.wgrad"]
    want = reference.im2col_gram(x.double(), (3, 3), (2, 2), (1, 1), (1, 1), 1, True)[0]
    for name in ("triton", "triton.ieee", "reference"):
        fn, is_gram = calls[name]
        assert is_gram and torch.allclose(fn().double(), want, rtol=1e-5, atol=1e-5 * want.abs().max())
    assert calls["cudnn.wgrad"][0]().shape == (4, 3, 3, 3)
