"""Running a test's worker on several gloo ranks on 127.0.0.1 and collecting rank 0's results."""
import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_results(results, out_path: str):
    """Rank 0's results, written whole or not at all (a rename), before the ranks tear down."""
    torch.save(results, out_path + ".part")
    os.replace(out_path + ".part", out_path)


def spawn_ranks(worker, world: int, tmp_path_factory):
    """``worker(rank, port, out_path)`` on ``world`` processes; what rank 0 saved to out_path
    with ``save_results``."""
    out_path = tmp_path_factory.mktemp("dist") / "results.pt"
    try:
        mp.spawn(worker, args=(free_port(), str(out_path)), nprocs=world, join=True)
    except mp.ProcessExitedException as error:
        # gloo can still abort a rank while the process group is torn down (std::terminate from
        # a background thread; seen once in a CI run of the whole suite) after every collective
        # has completed and rank 0 has saved: the results are complete then. An abort before
        # that leaves no file.
        if error.signal_name != "SIGABRT" or not out_path.exists():
            raise
    return torch.load(out_path, weights_only=False)
