"""bench/bench_solve.py: every provider it times solves the same system (GEMM aside), on one
large system and a batch, and a row carries what the report prints."""
import pytest
import torch

import consequential_ext as cx
from bench import bench_solve

pytestmark = pytest.mark.skipif("cpu" not in cx.ops.available_backends("ridge_solve", "cpu"),
                                reason="consequential_ext._C was built without CPU kernels")


@pytest.mark.parametrize("case", [{"name": "one", "batch": 1, "d": 301, "m": 7},
                                  {"name": "batch", "batch": 5, "d": 9, "m": 1}],
                         ids=lambda c: c["name"])
def test_providers_solve_the_same_system(case):
    gram, grad = bench_solve.problem(case)
    calls = bench_solve.providers(gram, grad)
    eye = torch.eye(case["d"], dtype=torch.float64)
    expected = torch.linalg.solve(gram.double() + bench_solve.RIDGE * eye,
                                  grad.double().mT).mT
    for name in ("cx", "aten", "aten 1 thread"):
        out = calls[name]().double()
        assert out.shape == expected.shape, name
        assert ((out - expected).norm() / expected.norm()) < 1e-4, name


def test_run_rows_and_markdown(capsys):
    case = {"name": "tiny", "batch": 1, "d": 33, "m": 4}
    rows = bench_solve.run(selected=[case], repeats=2)
    assert len(rows) == 1
    row = rows[0]
    assert set(row["cpu_ms"]) == {"cx", "aten", "aten 1 thread", "gemm"}
    assert all(v > 0 for v in row["cpu_ms"].values())
    assert row["cx_vs_aten"] == pytest.approx(row["cpu_ms"]["cx"] / row["cpu_ms"]["aten"])
    table = bench_solve.markdown(rows, {"command": "c", "timestamp": "t", "cpu": "x",
                                        "threads": 2, "torch": "v"})
    assert "| tiny | 1 × 33, 4 |" in table


def test_only_matching_nothing_is_an_error():
    with pytest.raises(SystemExit):
        bench_solve.main(["--only", "no-such-case", "--out", "unused"])
