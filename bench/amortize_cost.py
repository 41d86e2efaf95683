"""Cost of amortised C-SGD on a 4-conv net: forward+backward of plain (nn layers), exact
C-layers and ``cx.amortize``-d C-layers, side by side in CPU process time.

    python -m bench.amortize_cost                     # batch 128, 32 px, every=10
    python -m bench.amortize_cost --pools 1 2 --blocks 7  # max-pools after convs 2 and 3

One sample is a block of ``every`` consecutive forward+backward calls (one whole refresh
period, so the amortised refresh step is in every sample); blocks of the three candidates are
interleaved round-robin (``timing.interleaved`` with ``time.process_time``), and the table
gives the median seconds per call and the ratios of medians.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import consequential_ext as cx

from .record import MIN_REPS, at_least
from .timing import interleaved, summarize


def four_conv_net(channels=(3, 16, 32, 64, 64), num_classes=10, pools=()) -> nn.Sequential:
    """3×3 convs 3→16→32→64→64 (padding 1, ReLU), a 2×2 max-pool after each conv whose
    index (0-based) is in ``pools``, global average pool, one linear classifier."""
    layers = []
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
        if i in pools:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes)]
    return nn.Sequential(*layers)


def _block(model, x, y, calls):
    def run():
        for _ in range(calls):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    return run


def measure(batch=128, size=32, every=10, blocks=5, pools=(), seed=0) -> dict:
    """Median process seconds per forward+backward of each candidate, and the ratios."""
    torch.manual_seed(seed)
    plain = four_conv_net(pools=pools)
    exact = cx.consequentialize(copy.deepcopy(plain))
    amortized = cx.amortize(cx.consequentialize(copy.deepcopy(plain)), every=every)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    candidates = {name: _block(model, x, y, every) for name, model in
                  (("plain", plain), ("exact", exact), ("amortized", amortized))}
    times, _wall = interleaved(candidates, blocks, warmup=1)  # CPU process time
    per_call = {name: summarize(ts).median / every for name, ts in times.items()}
    return {"seconds": per_call,
            "amortized/exact": per_call["amortized"] / per_call["exact"],
            "exact/plain": per_call["exact"] / per_call["plain"],
            "amortized/plain": per_call["amortized"] / per_call["plain"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=at_least(1), default=128)
    parser.add_argument("--size", type=at_least(1), default=32, help="image side in pixels")
    parser.add_argument("--every", type=at_least(1), default=10, help="cx.amortize(every=...)")
    parser.add_argument("--blocks", type=at_least(MIN_REPS), default=5,
                        help=f"timed blocks per candidate (≥ {MIN_REPS})")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch.set_num_threads")
    parser.add_argument("--pools", type=int, nargs="*", default=[], choices=range(4),
                        help="conv indices (0-3) followed by a 2×2 max-pool; default none")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.batch, args.size, args.every, args.blocks, tuple(args.pools))
    print(f"4-conv net (pools after {args.pools or 'none'}), batch {args.batch}, "
          f"{args.size} px, every={args.every}, "
          f"{args.threads} thread(s), {args.blocks} blocks of {args.every} calls; "
          f"CPU process time per forward+backward (median):")
    print("| candidate | ms | × plain |\n|---|---|---|")
    for name, seconds in result["seconds"].items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / result['seconds']['plain']:.2f} |")
    print(f"amortized / exact = {result['amortized/exact']:.2f}")
    return result


if __name__ == "__main__":
    main()
