"""Two gloo ranks on this machine give the single-process update on the concatenated batch.

One spawn runs every scenario (starting processes is the slow part); rank 0 saves what each
produced and the test compares it with references computed here, in one process.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import consequential_ext as cx
from relative_error import rel_err
from ddp_harness import spawn_ranks

WORLD = 2
PER_RANK = 5  # samples per rank; < D of the conv layer, so one process would pick columns
RIDGE = 1e-2
LR = 0.5
# A Gram every step and the row side always, as under DDP; no safeguard (it measures each
# rank's own samples, so it would differ from one process on the concatenated batch).
AMORTIZE = {"every": 2, "decay": 0.5, "gram_every": 1, "safeguard_columns": None,
            "exact_when_cheaper": False}


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6), nn.Tanh(), nn.Linear(6, 3))
    return cx.consequentialize(model, ridge=RIDGE)


def _batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(WORLD * PER_RANK, 3, 5, 5, generator=gen),
            torch.randn(WORLD * PER_RANK, 3, generator=gen))


class _Recurrent(nn.Module):
    """A two-layer bidirectional GRU (its Grams summed across ranks: per layer the input
    rows' one, shared by both directions, and each direction's states') and a head."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, num_layers=2, bidirectional=True,
                                     batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _recurrent_model():
    torch.manual_seed(0)
    return cx.consequentialize(_Recurrent(), ridge=RIDGE)


def _sequences():
    gen = torch.Generator().manual_seed(2)
    return (torch.randn(WORLD * PER_RANK, 6, 3, generator=gen),
            torch.randn(WORLD * PER_RANK, 3, generator=gen))


_AMORTIZE_RECURRENT = dict(AMORTIZE, exact_when_cheaper=True)

# Rank 0 one sequence: 6 rows, fewer than the 9 columns of the GRU's second-layer W_ih
# (float64 there in one process); rank 1 the other nine: 54 rows.
_UNEVEN = (slice(0, 1), slice(1, WORLD * PER_RANK))


def _world_summed_loss(model, x, t):
    # DDP averages over the ranks: WORLD × each rank's summed loss gives the gradient of
    # the summed loss on the concatenated batch, whatever the ranks' batch sizes.
    return WORLD * _summed_loss(model, x, t)


def _loss(model, x, t):
    return 0.5 * (model(x) - t).square().sum(-1).mean()


def _summed_loss(model, x, t):
    return 0.5 * (model(x) - t).square().sum()      # an empty batch adds 0, not a NaN mean


def _step(model, x, t, loss=_loss):
    """Gradients after one backward, and the parameters after one SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad()
    loss(model, x, t).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def _full(module):
    """A parameter list with FSDP's shards gathered back into full tensors."""
    return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in module]


def _worker(rank):
    x, t = _batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    ddp = nn.parallel.DistributedDataParallel(_model())
    results["ddp"] = _step(ddp, x[mine], t[mine])
    seq, target = _sequences()
    ddp = nn.parallel.DistributedDataParallel(_recurrent_model())
    results["ddp_recurrent"] = _step(ddp, seq[mine], target[mine])
    ddp = nn.parallel.DistributedDataParallel(_recurrent_model())
    results["ddp_recurrent_uneven"] = _step(ddp, seq[_UNEVEN[rank]], target[_UNEVEN[rank]],
                                            _world_summed_loss)
    # amortised: rank 0's 6 rows of the second layer's W_ih (9 columns) would take the exact
    # solve in one process; under DDP every rank folds the global Gram instead
    ddp = nn.parallel.DistributedDataParallel(cx.amortize(_recurrent_model(),
                                                          **_AMORTIZE_RECURRENT))
    for scale in (1.0, 3.0):
        results["ddp_recurrent_amortized"] = _step(ddp, scale * seq[_UNEVEN[rank]],
                                                   target[_UNEVEN[rank]], _world_summed_loss)
    ddp = nn.parallel.DistributedDataParallel(_model())
    with cx.distributed.gram_sync(False):
        results["ddp_local_gram"] = _step(ddp, x[mine], t[mine])
    ddp = nn.parallel.DistributedDataParallel(cx.amortize(_model(), **AMORTIZE))
    for scale in (1.0, 3.0):  # a second step folds a different Gram into the EMA
        results["ddp_amortized"] = _step(ddp, scale * x[mine], t[mine])
    some = slice(0, PER_RANK if rank == 0 else 0)   # rank 1's batch is empty
    for amortize in (False, True):   # float64: one process takes the other solve side
        model = cx.amortize(_model().double(), **AMORTIZE) if amortize else _model().double()
        ddp = nn.parallel.DistributedDataParallel(model)
        results["ddp_empty_rank", amortize] = _step(ddp, x[some].double(), t[some].double(),
                                                    _summed_loss)
    try:
        from torch.distributed.fsdp import fully_shard
        model = _model()
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fully_shard(layer)
        fully_shard(model)
        grads, params = _step(model, x[mine], t[mine])
        results["fsdp"] = (_full(grads), _full(params))
    except Exception as error:  # noqa: BLE001  (reported to the parent, which skips)
        results["fsdp"] = f"{type(error).__name__}: {error}"
    return results


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory)


def _assert_close_lists(actual, expected):
    """Norm-wise, at float32 tolerance: one process in float32 is itself ~2e-5 from float64
    here (the solves amplify rounding by the condition number), entry-wise checks would
    trip on entries near zero."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape, (i, a.shape, e.shape)
        assert rel_err(a, e) < 1e-4, f"tensor {i}: relative error {rel_err(a, e):.2e}"


def test_ddp_equals_one_process_on_concatenated_batch(two_rank_results):
    grads, params = two_rank_results["ddp"]
    x, t = _batch()
    ref_grads, ref_params = _step(_model(), x, t)
    _assert_close_lists(grads, ref_grads)
    _assert_close_lists(params, ref_params)


def test_ddp_recurrent_layer_equals_one_process_on_concatenated_batch(two_rank_results):
    """A GRU's Grams (N = steps × sequences) are summed across ranks as a Linear's are."""
    seq, target = _sequences()
    expected = _step(_recurrent_model(), seq, target)
    for actual, want in zip(two_rank_results["ddp_recurrent"], expected):
        _assert_close_lists(actual, want)


def test_ddp_recurrent_ranks_on_either_side_of_n_below_d_agree(two_rank_results):
    """Rank 0's rows of the second layer's W_ih are fewer than its columns, rank 1's are not:
    both still all-reduce the same Gram dtype (rank 0 float64 and rank 1 float32 aborted
    gloo: 'Received data size doesn't match expected size'), and the update is one
    process's on the concatenated batch."""
    seq, target = _sequences()
    expected = _step(_recurrent_model(), seq, target, _summed_loss)
    for actual, want in zip(two_rank_results["ddp_recurrent_uneven"], expected):
        _assert_close_lists(actual, want)


def test_ddp_amortized_recurrent_layer_uses_the_global_running_grams(two_rank_results):
    """Each weight's running Gram is the concatenated batch's, on the rank whose own rows are
    fewer than the columns too (one process on its batch alone would solve exactly)."""
    seq, target = _sequences()
    model = cx.amortize(_recurrent_model(), **_AMORTIZE_RECURRENT)
    for scale in (1.0, 3.0):
        expected = _step(model, scale * seq, target, _summed_loss)
    assert int(model.rnn.amortizer.weight_ih_l1.steps) == 2
    for actual, want in zip(two_rank_results["ddp_recurrent_amortized"], expected):
        _assert_close_lists(actual, want)


def test_ddp_without_gram_sync_averages_per_rank_solves(two_rank_results):
    grads, _ = two_rank_results["ddp_local_gram"]
    x, t = _batch()
    per_rank = [_step(_model(), x[r * PER_RANK:(r + 1) * PER_RANK],
                      t[r * PER_RANK:(r + 1) * PER_RANK])[0] for r in range(WORLD)]
    expected = [sum(gs) / WORLD for gs in zip(*per_rank)]
    _assert_close_lists(grads, expected)
    # and it is a different update: the synchronised one uses the global Gram
    synced, _ = two_rank_results["ddp"]
    assert rel_err(grads[0], synced[0]) > 1e-2


def test_ddp_amortized_uses_the_global_running_gram(two_rank_results):
    grads, params = two_rank_results["ddp_amortized"]
    x, t = _batch()
    model = cx.amortize(_model(), **AMORTIZE)
    for scale in (1.0, 3.0):
        ref_grads, ref_params = _step(model, scale * x, t)
    _assert_close_lists(grads, ref_grads)
    _assert_close_lists(params, ref_params)


@pytest.mark.parametrize("amortize", [False, True])
def test_ddp_rank_with_an_empty_batch_joins_and_adds_nothing(two_rank_results, amortize):
    """The empty rank joins every Gram all-reduce with a zero Gram and N = 0: the global
    A is rank 0's alone, the empty rank's matched gradient is 0 (not 0/0), and DDP's average
    is half of one process's update on rank 0's batch."""
    grads, _ = two_rank_results["ddp_empty_rank", amortize]
    x, t = (v[:PER_RANK].double() for v in _batch())
    model = cx.amortize(_model().double(), **AMORTIZE) if amortize else _model().double()
    ref_grads, _ = _step(model, x, t, _summed_loss)
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want / WORLD) < 1e-9


def test_fsdp_fully_shard_equals_one_process(two_rank_results):
    result = two_rank_results["fsdp"]
    if isinstance(result, str):
        pytest.skip(f"fully_shard does not run on CPU/gloo here: {result}")
    grads, params = result
    x, t = _batch()
    ref_grads, ref_params = _step(_model(), x, t)
    _assert_close_lists(grads, ref_grads)
    _assert_close_lists(params, ref_params)


def test_gram_sync_rejects_non_bool():
    with pytest.raises(TypeError, match="enabled"):
        with cx.distributed.gram_sync("no"):
            pass


@pytest.mark.parametrize("group", [3, "world"])
def test_gram_sync_rejects_a_group_that_is_no_process_group(group):
    """Refused on entry: under a process group, backward used to fail inside
    torch.distributed ("'int' object has no attribute 'size'"), naming no argument."""
    with pytest.raises(TypeError, match="gram_sync: group must be a torch.distributed "
                                        "ProcessGroup or None"):
        with cx.distributed.gram_sync(group=group):
            pass


def test_no_process_group_means_local_solve():
    assert not dist.is_initialized()
    assert cx.distributed.gram_group() is None
    gram = torch.randn(3, 3)
    torch.testing.assert_close(cx.distributed.PendingGram(gram.clone(), 4).wait(), gram / 4)


def test_gram_sync_takes_the_group_new_group_gives_a_rank_outside_it():
    """dist.new_group gives a rank outside its ranks GroupMember.NON_GROUP_MEMBER (an int);
    torch.distributed takes it (world size -1), so that rank's solve stays local."""
    model = cx.consequentialize(nn.Sequential(nn.Linear(4, 3)))
    with cx.distributed.gram_sync(group=dist.GroupMember.NON_GROUP_MEMBER):
        model(torch.randn(8, 4)).sum().backward()
    assert model[0].weight.grad.isfinite().all()
