"""A deadline on work the calling thread does in user code (a reward function call), enforced
by one watchdog thread: past it, the work is reported by name and the process exits.

    watchdog = Watchdog(on_expiry=report)            # report(text) says what overran
    with watchdog.limit(30.0, lambda: "reward function f on sample 7"):
        f(...)

A thread stuck in user code (an HTTP call that never returns, a deadlock) cannot be stopped
from outside; the process is. Its supervisor then handles it as a dead process: a rollout
replica's prompts go to the other replicas. The heartbeat alone would not notice: it runs in
its own thread and keeps beating while the work hangs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_DEADLINE = 1  # an ordinary failure: a restart may well succeed (a hung service)


class Watchdog:
    """Deadlines on one thread's calls, one at a time (the last `limit` entered counts)."""

    def __init__(self, on_expiry: Callable[[str], None]) -> None:
        self._on_expiry = on_expiry
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._what: Callable[[], str] = str
        self._seconds = 0.0
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    @contextmanager
    def limit(self, seconds: float, what: Callable[[], str]) -> Iterator[None]:
        """The block must end within `seconds` (0: no limit); `what()` names it if it does not."""
        if seconds <= 0:
            yield
            return
        with self._cond:
            self._deadline, self._what, self._seconds = time.monotonic() + seconds, what, seconds
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                text = f"{self._what()} did not return within {self._seconds:g} s"
                break
        self._on_expiry(text)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_DEADLINE)  # the stuck thread cannot be stopped; the process can
