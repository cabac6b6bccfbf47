"""What a worker process is doing now, and how long it has spent doing each kind of thing.

A worker holds one `Activity`. Its loop says what it does (`with activity.doing("generating",
"8 prompts"):` or `activity.set("idle", "waiting for prompts")`); the heartbeat thread publishes
`activity.snapshot()` as the value of the worker's heartbeat key, so `python -m gantry status`
can show what every process does and for how long, and a step's metrics can report the time a
process spent per state (idle fractions) from `activity.take_totals()`.

States are short fixed words (below); the detail is free text ("sync 4, waiting for rollout 1").
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# The states a worker can report. "idle" is time with no work to do (waiting for prompts, a
# batch, or a command): the idle fractions of the metrics are computed from it.
STATES = (
    "starting",
    "idle",
    "generating",
    "scoring",
    "training",
    "validating",
    "syncing",
    "checkpointing",
    "exporting",
    "stopping",
)


class Activity:
    """The current state of one process (thread-safe) and the seconds spent in each state."""

    def __init__(self, role: str, replica: str, rank: int = 0, host: str = "") -> None:
        self._identity = {
            "role": role,
            "replica": replica,
            "rank": rank,
            "host": host,
            "pid": os.getpid(),
        }
        self._lock = threading.Lock()
        self._state, self._detail = "starting", ""
        self._since = time.monotonic()
        self._since_wall = time.time()
        self._deadline: tuple[float, str] = (0.0, "")  # of the current state (gantry.run.deadline)
        self._totals: dict[str, float] = {}
        self._fields: dict[str, object] = {}

    def set(self, state: str, detail: str = "", deadline: tuple[float, str] = (0.0, "")) -> None:
        """Enter `state` now; the time since the last change is counted to the previous state.
        `deadline`: (seconds, why) the state may last (0: no limit), published with it."""
        if state not in STATES:
            raise ValueError(f"activity state {state!r} is not one of {', '.join(STATES)}")
        with self._lock:
            now = time.monotonic()
            self._totals[self._state] = self._totals.get(self._state, 0.0) + now - self._since
            self._state, self._detail, self._deadline = state, detail, deadline
            self._since, self._since_wall = now, time.time()

    @contextmanager
    def doing(
        self,
        state: str,
        detail: str = "",
        then: str = "idle",
        deadline: tuple[float, str] = (0.0, ""),
    ) -> Iterator[None]:
        """`state` for the block, then `then` (idle by default), also when the block raises."""
        self.set(state, detail, deadline)
        try:
            yield
        finally:
            self.set(then)

    def note(self, **fields: object) -> None:
        """Facts published with the state (e.g. policy_version=3); JSON-serialisable values."""
        with self._lock:
            self._fields.update(fields)

    @property
    def state(self) -> str:
        return self._state

    def take_totals(self) -> dict[str, float]:
        """Seconds per state since the last call (the current state counted up to now)."""
        with self._lock:
            now = time.monotonic()
            totals = dict(self._totals)
            totals[self._state] = totals.get(self._state, 0.0) + now - self._since
            self._totals, self._since = {}, now
            return totals

    def snapshot(self) -> dict:
        """What the heartbeat publishes: identity, state, detail, since (unix time), the
        state's deadline (seconds from `since`, and why; 0: none), fields."""
        with self._lock:
            return {
                **self._identity,
                "state": self._state,
                "detail": self._detail,
                "since": self._since_wall,
                "beat": time.time(),
                "deadline_s": self._deadline[0],
                "deadline_why": self._deadline[1],
                **self._fields,
            }

    def encode(self) -> bytes:
        return json.dumps(self.snapshot()).encode()


def decode_heartbeat(value: bytes | str | None) -> dict | None:
    """A heartbeat key's value as published by `Activity.encode`; None for a bare beat (b"1")
    or a missing key."""
    if not value:
        return None
    try:
        record = json.loads(value)
    except ValueError:  # a bare beat written by a process without an Activity
        return None
    return record if isinstance(record, dict) else None
