"""The real-models bench section's measuring parts on a small stand-in model (timm itself
is optional): interleaved timing, the profiler breakdown, and the section without timm."""
import builtins
from pathlib import Path

import torch
import torch.nn as nn

import consequential_ext as cx
from bench import real_models
from bench.context import Context


def _pair():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    import copy
    return plain, cx.consequentialize(copy.deepcopy(plain))


def test_time_pair_interleaves_and_trains_both_models():
    plain, matched = _pair()
    before = [p.detach().clone() for p in matched.parameters()]
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    cpu, wall = real_models.time_pair(plain, matched, x, y, steps=3)
    assert set(cpu) == set(wall) == {"plain", "C-SGD"}
    amortised = cx.amortize(_pair()[1], every=2)
    cpu, wall = real_models.time_pair(plain, matched, x, y, steps=3, amortised=amortised)
    assert set(cpu) == set(wall) == {"plain", "C-SGD", "C-SGD amortised"}
    assert all(len(v) == 3 and min(v) >= 0 for v in (*cpu.values(), *wall.values()))
    assert any(not torch.equal(a, b) for a, b in zip(before, matched.parameters()))


def test_breakdown_finds_the_matched_ops():
    _, matched = _pair()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    parts, total = real_models.breakdown(matched, x, y, steps=1)
    assert set(parts) == {"Gram", "solve", "G", "rest"}
    assert parts["Gram"] > 0 and parts["solve"] > 0 and parts["G"] > 0
    assert total > 0 and parts["rest"] >= 0


def test_section_without_timm_runs_resnet20_and_notes_the_skip(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_timm)
    monkeypatch.setitem(real_models.QUICK, "steps", 1)
    monkeypatch.setitem(real_models.QUICK, "batches", {real_models.RESNET20: 4})
    result = real_models.run(Context(out=Path(tmp_path), quick=True))
    assert result["name"] == "real_models"
    assert "timm is not installed" in result["notes"][0]
    (rows,) = [t["rows"] for t in result["tables"] if t["title"].startswith("Training step")]
    assert [r["model"] for r in rows] == [real_models.RESNET20]
    assert rows[0]["input"] == "4×3×32×32" and rows[0]["ratio"] > 0 \
        and rows[0]["amortised ratio"] > 0
