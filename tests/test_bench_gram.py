"""bench/bench_gram.py's cases of any kernel, padding and groups: the timed kernel computes the
same Gram as the reference it is timed against, and a row records its geometry."""
import pytest
import torch

import consequential_ext as cx
from bench import bench_gram

pytestmark = pytest.mark.skipif("cpu" not in cx.ops.available_backends("im2col_gram", "cpu"),
                                reason="consequential_ext._C was built without CPU kernels")

CASES = [
    {"name": "depthwise-7x7x6-k5s2", "shape": (3, 6, 7, 7), "kernel": 5, "stride": 2,
     "groups": 6, "goal": False},
    {"name": "1x1-5x5x12", "shape": (2, 12, 5, 5), "kernel": 1, "stride": 1, "goal": False},
    {"name": "resnet-like", "shape": (2, 4, 6, 6), "stride": 1, "goal": False},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_timed_kernel_matches_the_timed_reference(case):
    torch.manual_seed(0)
    x = torch.randn(case["shape"])
    geom = bench_gram.geometry(case)
    ours = bench_gram._gram_fn("cpu", x, geom)()
    ref = bench_gram._gram_fn("reference", x, geom)()
    groups = geom[3]
    assert ours.shape == ref.shape == (groups, ) + ref.shape[1:]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_geometry_defaults_to_same_padding_and_one_group():
    assert [bench_gram.geometry(c) for c in CASES] == [(5, 2, 2, 6), (1, 1, 0, 1), (3, 1, 1, 1)]


def test_run_records_the_geometry_and_side_by_side_ratios():
    rows = bench_gram.run(cases=CASES, reps=2, memory=False, log=lambda _: None)
    for case, row in zip(CASES, rows):
        k, s, p, g = bench_gram.geometry(case)
        assert (row["kernel"], row["stride"], row["padding"], row["groups"]) == ([k, k], s, p, g)
        out = (case["shape"][2] + 2 * p - k) // s + 1
        assert row["unfold_mib"] == pytest.approx(
            case["shape"][0] * case["shape"][1] * k * k * out * out * 4 / 2**20)
        assert row["time_ratio"] > 0 and row["conv_ratio"] > 0
    assert "| 5, 2, 6 |" in bench_gram.markdown(rows, {
        "command": "test", "timestamp": "now", "cpu": "cpu", "threads": 1, "torch": "x",
        "loadavg_before": [0], "loadavg_after": [0]})


@pytest.mark.parametrize("argv, named", [(["--reps", "0"], "--reps"), (["--reps", "-2"], "--reps"),
                                         (["--threads", "0"], "--threads"),
                                         (["--threads", "-1"], "--threads")])
def test_bad_numbers_are_parser_errors_naming_the_option(argv, named, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_gram.main(argv + ["--out", str(tmp_path)])
    assert named in capsys.readouterr().err


def test_out_that_is_a_file_fails_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_gram, "run", lambda **_: pytest.fail("measured before --out"))
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        bench_gram.main(["--quick", "--out", str(blocker)])
    assert "--out" in capsys.readouterr().err


def test_interleaved_medians_alternate_the_providers():
    order = []
    out = bench_gram.interleaved_medians({"a": lambda: order.append("a"),
                                          "b": lambda: order.append("b")}, reps=3)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]        # warm-up, then A B, B A, A B
    assert {k: v["reps"] for k, v in out.items()} == {"a": 3, "b": 3}


def test_only_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        bench_gram.main(["--only", "no-such-case", "--out", str(tmp_path)])
