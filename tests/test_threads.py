"""Threads: a solve's escalation is reported in the thread that ran it, process-global
``with`` settings (use_backend, gram_sync) end with their last open block, whichever order
threads close them in, and a thread's first kernel call keeps that thread's thread count."""
import os
import pathlib
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.distributed as dist

from consequential_ext import distributed, ops
from consequential_ext.ops import reference


def test_an_escalation_is_reported_by_the_thread_whose_solve_needed_it(monkeypatch):
    """Another thread's whole solve runs between this thread's kernel and its read of the
    record: the NaN warning (due every time) must still come in this thread, not in that."""
    reports = []
    original = reference.warn_escalated
    monkeypatch.setattr(reference, "warn_escalated", lambda ridge, lam: (
        reports.append(threading.current_thread().name), original(ridge, lam))[1])
    ns = torch.ops.consequential_ext
    kernel = ns.ridge_solve
    go, done = threading.Event(), threading.Event()

    def kernel_then_yield(*args):
        out = kernel(*args)
        if threading.current_thread().name == "indefinite":
            go.set()
            done.wait(10)
        return out
    monkeypatch.setattr(ns, "ridge_solve", kernel_then_yield)
    grad = torch.randn(3, 6)

    def well_posed():
        go.wait(10)
        ops.ridge_solve(torch.eye(6), grad, 1e-3)
        done.set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=well_posed, name="well posed"),
                   threading.Thread(target=lambda: ops.ridge_solve(-1e12 * torch.eye(6), grad,
                                                                   1e-3), name="indefinite")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert reports == ["indefinite"]


@pytest.mark.parametrize("setting", ["use_backend", "gram_sync"])
def test_settings_follow_the_newest_open_block_whichever_closes_first(setting):
    """Blocks of several threads close in any order (entered and exited by hand here): the
    newest block still open is in force, the default once all have closed."""
    if setting == "use_backend":
        values, enter, value = ["reference", "cpu", "triton"], ops.use_backend, \
            lambda: ops._forced.value
    else:
        # gram_sync takes ProcessGroups only; these two need no initialised process group
        group_b, group_c = (dist.ProcessGroup(dist.HashStore(), 0, 1) for _ in range(2))
        values = [(False, None), (True, group_b), (False, group_c)]
        enter, value = (lambda v: distributed.gram_sync(v[0], group=v[1])), \
            lambda: distributed._sync.value
    default = value()
    a, b, c = (enter(v) for v in values)
    for block in (a, b, c):
        block.__enter__()
    a.__exit__(None, None, None)
    assert value() == values[2]
    c.__exit__(None, None, None)
    assert value() == values[1]
    b.__exit__(None, None, None)
    assert value() == default


# Each scenario on a fresh Python thread (the reset happened once per thread, at this library's
# first at::parallel_for there), in a child process: before the fix a team larger than the
# count the kernel had read wrote past its per-thread slots (a segfault in the tiled kernel,
# a Gram without the helper threads' chunks in the shift kernel).
_FIRST_CALL_ON_A_THREAD = r"""
import threading, torch, torch.nn.functional as F
import consequential_ext
ns = torch.ops.consequential_ext

def cols(x, k, s, p):
    c = F.unfold(x, k, padding=p, stride=s)
    return torch.cat([c.permute(1, 0, 2).reshape(c.shape[1], -1), x.new_ones(1, c.shape[0] * c.shape[2])])

def gram_close(out, x, k, s, p):
    c = cols(x, k, s, p)
    ref = c @ c.T
    return ((out[0] - ref).abs().max() / ref.abs().max()).item() < 1e-12

def grad_close(out, x, gy, k, p):
    c = cols(x, k, 1, p)
    ref = gy.transpose(0, 1).reshape(gy.shape[1], -1) @ c.T
    return ((out[0] - ref).abs().max() / ref.abs().max()).item() < 1e-12

torch.manual_seed(0)
x = torch.randn(100, 16, 12, 12, dtype=torch.float64)  # the shift kernel: 2 chunks on 1 thread
gy = torch.randn(100, 16, 12, 12, dtype=torch.float64)
a = torch.randn(40, 24, 24, dtype=torch.float64)
a, g = a @ a.mT / 24, torch.randn(40, 3, 24, dtype=torch.float64)
args = ((1, 1), (1, 1), (1, 1), 1, True)
SCENARIOS = {
    "shift": lambda: gram_close(ns._im2col_gram_algorithm(x, (3, 3), *args, "shift"), x, 3, 1, 1),
    "tiled": lambda: gram_close(ns.im2col_gram(x[:8], (3, 3), (2, 2), (1, 1), (1, 1), 1, True),
                                x[:8], 3, 2, 1),
    "grouped": lambda: ns._im2col_gram_algorithm(x[:8], (3, 3), *args[:3], 4, True, "grouped")
                       .shape == (4, 37, 37),
    "rows": lambda: (lambda o: gram_close(o[0], x[:, :3], 3, 1, 1) and
                     grad_close(o[1], x[:, :3], gy, 3, 1))(ns._conv_gram_grad(x[:, :3], gy, (3, 3), *args)),
    "conv_gram_grad": lambda: (lambda o: gram_close(o[0], x, 3, 1, 1) and
                               grad_close(o[1], x, gy, 3, 1))(ns._conv_gram_grad(x, gy, (3, 3), *args)),
    "conv_weight_grad": lambda: grad_close(ns._conv_weight_grad(x, gy, (3, 3), *args), x, gy, 3, 1),
    "ridge_solve": lambda: torch.allclose(ns.ridge_solve(a, g, 1e-2, None),
                                          torch.linalg.solve(a + 1e-2 * torch.eye(24, dtype=a.dtype), g.mT).mT,
                                          rtol=0, atol=1e-10),
}

def scenario(name, own, process_wide):
    out = {}
    def victim():
        torch.get_num_threads()  # torch's own per-thread initialisation
        torch.set_num_threads(own)
        setter = threading.Thread(target=torch.set_num_threads, args=(process_wide,))
        setter.start()
        setter.join()
        out["correct"] = SCENARIOS[name]()
        out["threads"] = torch.get_num_threads()
    t = threading.Thread(target=victim)
    t.start()
    t.join()
    ok = out == {"correct": True, "threads": own}
    print(("ok" if ok else "FAILED"), name, own, process_wide, out, flush=True)

for name in SCENARIOS:
    for own, process_wide in ((1, 3), (3, 1)):
        scenario(name, own, process_wide)
"""


def test_a_threads_first_kernel_call_keeps_its_thread_count():
    """A thread set to 1 thread while another thread set the process-wide count to 3 (and the
    reverse): each kernel's first call there is correct (float64 unfold / linalg.solve) and
    leaves the thread's own count as it was."""
    root = pathlib.Path(__file__).parent.parent
    run = subprocess.run([sys.executable, "-c", _FIRST_CALL_ON_A_THREAD], cwd=root,
                         env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 14 and all(line.startswith("ok ") for line in lines), run.stdout
