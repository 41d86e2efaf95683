"""The benchmark harness's own logic: CLI parsing, report writer, metric math, data
loaders, training-loop bookkeeping, and one tiny section end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import cli, data, metrics, protocol, report, targets, timing, train


# --- CLI -------------------------------------------------------------------------------

def test_cli_defaults_and_output_folder():
    args = cli.parse_args(["--quick"])
    assert args.quick and args.only == list(cli.SECTIONS)
    assert str(args.out) == "results/quick"
    assert str(cli.parse_args([]).out) == "results/full"


def test_cli_only_keeps_report_order_and_drops_duplicates():
    args = cli.parse_args(["--only", "lenet,toys,toys", "--seeds", "3", "--out", "x"])
    assert args.only == ["toys", "lenet"] and args.seeds == 3 and str(args.out) == "x"


@pytest.mark.parametrize("argv, named", [(["--only", "toys,nope"], "nope"), (["--only", ""], "--only"),
                                         (["--seeds", "0"], "--seeds"),
                                         (["--device", "tpu"], "--device"),
                                         (["--device", "meta"], "--device")])
def test_cli_rejects_bad_values(argv, named, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert named in capsys.readouterr().err


def test_cli_out_that_is_a_file_or_unwritable_is_named(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        assert cli.main(["--only", "toys", "--out", str(out)]) == 2
        assert "argument --out" in capsys.readouterr().err


def test_merge_sections_prefers_this_run_and_keeps_report_order():
    old = [{"name": "lenet", "v": 1}, {"name": "toys", "v": 1}]
    new = [{"name": "toys", "v": 2}, {"name": "kernels", "v": 2}]
    merged = cli.merge_sections(old, new)
    assert [(s["name"], s["v"]) for s in merged] == [("kernels", 2), ("toys", 2), ("lenet", 1)]


# --- metric math -----------------------------------------------------------------------

def test_summarize_matches_numpy_quantiles():
    rng = np.random.default_rng(0)
    samples = rng.exponential(size=11)
    st = timing.summarize(samples)
    assert st.median == pytest.approx(np.median(samples))
    assert st.q25 == pytest.approx(np.quantile(samples, 0.25))
    assert st.iqr == pytest.approx(np.quantile(samples, 0.75) - np.quantile(samples, 0.25))
    assert st.n == 11


def test_gram_flops_is_a_hand_count():
    # 1 sample, 1 channel, 3×3 image, 2×2 kernel, no padding: 4 patches of D = 4 values.
    # Each of the D² = 16 gram entries sums 4 products: 64 multiply-adds = 128 flops.
    assert timing.gram_flops(1, 1, 3, 3, 2) == 128
    # with a bias row D = 5: 25 entries × 4 patches × 2
    assert timing.gram_flops(1, 1, 3, 3, 2, bias=True) == 200
    # 3×3 kernel, pad 1 keeps 4×4 → 16 patches per sample; D = 2·9 = 18
    assert timing.gram_flops(2, 2, 4, 4, 3, 1, 1) == 2 * (2 * 16) * 18 * 18


def test_gram_flops_counts_the_reference_product():
    # The reference builds the gram as cols @ colsᵀ with cols (D, P): 2·D·P·D flops.
    x = torch.randn(3, 2, 5, 6)
    cols = torch.nn.functional.unfold(x, 3, padding=1, stride=2)
    d, p = cols.shape[1], cols.shape[0] * cols.shape[2]
    assert timing.gram_flops(3, 2, 5, 6, 3, stride=2, pad=1) == 2 * d * p * d


def test_solve_flops_and_gflops():
    assert timing.solve_flops(6, 2) == 6 ** 3 // 3 + 2 * 2 * 36
    assert timing.solve_flops(6, 2, batch=3) == 3 * timing.solve_flops(6, 2)
    assert timing.gflops(2e9, 0.5) == pytest.approx(4.0)


def test_interleaved_runs_every_candidate_in_rotated_order():
    calls = []
    cpu, wall = timing.interleaved({"a": lambda: calls.append("a"),
                                    "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    for times in (cpu, wall):
        assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
        assert all(t >= 0 for ts in times.values() for t in ts)


def test_calls_per_sample():
    assert timing.calls_per_sample(0.01, 0.0) == 1
    assert timing.calls_per_sample(0.01, 0.05) == 5
    assert timing.calls_per_sample(0.011, 0.05) == 5
    assert timing.calls_per_sample(0.2, 0.05) == 1
    assert timing.calls_per_sample(0.0, 0.05) == timing.MAX_CALLS_PER_SAMPLE


def test_interleaved_samples_several_calls_each(monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "calls_per_sample",
                        lambda wall_s, min_s: 3 if min_s > 0 else 1)
    cpu, wall = timing.interleaved({"a": lambda: calls.append("a"),
                                    "b": lambda: calls.append("b")}, repeats=2, warmup=1,
                                   min_sample_s=0.05)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert {k: len(v) for k, v in cpu.items()} == {"a": 2, "b": 2}


def test_curve_metrics():
    assert metrics.first_reach([0, 10, 20], [3.0, 1.0, 0.5], 1.0) == 10
    assert metrics.first_reach([0, 10], [3.0, float("nan")], 1.0) is None
    assert metrics.straightness([[0, 0], [1, 1], [2, 2]]) == pytest.approx(1.0)
    # there and back: displacement 0
    assert metrics.straightness([[0, 0], [1, 0], [0, 0]]) == pytest.approx(0.0)
    # an L-shaped path: |(1,1)| / 2
    assert metrics.straightness([[0, 0], [1, 0], [1, 1]]) == pytest.approx(math.sqrt(2) / 2)
    mean, std = metrics.mean_std([1.0, 3.0, float("nan")])
    assert (mean, std) == (2.0, pytest.approx(math.sqrt(2)))
    assert metrics.fmt_mean_std([float("nan")]) == "diverged"
    m, lo, hi = metrics.seed_band([[1, 2], [3, float("nan")]])
    assert list(m) == [2, 2] and list(lo) == [1, 2] and list(hi) == [3, 2]


# --- report writer ---------------------------------------------------------------------

def test_markdown_table_renders_rows():
    table = report.markdown_table(["name", "ms", "ok"],
                                  [{"name": "a|b", "ms": 1.23456, "ok": True}, {"name": "c"}])
    assert table.splitlines() == ["| name | ms | ok |", "|---|---|---|",
                                  "| a\\|b | 1.235 | yes |", "| c | — | — |"]


def test_write_all_writes_report_csv_and_strict_json(tmp_path):
    sections = [{"name": "demo", "title": "Demo", "claim": "the claim",
                 "verdicts": ["it holds"], "notes": ["fallback used"],
                 "tables": [{"title": "Times (ms)", "columns": ["k", "v"],
                             "rows": [{"k": "x", "v": float("nan")}, {"k": "y", "v": 2.0}]}],
                 "plots": [], "config": {"iters": 3}, "seconds": 1.0}]
    path = report.write_all(tmp_path, {"title": "T", "command": "python -m bench"}, sections)
    text = path.read_text()
    for piece in ("# T", "`python -m bench`", "## 1. Demo", "the claim", "* it holds",
                  "> Note: fallback used", "| x | — |"):
        assert piece in text
    assert (tmp_path / "demo__times_ms.csv").read_text().splitlines() == ["k,v", "x,", "y,2.0"]
    loaded = json.loads((tmp_path / "results.json").read_text())   # strict: NaN → null
    assert loaded["sections"][0]["tables"][0]["rows"][0]["v"] is None


def test_a_new_run_leaves_no_files_of_an_earlier_one(tmp_path, monkeypatch):
    import bench.toys
    assert cli.main(["--only", "toys", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("toys__*.csv")) and list((tmp_path / "plots").glob("*.png"))
    (tmp_path / "notes.csv").write_text("mine")          # not the harness's: kept
    monkeypatch.setattr(bench.toys, "run", lambda ctx: 1 / 0)
    assert cli.main(["--only", "toys", "--out", str(tmp_path)]) == 1
    assert not list(tmp_path.glob("toys__*.csv")) and not list((tmp_path / "plots").glob("*"))
    assert (tmp_path / "notes.csv").exists()


# --- data ------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", data.SCALINGS)
def test_digits_scaling_and_shapes(scaling):
    split = data.load("digits", scaling)
    assert split.x_train.shape[1] == 64 and split.x_train.dtype == torch.float32
    assert len(split.y_train) + len(split.y_test) == 1797 and split.num_classes == 10
    x = split.x_train
    if scaling == "unit":
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    else:
        varying = x.std(0) > 0
        assert torch.allclose(x.mean(0), torch.zeros(64), atol=1e-5)
        assert torch.allclose(x.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())),
                              atol=1e-4)


def test_scale_uses_training_statistics_only():
    train_x, test_x = np.array([[0.0], [2.0]]), np.array([[4.0]])
    tr, te = data.scale(train_x, test_x, "unit")
    assert tr.ravel().tolist() == [0.0, 1.0] and te.ravel().tolist() == [2.0]
    tr, te = data.scale(train_x, test_x, "standard")
    assert tr.ravel().tolist() == [-1.0, 1.0] and te.ravel().tolist() == [3.0]


def test_holdout_is_disjoint_and_covers_the_training_part():
    n = 50   # features hold each sample's index, so rows identify samples
    split = data.Split(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n),
                       torch.zeros(3, 1), torch.zeros(3))
    tune = data.holdout(split, 0.2, seed=0)
    fit, val = set(tune.x_train.ravel().tolist()), set(tune.x_test.ravel().tolist())
    assert len(val) == 10 and not (fit & val) and fit | val == set(range(n))
    assert torch.equal(data.holdout(split, 0.2, seed=0).x_test, tune.x_test)   # seeded


def test_digits_as_images():
    split = data.as_images(data.load("digits", "unit"), side=32, low=-0.5, high=0.5)
    assert split.x_train.shape[1:] == (1, 32, 32)
    assert float(split.x_train.min()) >= -0.5 - 1e-6 and float(split.x_train.max()) <= 0.5 + 1e-6
    small = data.as_images(data.load("digits", "unit"))
    assert torch.equal(small.x_train[0, 0], data.load("digits", "unit").x_train[0].reshape(8, 8))


# --- training loop ---------------------------------------------------------------------

def test_batches_cover_each_epoch_once():
    stream = train.batches(10, 3, seed=0)
    epoch = torch.cat([next(stream) for _ in range(3)])   # 3 full batches, 1 sample dropped
    assert len(set(epoch.tolist())) == 9


def test_train_records_curve_and_pads_a_diverged_run():
    torch.manual_seed(0)
    split = data.Split(torch.randn(40, 4), torch.randint(0, 3, (40,)), torch.randn(8, 4),
                       torch.randint(0, 3, (8,)))
    model = torch.nn.Linear(4, 3)
    curve = train.train(model, torch.optim.SGD(model.parameters(), lr=0.1), split, iters=10,
                        batch=8, eval_every=4, seed=0)
    assert curve["iters"] == [0, 4, 8, 10] and not curve["diverged"]
    assert curve["train_loss"][-1] < curve["train_loss"][0]
    model = torch.nn.Linear(4, 3)
    curve = train.train(model, torch.optim.SGD(model.parameters(), lr=float("inf")), split,
                        iters=10, batch=8, eval_every=4, seed=0)
    assert curve["diverged"] and curve["iters"] == [0, 4, 8, 10]
    assert math.isnan(curve["train_loss"][-1]) and len(curve["cpu_seconds"]) == 4
    assert math.isnan(curve["wall_seconds"][-1]) and curve["cpu_seconds"][0] == 0.0


def test_protocol_picks_the_best_held_out_rate_and_runs_every_seed(tmp_path):
    from bench.context import Context
    torch.manual_seed(0)
    split = data.Split(torch.randn(60, 4), torch.randint(0, 3, (60,)), torch.randn(9, 4),
                       torch.randint(0, 3, (9,)))
    built = []

    def build(lr, seed):
        built.append((lr, seed))
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.SGD(model.parameters(), lr=lr)

    cfg = {"iters": 6, "select_iters": 4, "batch": 8, "eval_every": 3, "holdout": 0.25,
           "seeds": 2}
    threads = torch.get_num_threads()
    out = protocol.run_methods(Context(out=tmp_path, quick=True),
                               {"m": protocol.Method((1e-3, 0.5, float("inf")), build, split)},
                               cfg, "test")["m"]
    assert torch.get_num_threads() == threads
    assert out.scores[float("inf")] == math.inf               # a diverged run never wins
    assert out.lr == min(out.scores, key=out.scores.get) and out.lr != float("inf")
    assert built == [(1e-3, 0), (0.5, 0), (float("inf"), 0), (out.lr, 0), (out.lr, 1)]
    assert [c["iters"] for c in out.curves] == [[0, 3, 6]] * 2
    rows = protocol.result_rows({"m": out}, {"setting": "s"})
    assert rows[0]["seeds"] == 2 and rows[0]["setting"] == "s" and rows[0]["lr"] == out.lr
    chosen = [r for r in protocol.selection_rows({"m": out}) if r["chosen"]]
    assert [r["lr"] for r in chosen] == [out.lr]


def test_protocol_runs_the_compared_methods_interleaved_by_seed(tmp_path):
    from bench.context import Context
    split = data.Split(torch.randn(60, 4), torch.randint(0, 3, (60,)), torch.randn(9, 4),
                       torch.randint(0, 3, (9,)))
    order = []

    def builder(name):
        def build(lr, seed):
            order.append((name, lr, seed))
            torch.manual_seed(seed)
            model = torch.nn.Linear(4, 3)
            return model, torch.optim.SGD(model.parameters(), lr=lr)
        return build
    cfg = {"iters": 2, "select_iters": 2, "batch": 8, "eval_every": 2, "holdout": 0.25,
           "seeds": 2}
    methods = {n: protocol.Method((0.1,), builder(n), split) for n in ("SGD", "C-SGD")}
    protocol.run_methods(Context(out=tmp_path, quick=True), methods, cfg, "test")
    timed = [(n, s) for n, _, s in order[2:]]          # after each method's rate selection
    assert timed == [("SGD", 0), ("C-SGD", 0), ("C-SGD", 1), ("SGD", 1)]


# --- time to target ----------------------------------------------------------------------

def _curve(losses, cpu_per_eval, wall_per_eval=1.0):
    n = len(losses)
    return {"iters": [10 * i for i in range(n)], "train_loss": losses,
            "cpu_seconds": [cpu_per_eval * i for i in range(n)],
            "wall_seconds": [wall_per_eval * i for i in range(n)]}


def test_time_to_target_rows_by_hand():
    outcomes = {
        "SGD": protocol.Outcome(0.1, {}, [_curve([2.0, 1.0, 0.5], 1.0),
                                          _curve([2.0, 0.9, 0.5], 3.0)]),
        "C-SGD": protocol.Outcome(0.1, {}, [_curve([2.0, 0.4, 0.3], 2.0),
                                            _curve([2.0, 0.5, 0.3], 4.0)])}
    rows = targets.rows(outcomes, {"C-SGD": "SGD"}, {"dataset": "d"})
    by = {(r["target"], r["method"]): r for r in rows}
    # best final loss 0.3 (C-SGD); 2× = 0.6: SGD at iteration 20 (CPU 2 and 6 s), C-SGD at 10
    sgd, csgd = by["2× best = 0.6", "SGD"], by["2× best = 0.6", "C-SGD"]
    assert (sgd["iterations"], sgd["CPU s"], sgd["wall s"]) == (20, 4.0, 2.0)
    assert (csgd["iterations"], csgd["CPU s"], csgd["dataset"]) == (10, 3.0, "d")
    assert csgd["iterations ratio"] == pytest.approx(0.5)
    assert csgd["CPU-time ratio"] == pytest.approx(0.75) and csgd["per CPU second"] == "faster"
    assert "baseline" not in sgd
    # 1.1× = 0.33: only C-SGD gets there
    assert by["1.1× best = 0.33", "SGD"]["iterations"] == "not reached (0/2 seeds)"
    late = by["1.1× best = 0.33", "C-SGD"]
    assert late["iterations"] == 20 and late["per CPU second"] == "baseline did not reach it"
    assert "CPU-time ratio" not in late


def test_time_to_target_summary_collects_every_comparison():
    outcomes = {"SGD": protocol.Outcome(0.1, {}, [_curve([3.0, 1.0], 1.0)]),
                "C-SGD": protocol.Outcome(0.1, {}, [_curve([3.0, float("nan")], 9.0)])}
    rows = targets.rows(outcomes, {"C-SGD": "SGD"})     # C-SGD diverged: best is SGD's 1.0
    section = {"name": "demo", "tables": [targets.table(rows)]}
    summary = targets.summary([section, {"name": "toys", "tables": []}])
    assert [r["per CPU second"] for r in summary["tables"][0]["rows"]] == \
        ["method did not reach it"] * 2
    assert summary["verdicts"] == ["C-SGD vs SGD: reached the target in fewer iterations in 0 "
                                   "of 2 comparisons, in less CPU time in 0 of 2; never "
                                   "reached it in 2."]
    assert targets.summary([{"name": "toys", "tables": []}]) is None


# --- one section end to end ------------------------------------------------------------

def test_failed_section_is_named_in_the_header_and_exit_status(tmp_path, monkeypatch):
    import bench.toys
    monkeypatch.setattr(bench.toys, "run", lambda ctx: 1 / 0)
    assert cli.main(["--only", "toys", "--out", str(tmp_path)]) == 1
    text = (tmp_path / "report.md").read_text()
    assert "* status: FAILED: 1 of 1 sections raised (toys)" in text
    assert "**This section failed:** `ZeroDivisionError" in text


def test_interrupted_run_leaves_a_report_marked_incomplete(tmp_path, monkeypatch):
    import bench.kernels
    import bench.toys

    def interrupt(ctx):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench.kernels, "run", lambda ctx: {"name": "kernels", "title": "K"})
    monkeypatch.setattr(bench.toys, "run", interrupt)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--quick", "--only", "kernels,toys", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["status"].startswith("INCOMPLETE: 1 of 2 sections")


def test_toys_section_end_to_end(tmp_path):
    assert cli.main(["--only", "toys", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "* status: complete" in text
    assert "Paper's claim" in text and "What this run shows" in text
    assert (tmp_path / "plots" / "toy_loss_surface.png").stat().st_size > 0
    result = json.loads((tmp_path / "results.json").read_text())["sections"][0]
    rows = result["tables"][0]["rows"]
    csgd = [r for r in rows if r["method"] == "C-SGD"]
    # C-SGD's matched step points straight at the optimum (independent of the learning rate)
    assert all(r["straightness"] > 0.999 for r in csgd)


def test_recurrent_study_counts_dead_runs_and_steps_to_target(tmp_path, capsys):
    """The study's report: one row per optimizer at its chosen lr and per C-SGD variant;
    a run is dead when its final validation accuracy is at or below DEAD, and the steps to
    target are those of the first evaluation reaching it."""
    from bench import recurrent_study as rs
    out = tmp_path / "rs"
    rs.main(["--tasks", "digits8-gru", "--steps", "3", "--out", str(out)])
    saved = json.loads((out / "recurrent_study.json").read_text())
    task = saved["tasks"][0]
    assert set(task["chosen"]) == {"SGD", "C-SGD", "C-SGD amortised", "Adam"}
    assert len(task["finals"]) == 4 * len(rs.FINAL_SEEDS)
    amortised = [r for r in task["finals"] if r["optimizer"] == "C-SGD amortised"]
    assert len(amortised) == len(rs.FINAL_SEEDS)
    model, _ = rs.build("digits8-gru", "C-SGD amortised", 0.1, 0)
    assert set(model.rnn.amortizer) == {"weight_ih_l0", "weight_hh_l0"}
    report = (out / "recurrent_study.md").read_text()
    assert report.count("| digits8-gru |") == 4 + len(rs.RIDGES) + 1    # and its cost row
    assert "| C-SGD amortised |" in report
    run = {"curve": [(0, 0.0, 2.3, 0.1), (25, 0.1, 1.0, 0.95)], "test_acc": 0.9,
           "val_acc": 0.95, "max_grad_norm": 3.0}
    dead = dict(run, val_acc=rs.DEAD, curve=[(0, 0.0, 2.3, 0.1)])
    assert rs._steps_to(run, 0.9) == 25 and rs._steps_to(dead, 0.9) is None
    row = rs._group_row("digits8-gru", "x", [run, dead])
    assert "| 25 (1/2) | 1/2 | 3 |" in row
    with pytest.raises(SystemExit):
        rs.main(["--tasks", "digits9-lstm", "--out", str(out)])
    assert "--tasks: unknown digits9-lstm" in capsys.readouterr().err


# A block between glibc's mmap threshold and the pinned one (32 MiB) is a fresh mapping before
# the pin (mallinfo2's hblkhd grows by its size) and heap after it — 20 MiB after a 4 MiB one
# was freed, which raised the unpinned threshold to 4 MiB only; one above 32 MiB stays a
# mapping. In a child process, as `python -m bench` pins its own.
_MMAPPED_BYTES = """
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if not hasattr(libc, "mallinfo2"):
    print("skip"); sys.exit()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def mapped_by(size):
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(block)
    return grown
size = 4 << 20
unpinned = mapped_by(size)
from bench.allocator import pin_malloc_thresholds
said = pin_malloc_thresholds()
print(unpinned >= size, mapped_by(20 << 20) == 0, mapped_by(40 << 20) >= 40 << 20, said)
"""


def test_pinned_malloc_thresholds_keep_blocks_below_32_mib_on_the_heap():
    out = subprocess.run([sys.executable, "-c", _MMAPPED_BYTES], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    if out == "skip":
        pytest.skip("not glibc ≥ 2.33 (no mallinfo2)")
    assert out.startswith("True True True glibc malloc, mmap threshold 32 MiB"), out
