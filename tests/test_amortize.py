"""Amortised solves: the running Gram's schedule, damping and safeguard against a float64
re-implementation from the ordinary gradients; stability on the 8-layer MLP where the
undamped version diverged; non-finite statistics; checkpoint resume; options."""
import copy
import importlib
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consequential_ext as cx
import matched_reference as ref
from consequential_ext.ops import reference as ops_reference

RIDGE = 0.05
amortize_module = importlib.import_module("consequential_ext.amortize")  # cx.amortize: the function


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The once-per-process warnings armed again, and captured."""
    monkeypatch.setattr(amortize_module, "_non_finite_warned", False)
    monkeypatch.setattr(amortize_module, "_no_graph_warned", False)
    monkeypatch.setattr(ops_reference, "_escalation_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _rows(x):
    rows = x.detach().double().reshape(-1, x.shape[-1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)


def _damped_inverse(a, damping):
    d = a.shape[-1]
    lam = RIDGE + damping * a.diagonal(dim1=-2, dim2=-1).mean(-1)
    return torch.linalg.inv(a + lam[..., None, None] * torch.eye(d, dtype=a.dtype))


def _strided(t, columns, per_sample=1):
    """Every s-th sample, s the largest stride coprime with the count that still gives at
    least the samples that hold ``columns`` columns."""
    n, wanted = t.shape[0], math.ceil(columns / per_sample)
    if n <= wanted:
        return t
    stride = next(s for s in range(n // wanted, 0, -1) if math.gcd(s, n) == 1)
    return t[::stride]


def _shorten(g, direction, energy):
    """The safeguard's step length, from its definition."""
    gain = (g * direction).sum((-2, -1))
    model = energy + RIDGE * direction.square().sum((-2, -1))
    return direction * (gain / model).clamp(max=1.0)[..., None, None]


@pytest.mark.parametrize("safeguard_columns", [None, 3])
def test_every_step_without_memory_or_damping_is_the_exact_matched_gradient(safeguard_columns):
    """A fresh undamped factor: the safeguard's step length is exactly 1."""
    torch.manual_seed(0)
    exact = cx.CLinear(12, 3, ridge=RIDGE, dtype=torch.float64)
    amortized = cx.amortize(cx.CLinear(12, 3, ridge=RIDGE, dtype=torch.float64), every=1,
                            decay=0.0, damping=0.0, safeguard_columns=safeguard_columns,
                            exact_when_cheaper=False)
    amortized.load_state_dict(exact.state_dict(), strict=False)
    for n in (5, 20):  # column side, then row side, for the exact layer
        x = torch.randn(n, 12, dtype=torch.float64)
        for layer in (exact, amortized):
            layer.zero_grad()
            layer(x).square().sum().backward()
        torch.testing.assert_close(amortized.weight.grad, exact.weight.grad, rtol=1e-9,
                                   atol=1e-12)
        torch.testing.assert_close(amortized.bias.grad, exact.bias.grad, rtol=1e-9, atol=1e-12)


def test_linear_schedule_damping_and_safeguard_match_float64_reimplementation():
    torch.manual_seed(0)
    every, gram_every, decay, damping, columns = 4, 2, 0.7, 0.3, 5
    layer = cx.amortize(cx.CLinear(6, 2, ridge=RIDGE, dtype=torch.float64), every=every,
                        decay=decay, gram_every=gram_every, gram_oversample=1.5,
                        damping=damping, safeguard_columns=columns, exact_when_cheaper=False)
    ema = inverse = None
    for step in range(9):
        x = torch.randn(23, 6, dtype=torch.float64) * (1 + step)  # the Gram drifts
        layer.zero_grad()
        y = layer(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        rows = _rows(x)
        part = rows[::2]          # 1.5·D = 11 columns wanted of 23: rows 0, 2, ..., 22
        a = part.T @ part / part.shape[0]
        if step % gram_every == 0:
            ema = a if ema is None else decay ** gram_every * ema + (1 - decay ** gram_every) * a
        if step % every == 0:
            inverse = _damped_inverse(ema, damping)
        gw, gb = ref.ordinary_grads(F.linear, x, layer.weight, layer.bias, gy)
        g = torch.cat([gw, gb[:, None]], 1)
        direction = g @ inverse
        if step % gram_every == 0:  # the Gram is there: the exact energy
            energy = ((direction @ a) * direction).sum()
        else:                       # 5 of 23 rows wanted, strided: rows 0, 4, ..., 20
            sub = _strided(rows, columns)
            assert sub.shape[0] == 6
            energy = (sub @ direction.T).square().sum() / sub.shape[0]
        expected = _shorten(g, direction, energy)
        torch.testing.assert_close(layer.weight.grad, expected[:, :-1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, expected[:, -1], rtol=1e-9, atol=1e-12)
    assert int(layer.amortizer.steps) == 9


def test_grouped_conv_schedule_and_safeguard_match_float64_reimplementation():
    torch.manual_seed(0)
    every, decay, damping, columns = 2, 0.5, 0.2, 40   # 40 patches: 2 of 5 samples of 25
    layer = cx.amortize(cx.CConv2d(4, 6, 3, padding=1, groups=2, ridge=RIDGE,
                                   dtype=torch.float64), every=every, decay=decay,
                        gram_every=1, damping=damping, safeguard_columns=columns)
    ema = inverse = None
    for step in range(4):
        x = torch.randn(5, 4, 5, 5, dtype=torch.float64)
        layer.zero_grad()
        y = layer(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        cols = F.unfold(F.pad(x, (1, 1, 1, 1)), 3)                      # (B, 4·9, L)
        per_group = []
        for g in range(2):
            xg = cols[:, g * 18:(g + 1) * 18].permute(1, 0, 2).reshape(18, -1)
            per_group.append(torch.cat([xg, torch.ones(1, xg.shape[1], dtype=xg.dtype)]))
        a = torch.stack([xg @ xg.T / x.shape[0] for xg in per_group])
        ema = a if ema is None else decay * ema + (1 - decay) * a
        if step % every == 0:
            inverse = _damped_inverse(ema, damping)
        conv = lambda inp, w, b: F.conv2d(inp, w, b, 1, 1, 1, 2)  # noqa: E731
        gw, gb = ref.ordinary_grads(conv, x, layer.weight, layer.bias, gy)
        g = torch.cat([gw.reshape(2, 3, 18), gb.reshape(2, 3, 1)], -1)
        direction = g @ inverse
        energy = ((direction @ a) * direction).sum((-2, -1))  # gram_every=1: exact energy
        expected = _shorten(g, direction, energy)
        torch.testing.assert_close(layer.weight.grad, expected[..., :-1].reshape(6, 2, 3, 3),
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, expected[..., -1].reshape(6),
                                   rtol=1e-9, atol=1e-12)


def test_conv_refresh_gram_and_safeguard_measure_strided_samples():
    torch.manual_seed(1)
    columns = 30  # 25 patches a sample: 2 samples of 7, strided by 3 (samples 0, 3, 6)
    layer = cx.amortize(cx.CConv2d(3, 4, 3, stride=2, padding=2, ridge=RIDGE,
                                   dtype=torch.float64), every=3, decay=0.5, damping=0.1,
                        gram_oversample=2, safeguard_columns=columns)
    for step in range(3):
        x = torch.randn(7, 3, 8, 8, dtype=torch.float64) * (1 + step)
        layer.zero_grad()
        y = layer(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        cols = F.unfold(F.pad(x, (2, 2, 2, 2)), 3, stride=2)            # (B, 27, 25)
        cols = torch.cat([cols, torch.ones(7, 1, 25, dtype=cols.dtype)], 1)
        if step == 0:  # 2·D = 56 patches wanted: 3 samples, strided by 2 (0, 2, 4, 6)
            flat = cols[::2].permute(1, 0, 2).reshape(28, -1)
            ema = flat @ flat.T / 4
            inverse = _damped_inverse(ema, 0.1)
        conv = lambda inp, w, b: F.conv2d(inp, w, b, 2, 2)  # noqa: E731
        gw, gb = ref.ordinary_grads(conv, x, layer.weight, layer.bias, gy)
        g = torch.cat([gw.reshape(4, 27), gb[:, None]], 1)
        direction = g @ inverse
        if step == 0:
            energy = ((direction @ ema) * direction).sum()
        else:
            sub = _strided(cols, columns, 25)
            assert sub.shape[0] == 3
            energy = (direction @ sub).square().sum() / sub.shape[0]
        expected = _shorten(g[None], direction[None], energy[None])[0]
        torch.testing.assert_close(layer.weight.grad, expected[:, :-1].reshape(4, 3, 3, 3),
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, expected[:, -1], rtol=1e-9, atol=1e-12)


def test_gram_is_built_on_refresh_steps_only(monkeypatch):
    calls = []
    original = cx.ops.im2col_gram
    monkeypatch.setattr(cx.ops, "im2col_gram", lambda *a, **k: calls.append(1) or original(*a, **k))
    layer = cx.amortize(cx.CConv2d(2, 3, 3), every=4, gram_every=2)
    for _ in range(8):
        layer(torch.randn(6, 2, 6, 6)).sum().backward()
    assert len(calls) == 4  # steps 0, 2, 4, 6
    assert int(layer.amortizer.steps) == 8


def test_exact_column_side_where_cheaper_and_running_state_untouched():
    torch.manual_seed(0)
    exact = cx.CLinear(40, 5, ridge=RIDGE)
    amortized = cx.amortize(copy.deepcopy(exact), every=10)
    x = torch.randn(6, 40)  # N = 6 < D = 41: the exact column (6×6) system is the cheaper
    for layer in (exact, amortized):
        layer(x).square().sum().backward()
    assert torch.equal(amortized.weight.grad, exact.weight.grad)
    assert torch.equal(amortized.bias.grad, exact.bias.grad)
    assert int(amortized.amortizer.steps) == 0


def _mlp(seed):
    torch.manual_seed(seed)
    dims = [784] + [256] * 8
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return cx.consequentialize(nn.Sequential(*layers, nn.Linear(256, 10)))


def _train_fixed_batch(model, steps=60):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 784, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss.item(), max(p.grad.abs().max().item() for p in model.parameters())


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: threads only add synchronisation on a busy CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exact_mlp_loss(one_thread):
    loss, _ = _train_fixed_batch(_mlp(0))
    assert loss < 2.0  # the exact run itself trains (from 2.30)
    return loss


@pytest.mark.parametrize("options", [{}, {"exact_when_cheaper": False}])
def test_mlp_where_the_undamped_amortised_run_diverged_stays_close_to_exact(options,
                                                                             exact_mlp_loss):
    """The issue's scenario: 8 ReLU layers of 256, one fixed batch of 32 (N < D), SGD 0.01.
    Undamped and unguarded, the amortised run reached NaN by step 59; by default it takes
    the exact column solves, and forced onto the row side it stays finite."""
    loss, max_grad = _train_fixed_batch(cx.amortize(_mlp(0), every=10, **options))
    assert math.isfinite(loss) and max_grad < 10.0
    assert loss < 2.0 * exact_mlp_loss


def _force_row(layer_class, *args, **kwargs):
    return cx.amortize(layer_class(*args, **kwargs), every=3, exact_when_cheaper=False)


@pytest.mark.parametrize("make, shape", [
    (lambda: _force_row(cx.CLinear, 5, 3), (8, 5)),
    (lambda: _force_row(cx.CConv2d, 2, 3, 3, padding=1), (4, 2, 5, 5))])
def test_huge_input_gives_nan_and_one_warning_and_keeps_the_state(make, shape, fresh_warnings):
    """1e30 overflows the float32 Gram: on a refresh step and between refreshes, the step is
    NaN (no exception in backward), one warning, and the next finite step is as if the bad
    one had not refreshed anything."""
    torch.manual_seed(0)
    layer = make()
    clean = copy.deepcopy(layer)
    good = [torch.randn(shape) for _ in range(3)]
    for model in (layer, clean):                      # step 0: a refresh
        model(good[0]).sum().backward()
    bad = torch.randn(shape)
    bad.view(-1)[3] = 1e30
    state = {k: v.clone() for k, v in layer.amortizer.state_dict().items()}
    layer.zero_grad()
    layer(bad).sum().backward()                       # step 1: between refreshes
    assert not torch.isfinite(layer.weight.grad).all()
    assert torch.equal(layer.amortizer.gram, state["gram"])
    assert torch.equal(layer.amortizer.inverse, state["inverse"])
    clean.amortizer.steps += 1                        # the clean copy skips that step
    for x in good[1:]:                                # step 2, then 3: a refresh
        for model in (layer, clean):
            model.zero_grad()
            model(x).sum().backward()
        assert torch.equal(layer.weight.grad, clean.weight.grad)
    layer.zero_grad()
    state = {k: v.clone() for k, v in layer.amortizer.state_dict().items()}
    layer(bad).sum().backward()                       # step 4: between refreshes
    layer(bad).sum().backward()                       # step 5
    layer.zero_grad()
    layer(bad).sum().backward()                       # step 6: a refresh, refused
    assert not torch.isfinite(layer.weight.grad).all()
    assert torch.equal(layer.amortizer.gram, state["gram"])
    assert int(layer.amortizer.steps) == 6            # the refresh is retried next step
    messages = [str(w.message) for w in fresh_warnings]
    assert len(messages) == 1 and "amortize" in messages[0], messages


def test_a_refresh_whose_step_overflows_keeps_its_fold_and_advances(fresh_warnings):
    """docs/amortize.md, non-finite statistics: refusal depends on the Gram alone (the same on
    every rank under DDP). A refresh whose Gram is finite but whose step is not (an
    overflowing G, or a non-finite row the strided refresh Gram leaves out) keeps its fold
    and refactorisation and advances ``steps``, silently: afterwards the layer steps as a
    copy that saw the same batch with a finite signal."""
    torch.manual_seed(0)
    for bad_row in (False, True):
        layer = cx.amortize(cx.CLinear(4, 3, ridge=RIDGE), every=2, gram_every=1, decay=0.5,
                            gram_oversample=1, exact_when_cheaper=False)
        clean = copy.deepcopy(layer)
        xs = [torch.randn(11, 4) * (1 + i) for i in range(5)]
        dzs = [torch.randn(11, 3) for _ in range(5)]
        for i in range(2):                            # steps 0, 1
            for model in (layer, clean):
                model(xs[i]).backward(dzs[i])
        x, dz = xs[2].clone(), dzs[2].clone()
        if bad_row:
            x[3, 1] = math.inf                        # rows 0, 2, .., 10 make the Gram
        else:
            dz[0, 0] = math.inf
        layer.zero_grad()
        layer(x).backward(dz)                         # step 2: a refresh and a refactorisation
        assert torch.isnan(layer.weight.grad).all()
        xs[2][3, 1] = 0.0                             # the clean copy: the same Gram rows
        clean(xs[2]).backward(dzs[2])
        for key in ("gram", "inverse", "steps"):
            assert torch.equal(getattr(layer.amortizer, key), getattr(clean.amortizer, key)), key
        assert int(layer.amortizer.steps) == 3
        for i in (3, 4):
            for model in (layer, clean):
                model.zero_grad()
                model(xs[i]).backward(dzs[i])
            assert torch.equal(layer.weight.grad, clean.weight.grad)
    assert fresh_warnings == []


def test_overflowing_safeguard_energy_gives_nan_not_a_zero_step(fresh_warnings):
    """Between refreshes the safeguard divides by the batch's energy along the step: an
    energy that overflowed would scale the step to 0 without a word; it is NaN and warned."""
    amortizer = amortize_module.GramAmortizer((3, 3), every=4, decay=0.5)
    assert torch.isfinite(amortizer.precondition(torch.eye(3), torch.ones(2, 3), 0.1,
                                                 energy=None)).all()
    out = amortizer.precondition(None, torch.ones(2, 3), 0.1,
                                 energy=lambda direction, columns: torch.tensor(math.inf))
    assert torch.isnan(out).all() and int(amortizer.steps) == 2
    assert len(fresh_warnings) == 1 and "amortize" in str(fresh_warnings[0].message)


def test_an_overflowing_gradient_is_a_silent_nan_step_that_keeps_the_warning(fresh_warnings):
    """A GradScaler overflow (inf in G only) is a NaN step without a word, as on the exact
    path; the once-per-process warning is still there for non-finite statistics after it."""
    amortizer = amortize_module.GramAmortizer((3, 3), every=2, decay=0.5)
    g = torch.ones(2, 3)
    assert torch.isfinite(amortizer.precondition(torch.eye(3), g, 0.1, energy=None)).all()
    overflow = g.clone()
    overflow[0, 1] = math.inf
    energy = lambda direction, columns: direction.square().sum((-2, -1))  # noqa: E731
    for gram in (None, torch.eye(3)):                 # between refreshes, and at one
        assert torch.isnan(amortizer.precondition(gram, overflow, 0.1, energy=energy)).all()
    assert fresh_warnings == []
    bad = torch.eye(3)
    bad[0, 0] = math.nan
    amortizer.precondition(bad, g, 0.1, energy=None)
    assert len(fresh_warnings) == 1 and "amortize" in str(fresh_warnings[0].message)


def test_finite_gram_that_no_ridge_makes_definite_gives_nan_not_an_exception(fresh_warnings):
    amortizer = amortize_module.GramAmortizer((3, 3), every=1, decay=0.5)
    indefinite = -torch.eye(3)    # not a Gram; the factorisation fails at every escalation
    out = amortizer.precondition(indefinite, torch.ones(2, 3), 1e-3, energy=None)
    assert out.shape == (2, 3) and torch.isnan(out).all()
    assert int(amortizer.steps) == 0 and not amortizer.gram.any()
    assert any("no escalation helped" in str(w.message) for w in fresh_warnings)


def test_create_graph_through_an_amortised_layer_warns_once(fresh_warnings):
    """The amortised step comes from kept state, not this batch's graph: under
    create_graph=True its gradient has none, said once; an ordinary backward says nothing,
    and the exact layer beside it keeps its graph."""
    torch.manual_seed(18)
    model = cx.consequentialize(nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)))
    cx.amortize(model[2], every=2, exact_when_cheaper=False)
    x = torch.randn(9, 4)
    model(x).square().sum().backward()
    assert not fresh_warnings
    grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()),
                                create_graph=True)
    assert grads[0].grad_fn is not None and grads[2].grad_fn is None
    assert [str(w.message).count("no autograd graph") for w in fresh_warnings] == [1]


def test_checkpoint_resumes_every_piece_of_state_bit_identically():
    """Saved between refreshes (steps, EMA, inverse mid-period), resumed into a model with a
    different initialisation and an empty amortizer."""
    def model(seed):
        torch.manual_seed(seed)
        net = cx.consequentialize(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(),
                                                nn.Linear(27, 4)), ridge=1e-2)
        return cx.amortize(net, every=4, gram_every=2, exact_when_cheaper=False)

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 2, 5, 5, generator=gen), torch.randn(5, 4, generator=gen))
               for _ in range(7)]

    def train(net, opt, part):
        for x, t in part:
            opt.zero_grad()
            F.mse_loss(net(x), t).backward()
            opt.step()

    straight = model(0)
    train(straight, torch.optim.SGD(straight.parameters(), lr=0.1), batches)
    first = model(0)
    train(first, torch.optim.SGD(first.parameters(), lr=0.1), batches[:3])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = model(1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert int(resumed[0].amortizer.steps) == 3 and resumed[2].amortizer.inverse.any()
    train(resumed, torch.optim.SGD(resumed.parameters(), lr=0.1), batches[3:])
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5)),
    lambda: nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(36, 5)),
], ids=["linear", "grouped_conv"])
def test_an_amortised_model_built_on_the_meta_device_starts_afresh_when_reinitialised(make):
    """Deferred initialisation: amortised on the meta device, materialised by ``to_empty``
    (uninitialised memory: filled with garbage here, so the test does not depend on what the
    allocator returns), then ``reset_parameters()`` on every module that has one, as FSDP's
    meta-device recipe does. The amortizer must start as a fresh one: step 0 is the exact
    solve, and the run equals one amortised on the CPU."""
    options = dict(every=3, decay=0.0, damping=0.0, safeguard_columns=None,
                   exact_when_cheaper=False)
    torch.manual_seed(30)
    twin = cx.amortize(cx.consequentialize(make().double(), ridge=RIDGE), **options)
    with torch.device("meta"):
        deferred = make().double()
    cx.amortize(cx.consequentialize(deferred, ridge=RIDGE), **options)
    deferred.to_empty(device="cpu")
    for buffer in deferred.buffers():
        buffer.fill_(1234567)
    for module in deferred.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    deferred.load_state_dict({k: v for k, v in twin.state_dict().items()
                              if "amortizer" not in k}, strict=False)
    last = deferred[-1]
    assert int(last.amortizer.steps) == 0 and not last.amortizer.inverse.any()
    seen = {}

    def record(module, args, out):
        seen["x"] = args[0]
        out.register_hook(lambda g: seen.__setitem__("g", g))
    last.register_forward_hook(record)
    shape = (11, 7) if isinstance(deferred[0], nn.Linear) else (11, 4, 5, 7)
    for step in range(5):
        x = torch.randn(shape, dtype=torch.float64)
        for net in (twin, deferred):
            net.zero_grad()
            net(x).square().sum().backward()
        if step == 0:
            gw, gb = ref.matched_linear(seen["x"], last.weight, last.bias, seen["g"], RIDGE)
            torch.testing.assert_close(last.weight.grad, gw, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(last.bias.grad, gb, rtol=1e-8, atol=1e-10)
        for a, b in zip(deferred.parameters(), twin.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), step


def test_a_step_count_swapped_in_by_load_state_dict_is_the_one_followed():
    """``load_state_dict(assign=True)`` under ``set_swap_module_params_on_conversion(True)``
    swaps the saved ``steps`` (its version counter too) into the same tensor object: the
    amortizer steps on from the loaded count, as a model resumed the ordinary way does."""
    def make():
        torch.manual_seed(31)
        return cx.amortize(cx.consequentialize(nn.Sequential(nn.Linear(6, 5)).double(),
                                               ridge=RIDGE), every=4, gram_every=2)
    xs = [torch.randn(23, 6, dtype=torch.float64) for _ in range(7)]
    saved = make()
    for x in xs[:3]:
        saved(x).sum().backward()
    checkpoint = copy.deepcopy(saved.state_dict())
    source, resumed = make(), make()
    source.load_state_dict(checkpoint)           # its steps buffer: one in-place write
    resumed.load_state_dict(checkpoint)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        swapped = make()
        swapped(xs[0]).sum().backward()          # one step: one in-place write too
        steps = swapped[0].amortizer.steps
        swapped.load_state_dict(source.state_dict(), assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert swapped[0].amortizer.steps is steps  # the same object, swapped
    for x in xs[3:]:
        for net in (resumed, swapped):
            net.zero_grad()
            net(x).square().sum().backward()
        assert torch.equal(swapped[0].weight.grad, resumed[0].weight.grad)
    assert int(swapped[0].amortizer.steps) == 7


def test_amortize_is_in_state_dict_and_removable():
    model = cx.consequentialize(nn.Sequential(nn.Conv2d(2, 3, 3, groups=1), nn.Flatten(),
                                              nn.Linear(3, 2, bias=False)))
    cx.amortize(model, every=4)
    keys = set(model.state_dict())
    assert {"0.amortizer.gram", "0.amortizer.inverse", "0.amortizer.steps",
            "2.amortizer.gram"} <= keys
    assert model[0].amortizer.gram.shape == (1, 19, 19)
    assert model[2].amortizer.gram.shape == (3, 3)
    cx.amortize(model, every=None)
    assert not any("amortizer" in k for k in model.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_casting_an_amortised_model_keeps_its_statistics_wide(dtype):
    """``.to(dtype)`` after ``amortize``: the running Gram and inverse stay float32 (float64
    for a float64 model), and the steps are those of the model cast first and amortised
    after, bit for bit."""
    torch.manual_seed(8)
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 25, 5))
    first = cx.consequentialize(make())
    second = copy.deepcopy(first)
    cx.amortize(first, every=2, exact_when_cheaper=False)
    first.to(dtype)
    second.to(dtype)
    cx.amortize(second, every=2, exact_when_cheaper=False)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for layer in (first[0], first[3]):
        assert layer.amortizer.gram.dtype == layer.amortizer.inverse.dtype == wide
        assert layer.amortizer.steps.dtype == torch.int64
    for _ in range(3):
        x = torch.randn(6, 3, 5, 5, dtype=dtype)
        grads = []
        for model in (first, second):
            model.zero_grad(set_to_none=True)
            model(x).float().square().sum().backward()
            grads.append([p.grad for p in model.parameters()])
        for got, want in zip(*grads):
            assert got.dtype == dtype and torch.isfinite(got).all()
            assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs, match", [
    ({"every": 0}, "every"), ({"every": 2.5}, "every"), ({"decay": 1.0}, "decay"),
    ({"decay": float("nan")}, "decay"), ({"gram_every": 0}, "gram_every"),
    ({"gram_oversample": 0.5}, "gram_oversample"), ({"gram_oversample": "all"}, "gram_oversample"),
    ({"every": 10, "gram_every": 3}, "gram_every must divide every"),
    ({"damping": -0.1}, "damping"), ({"damping": float("inf")}, "damping"),
    ({"safeguard_columns": 0}, "safeguard_columns"),
    ({"safeguard_columns": 1.5}, "safeguard_columns"),
    ({"exact_when_cheaper": "yes"}, "exact_when_cheaper")])
def test_bad_options_name_the_argument(kwargs, match):
    layer = cx.CLinear(3, 2)
    with pytest.raises(ValueError, match=match):
        cx.amortize(layer, **kwargs)
    assert "amortizer" not in layer._modules


@pytest.mark.parametrize("make", [lambda: cx.CConv2d(4, 0, 3, groups=2),
                                  lambda: cx.CConv1d(3, 0, 2, bias=False)])
def test_a_zero_width_conv_is_amortised_as_the_functional_form_checks_it(make):
    """A conv with no outputs (a pruned branch forward skips): its Gram is sized from the
    weight's per-output shape, not weight[0] (an IndexError that failed the whole model)."""
    layer = make()
    cx.amortize(nn.Sequential(layer), every=2)
    d = math.prod(layer.weight.shape[1:]) + (layer.bias is not None)
    assert tuple(layer.amortizer.gram.shape) == (layer.groups, d, d)


def test_model_without_c_layers_is_an_error():
    with pytest.raises(ValueError, match="consequentialize"):
        cx.amortize(nn.Sequential(nn.Linear(2, 2)))
    attention = cx.consequentialize(nn.Sequential(nn.MultiheadAttention(4, 2)))
    with pytest.raises(ValueError, match="CMultiheadAttention layers solve exactly"):
        cx.amortize(attention)
    with pytest.raises(TypeError, match="model"):
        cx.amortize("not a model")


def test_functional_checks_the_amortizer_in_forward():
    from consequential_ext.amortize import GramAmortizer
    x, w = torch.randn(4, 3), torch.randn(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match="amortizer"):
        cx.functional.clinear(x, w, amortizer="yes")
    wrong = GramAmortizer((4, 4), every=1, decay=0.5)  # a bias row too many
    with pytest.raises(ValueError, match=r"amortizer holds a Gram of shape \(4, 4\)"):
        cx.functional.clinear(x, w, amortizer=wrong)
    right = GramAmortizer((3, 3), every=1, decay=0.5)
    cx.functional.clinear(x, w, amortizer=right).sum().backward()
    assert int(right.steps) == 1
    with pytest.raises(ValueError, match="amortizer"):
        cx.functional.cconv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3, requires_grad=True),
                              groups=2, amortizer=GramAmortizer((1, 18, 18), every=1, decay=0.5))


@pytest.mark.parametrize("values, finite", [
    ([1.0, -2.0, 3.0], True),
    ([3e38, 3e38, -1.0], True),          # finite entries whose float32 sum overflows
    ([1.0, math.inf, 2.0], False),
    ([-math.inf, 1.0, 2.0], False),
    ([1.0, math.nan, 2.0], False),
    ([3e38, 3e38, math.nan], False),
    ([], True),
])
def test_finite_check_is_exact_whatever_the_sum(values, finite):
    """The one-pass check (a finite sum proves every entry finite) falls back to the exact
    test where the sum is not finite, so a finite step whose sum overflows is kept."""
    t = torch.tensor(values, dtype=torch.float32).reshape(-1, 1)
    assert amortize_module._all_finite(t) is finite


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor → Python conversions (each a GPU synchronisation on a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__int__", "__float__", "__bool__", "item", "tolist"):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_step_between_refreshes_reads_one_value_back_and_the_count_follows_writes():
    """One host read per layer and step (the direction's finiteness), not one per use of the
    step count: on a GPU each read waits for the device. The cached count still follows a
    loaded state, a user's write and a new tensor."""
    torch.manual_seed(0)
    from consequential_ext.amortize import GramAmortizer
    amortizer = GramAmortizer((5, 5), every=4, decay=0.9)
    x = torch.randn(40, 5)

    def energy(direction, columns):
        return ((direction @ x.T) ** 2).sum((-2, -1)) / 40

    def step():
        with _HostReads() as mode:
            gram = x.T @ x / 40 if amortizer.wants_gram() else None
            out = amortizer.precondition(gram, torch.randn(3, 5), 0.1, energy)
        assert torch.isfinite(out).all()
        return gram is not None, mode.reads
    assert step()[0]                                   # step 0 refreshes
    for _ in range(3):
        refreshed, reads = step()
        assert not refreshed and reads == ["__float__"]
    assert step()[0] and int(amortizer.steps) == 5     # step 4 refreshes again
    amortizer.steps += 3                               # a user's write: step 8 next
    assert amortizer.wants_gram()
    amortizer.load_state_dict({**amortizer.state_dict(), "steps": torch.tensor(5)})
    assert not amortizer.wants_gram()
    amortizer.steps = torch.tensor(12)                 # another tensor
    assert amortizer.wants_gram()
    step()
    assert int(amortizer.steps) == 13 and not amortizer.wants_gram()


@pytest.mark.parametrize("what", ["refresh_gram", "safeguard"])
def test_a_linear_layers_token_rows_are_sampled_across_positions(what):
    """A CLinear on (32 sequences, 64 positions, 1 feature), every 8th position an edge
    value: the refresh Gram's 64 of 2,048 rows and the safeguard's 256 are strided at a step
    coprime with the row count, so they see every position; at the stride of 32 (or 8) they
    would see positions 0 and 32 (or every 8th) only — the edge. Against the same layer
    reading all rows."""
    torch.manual_seed(0)
    layer = cx.CLinear(1, 4, ridge=1e-3, dtype=torch.float64)
    if what == "refresh_gram":     # a fresh, undamped Gram every step: only the sample differs
        options = dict(every=1, decay=0.0, damping=0.0, safeguard_columns=None)
        sampled, whole = options, dict(options, gram_oversample=None)
    else:                          # the Gram of all rows; step 2 measures its energy on rows
        options = dict(every=2, decay=0.0, damping=0.0, gram_oversample=None)
        sampled, whole = options, dict(options, safeguard_columns=10 ** 6)
    a = cx.amortize(copy.deepcopy(layer), exact_when_cheaper=False, **sampled)
    b = cx.amortize(copy.deepcopy(layer), exact_when_cheaper=False, **whole)
    for edge in (0.0, 10.0):
        x = 1 + 0.1 * torch.randn(32, 64, 1, dtype=torch.float64)
        x[:, ::8] = edge
        dz = torch.randn(32, 64, 4, dtype=torch.float64)
        for m in (a, b):
            m.zero_grad()
            m(x).backward(dz)
    assert int(a.amortizer.steps) == 2
    err = (a.weight.grad - b.weight.grad).norm() / b.weight.grad.norm()
    assert err < 0.1, float(err)
