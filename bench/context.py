"""What every section receives: where to write, quick or full, seeds, device, progress."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm


@dataclass
class Context:
    out: Path
    quick: bool
    seeds: int | None = None      # overrides a section's own number of seeds
    device: str = "cpu"

    def pick(self, quick, full):
        return quick if self.quick else full

    def n_seeds(self, quick: int, full: int) -> int:
        return self.seeds if self.seeds is not None else self.pick(quick, full)

    def progress(self, iterable=None, desc="", total=None):
        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False,
                    dynamic_ncols=True)

    def plot_path(self, name: str) -> Path:
        path = self.out / "plots" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
