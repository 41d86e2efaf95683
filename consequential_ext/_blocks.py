"""A process-global setting that ``with`` blocks change (``ops.use_backend``,
``distributed.gram_sync``): process-global because backward may run on autograd's device
threads, which would not see a thread-local value. Blocks opened in several threads may close
in any order, so a block does not restore the value it saw on entry (that would leave a closed
block's value behind): the newest block still open is in force, the default when none is."""
from __future__ import annotations

import contextlib
import threading


class BlockSetting:
    def __init__(self, default):
        self.value = self._default = default
        self._open = []            # (token, value) of the open blocks, oldest first
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def block(self, value):
        token = object()
        with self._lock:
            self._open.append((token, value))
            self.value = value
        try:
            yield
        finally:
            with self._lock:
                self._open = [b for b in self._open if b[0] is not token]
                self.value = self._open[-1][1] if self._open else self._default
