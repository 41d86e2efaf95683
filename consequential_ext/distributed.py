"""Sum each layer's Gram and sample count across ranks in backward (docs/design.md §2, DDP).

Under an initialised ``torch.distributed`` process group every rank solves with the global
second moment ``A = Σ_r gram_r / Σ_r N_r``, so ``G_r (A + λI)⁻¹`` is linear in the rank's
own gradient ``G_r`` and DDP's average over equal-size ranks equals the single-process
update on the concatenated batch. The all-reduce is launched as soon as a layer's Gram is
built and waited on just before its solve, so it overlaps whatever runs in between: a
Linear layer's ordinary gradient; a conv layer usually has its ordinary gradient already
(from the input gradient's conv backward or the CPU Gram kernel's pass), so nothing.

Every rank must run the backward of the same C-layers in the same order (as DDP already
requires); a layer used on some ranks only would leave the others waiting.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ._blocks import BlockSetting

__all__ = ["gram_sync", "gram_group", "PendingGram"]

# (enabled, group): process-global, not thread-local (``_blocks.py``): CUDA backward runs on
# autograd's device threads. Group None: the default (world) group.
_sync = BlockSetting((True, None))
_NON_GROUP_MEMBER = getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None)


@contextlib.contextmanager
def gram_sync(enabled: bool = True, *, group=None):
    """Within this block, backward sums Grams over ``group`` (default: world) when a process
    group is initialised; ``enabled=False`` keeps each rank's Gram local. The setting in
    effect when ``backward`` runs is the one that counts; with blocks open in several
    threads, the newest open one's. Raises TypeError for an ``enabled`` that is no bool or a
    ``group`` that is neither None nor a ProcessGroup (checked here: backward would fail on it
    inside torch.distributed); ``dist.new_group``'s ``GroupMember.NON_GROUP_MEMBER`` (on a rank
    outside the group) is taken, and that rank solves locally."""
    if not isinstance(enabled, bool):
        raise TypeError(f"gram_sync: enabled must be a bool, got {enabled!r}")
    # getattr: a torch built without distributed support has no ProcessGroup (nor groups)
    # NON_GROUP_MEMBER: what dist.new_group gives a rank outside it (torch.distributed takes
    # it: that rank's solve stays local)
    if group is not None and not isinstance(group, getattr(dist, "ProcessGroup", ())) \
            and not (type(group) is int and group == _NON_GROUP_MEMBER):
        raise TypeError(f"gram_sync: group must be a torch.distributed ProcessGroup or None, "
                        f"got {group!r}")
    with _sync.block((enabled, group)):
        yield


def gram_group():
    """The group Grams are summed over in this backward, or None for a local solve."""
    enabled, group = _sync.value
    if not enabled or not dist.is_available() or not dist.is_initialized():
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class PendingGram:
    """A layer's Gram on its way to ``Σ_r gram_r / Σ_r N_r``: ``wait()`` gives that mean.

    gram: unnormalised Σ x xᵀ of this rank, any shape, handed over: ``wait()`` divides it
    (or, across ranks, the summed copy) in place — a backward's Gram is fresh, and a second
    D × D tensor per layer and step costs an allocation and its page faults; count: this
    rank's N.
    """

    def __init__(self, gram: torch.Tensor, count: int, group=None):
        self._shape = gram.shape
        self._work = None
        if group is None:
            self._gram, self._count = gram, count
            return
        # One collective carries both sums; N stays exact in float32 up to 2^24 samples.
        self._packed = torch.cat([gram.reshape(-1), gram.new_full((1,), float(count))])
        self._work = dist.all_reduce(self._packed, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        # No samples anywhere: the Gram is a sum over nothing, A = 0 (not 0/0), and G = 0.
        if self._work is None:
            return self._gram.div_(max(self._count, 1))
        self._work.wait()
        return self._packed[:-1].div_(self._packed[-1].clamp_min(1)).reshape(self._shape)
