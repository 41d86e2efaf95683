"""Threads: a solve's escalation is reported in the thread that ran it, and process-global
``with`` settings (use_backend, gram_sync) end with their last open block, whichever order
threads close them in."""
import threading
import warnings

import pytest
import torch

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
        values = [(False, None), (True, "group b"), (False, "group c")]
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
