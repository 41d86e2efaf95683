"""Running a test's worker on several gloo ranks on one machine and collecting rank 0's results.

The ranks meet through a file store (no TCP port that another process could take between
choosing and binding it), every gloo wait has a timeout, and the parent waits with a deadline:
a rank stuck anywhere fails the test within minutes, where it once held CI until its 90 minutes
ran out."""
import datetime
import gc
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT = datetime.timedelta(seconds=90)  # one collective or store wait
RUN_DEADLINE_S = 300        # a whole run, start-up (imports, compiles) included
TEARDOWN_GRACE_S = 30       # after rank 0 has saved, for the ranks to exit
ATTEMPTS = 2                # a run that hangs before saving is tried once more


def _rank_main(rank: int, worker, world: int, store_path: str, out_path: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world, timeout=GLOO_TIMEOUT)
    try:
        results = worker(rank)
        # DDP's Reducer holds the group and lets go of it with the GIL held: were that the last
        # reference, the group's destructor would join its gloo thread while that thread waits
        # for the GIL to free a finished work (a deadlock; it held a CI run to its time limit).
        # The worker's models are gone once it returns; collecting their cycles now leaves the
        # group's last reference to destroy_process_group, which lets go of the GIL.
        gc.collect()
        if rank == 0:  # whole or not at all (a rename), before the ranks tear down
            torch.save(results, out_path + ".part")
            os.replace(out_path + ".part", out_path)
        # A rank that leaves while its peer's gloo threads still talk to it makes the peer abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(worker, world: int, folder) -> str:
    """One run of ``worker`` on ``world`` ranks: 'saved' once rank 0's results are complete,
    'hung' when the deadline passed without them."""
    out_path = folder / "results.pt"
    ranks = mp.spawn(_rank_main, args=(worker, world, str(folder / "store"), str(out_path)),
                     nprocs=world, join=False)
    start, saved_at = time.monotonic(), None
    try:
        while True:
            try:
                if ranks.join(timeout=1.0):
                    return "saved"
            except mp.ProcessExitedException as error:
                # gloo can abort a rank while the group is torn down (std::terminate from a
                # background thread) after rank 0 has saved: the results are complete then.
                if error.signal_name == "SIGABRT" and out_path.exists():
                    return "saved"
                raise
            now = time.monotonic()
            if out_path.exists():
                saved_at = saved_at or now
                if now - saved_at > TEARDOWN_GRACE_S:  # stuck in teardown, results complete
                    return "saved"
            elif now - start > RUN_DEADLINE_S:
                return "hung"
    finally:
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
                process.join()


def spawn_ranks(worker, world: int, tmp_path_factory):
    """What ``worker(rank)`` returned on rank 0, run on ``world`` processes in one gloo group
    (one thread each). The worker must return plain results (tensors, not models)."""
    for attempt in range(1, ATTEMPTS + 1):
        folder = tmp_path_factory.mktemp("dist")
        if _run(worker, world, folder) == "saved":
            return torch.load(folder / "results.pt", weights_only=False)
        warnings.warn(f"{world} gloo ranks hung past {RUN_DEADLINE_S} s without saving "
                      f"(attempt {attempt} of {ATTEMPTS})", RuntimeWarning)
    pytest.fail(f"{world} gloo ranks hung {ATTEMPTS} times without saving their results")
