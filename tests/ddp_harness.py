"""Running a test's worker on several gloo ranks on 127.0.0.1 and collecting rank 0's results."""
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, tmp_path_factory):
    """``worker(rank, port, out_path)`` on ``world`` processes; what rank 0 saved to out_path."""
    out_path = tmp_path_factory.mktemp("dist") / "results.pt"
    mp.spawn(worker, args=(free_port(), str(out_path)), nprocs=world, join=True)
    return torch.load(out_path, weights_only=False)
