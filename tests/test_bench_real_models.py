"""The real-models bench section's measuring parts on a small stand-in model (timm itself
is optional): interleaved timing, the profiler breakdown, and the section without timm."""
import builtins
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from bench import real_models
from consequential_ext import matching
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
    cpu, wall, refreshes = real_models.time_pair(plain, matched, x, y, steps=3)
    assert set(cpu) == set(wall) == {"plain", "C-SGD"} and refreshes is None
    amortised = cx.amortize(_pair()[1], every=2)
    replayed = []
    cpu, wall, refreshes = real_models.time_pair(plain, matched, x, y, steps=3,
                                                 amortised=amortised,
                                                 replay=lambda: replayed.append(1))
    assert set(cpu) == set(wall) == {"plain", "C-SGD", "C-SGD amortised", "Gram + solve"}
    assert all(len(v) == 3 and min(v) >= 0 for v in (*cpu.values(), *wall.values()))
    assert any(not torch.equal(a, b) for a, b in zip(before, matched.parameters()))
    # warm-up was step 0 (a refresh); timed steps 1, 2, 3 of every=2; replay: warm-up + 3
    assert refreshes == [False, True, False] and len(replayed) == 4


def test_time_pair_alternates_the_candidates_step_by_step(monkeypatch):
    order = []
    monkeypatch.setattr(real_models, "_stepper",
                        lambda model, x, y, sync=None: lambda: order.append(model))
    real_models.time_pair("plain", "C", None, None, steps=3, replay=lambda: order.append("R"))
    assert order[:3] == ["plain", "C", "R"]                       # warm-up
    assert order[3:] == ["plain", "C", "R", "R", "C", "plain", "plain", "C", "R"]


def test_every_timed_step_and_replay_ends_in_the_sync():
    plain, matched = _pair()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    synced = []
    replay = real_models.replay_calls(real_models.record_gram_and_solve(matched, x, y),
                                      sync=lambda: synced.append("replay"))
    real_models.time_pair(plain, matched, x, y, steps=2, replay=replay,
                          sync=lambda: synced.append("step"))
    # warm-up + 2 timed calls each: plain and C-SGD steps, and the replay
    assert synced.count("step") == 6 and synced.count("replay") == 3


def test_profiled_total_counts_each_kernel_once():
    from types import SimpleNamespace as Event
    from torch.autograd import DeviceType
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [Event(device_type=cpu, self_device_time_total=30.0, self_cpu_time_total=5.0),
              Event(device_type=gpu, self_device_time_total=30.0, self_cpu_time_total=0.0),
              Event(device_type=cpu, self_device_time_total=0.0, self_cpu_time_total=2.0),
              Event(device_type=gpu, self_device_time_total=7.0, self_cpu_time_total=0.0)]
    assert real_models.profiled_total_us(events, cuda=True) == 37.0   # kernels, each once
    assert real_models.profiled_total_us(events, cuda=False) == 7.0   # the ops' own CPU time
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.randn(30, 30) @ torch.randn(30, 30)
    assert real_models.profiled_total_us(prof.events(), cuda=False) == pytest.approx(
        sum(e.self_cpu_time_total for e in prof.key_averages()))


def test_per_step_over_period_weights_refreshes_by_the_schedule():
    times = [1.0, 1.2, 9.0, 1.1, 11.0, 0.9]
    refreshes = [False, False, True, False, True, False]
    # (median(9, 11) + 3 · median(1.0, 1.2, 1.1, 0.9)) / 4 = (10 + 3 · 1.05) / 4
    assert abs(real_models.per_step_over_period(times, refreshes, 4, min_fresh=2)
               - 3.2875) < 1e-12
    with pytest.raises(ValueError, match="every=8"):
        real_models.per_step_over_period([1.0, 2.0], [False, False], 4, min_fresh=2)
    with pytest.raises(ValueError, match="need 5 refresh"):      # the section's default
        real_models.per_step_over_period(times, refreshes, 4)
    for cfg in (real_models.QUICK, real_models.FULL):   # enough steps for the samples asked
        assert cfg["steps"] >= cfg["refreshes"] * real_models.AMORTIZE_EVERY
    assert real_models.FULL["refreshes"] >= real_models.MIN_REFRESHES


def test_recorded_gram_and_solve_calls_are_the_step_s_own():
    _, matched = _pair()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
             for m in matched.modules() if isinstance(m, cx.CConv2d)]
    calls = real_models.record_gram_and_solve(matched, x, y)
    for h in hooks:
        h.remove()
    # two convs (one depthwise) on the row side; the Linear (N = 4 < D) on the column side,
    # its N × N Gram from _linear_gram of the columns
    assert sorted(fn.__name__ for fn, _, _ in calls) == \
        ["_linear_gram"] + ["im2col_gram"] * 2 + ["ridge_solve"] * 3
    column_gram = next(args for fn, args, _ in calls if fn.__name__ == "_linear_gram")
    assert column_gram[0].shape[1] == 4
    grams = [args for fn, args, _ in calls if fn.__name__ == "im2col_gram"]
    for args, seen in zip(sorted(grams, key=lambda a: a[0].shape[1]),
                          sorted(inputs, key=lambda t: t.shape[1])):
        torch.testing.assert_close(args[0], seen, rtol=0, atol=0)
    counted = []
    with real_models._patched(real_models.GRAM_AND_SOLVE,
                              lambda fn: lambda *a, **k: counted.append(fn.__name__)):
        real_models.replay_calls(calls)()
    assert counted == []          # the replay calls the recorded originals, not the patched names
    first = [fn(*args, **kwargs) for fn, args, kwargs in calls]
    real_models.replay_calls(calls)()
    second = [fn(*args, **kwargs) for fn, args, kwargs in calls]
    for p, q in zip(first, second):               # recorded arguments are copies: unchanged
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_breakdown_finds_the_matched_ops():
    """A conv whose Gram kernel brings G (16 channels a side: counted in Gram), the depthwise
    conv's Gram, and a Linear on the row side (72 rows of 7: its G on its own)."""
    torch.manual_seed(0)
    matched = cx.consequentialize(nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Linear(6, 4), nn.Flatten(), nn.Linear(16 * 6 * 4, 10)))
    x, y = torch.randn(4, 16, 6, 6), torch.randint(0, 10, (4,))
    parts, total = real_models.breakdown(matched, x, y, steps=1)
    assert set(parts) == {"Gram", "solve", "G", "rest"}
    assert parts["Gram"] > 0 and parts["solve"] > 0 and parts["G"] > 0
    assert total > 0 and parts["rest"] >= 0


def test_a_linear_gram_from_the_kernel_is_recorded_once():
    """A Linear with 300 rows of 130 builds its Gram through ops.im2col_gram inside
    _linear_gram: one recorded call, replayed once."""
    torch.manual_seed(0)
    matched = cx.consequentialize(nn.Sequential(nn.Flatten(0, 1), nn.Linear(130, 5)))
    x, y = torch.randn(3, 100, 130), torch.randint(0, 5, (300,))
    calls = real_models.record_gram_and_solve(matched, x, y)
    assert [fn.__name__ for fn, _, _ in calls] == ["_linear_gram", "ridge_solve"]
    assert calls[0][1][0].shape == (300, 130)


def test_bucket_times_count_a_nested_bucket_op_once():
    """A Linear's Gram range holding the compiled Gram op (300 rows of 130: the kernel's
    side) counts as the range alone; a lone Gram op and a solve count on their own."""
    x, lone = torch.randn(300, 130), torch.randn(2, 8, 5, 5)
    with torch.profiler.profile() as prof:
        with torch.profiler.record_function("cx::linear_gram"):
            matching._linear_gram(x, True)
        cx.ops.im2col_gram(lone, 3)
        cx.ops.ridge_solve(torch.eye(4) * 2, torch.ones(3, 4), 0.1)
    events = prof.events()
    span = sum(e.cpu_time_total for e in events if e.name == "cx::linear_gram")
    ops_ = [e for e in events if e.name == "consequential_ext::im2col_gram"]
    assert len(ops_) == 2 and any(e.cpu_parent and e.cpu_parent.name == "cx::linear_gram"
                                  for e in ops_)
    lone_op = sum(e.cpu_time_total for e in ops_ if e.cpu_parent is None
                  or e.cpu_parent.name != "cx::linear_gram")
    solve = sum(e.cpu_time_total for e in events if e.name == "consequential_ext::ridge_solve")
    parts = real_models.bucket_times(events)
    assert parts["Gram"] == pytest.approx(span + lone_op)
    assert parts["solve"] == pytest.approx(solve) and parts["G"] == 0


def test_section_without_timm_runs_resnet20_and_notes_the_skip(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_timm)
    monkeypatch.setattr(real_models, "AMORTIZE_EVERY", 2)
    monkeypatch.setitem(real_models.QUICK, "steps", 2 * real_models.QUICK["refreshes"])
    monkeypatch.setitem(real_models.QUICK, "batches", {real_models.RESNET20: 4})
    result = real_models.run(Context(out=Path(tmp_path), quick=True))
    assert result["name"] == "real_models"
    assert "timm is not installed" in result["notes"][0]
    (rows,) = [t["rows"] for t in result["tables"] if t["title"].startswith("Training step")]
    assert [r["model"] for r in rows] == [real_models.RESNET20]
    assert rows[0]["input"] == "4×3×32×32" and rows[0]["ratio"] > 0 \
        and rows[0]["amortised ratio"] > 0 and rows[0]["floor ratio"] > 1
