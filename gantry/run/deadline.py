"""Deadlines on the units of work a process takes (a generate call, a reward function call, a
policy step, a weight sync, a checkpoint save, an export), enforced by one watchdog thread:
past one, the unit is reported by name and the process exits.

    watchdog = Watchdog(on_expiry=report)            # report(text) says what overran
    with watchdog.limit(30.0, lambda: "reward function f on sample 7"):
        f(...)

    units = Units(activity, watchdog, Deadlines.from_config(config.fault_tolerance))
    with units.run("generate", "generating", "16 prompts (weights v7)", work=tokens):
        engine.generate(...)                         # limited, timed, shown in the heartbeat

A thread stuck in user code or a peer's collective (an HTTP call that never returns, a deadlock,
a broadcast whose peer hung) cannot be stopped from outside; the process is. Its supervisor then
handles it as a dead process: a rollout replica's prompts go to the other replicas, a policy
process makes the run start again. The heartbeat alone would not notice: it runs in its own
thread and keeps beating while the work hangs. A process stopped as a whole (SIGSTOP) stops its
watchdog too: that one is caught by its heartbeat lapsing (the controller and the launcher).

The deadline of a unit (`Deadlines.seconds_for`), per kind of unit:
    first unit of the kind:  fault_tolerance.first_deadline_s (compilation, warm-up, first I/O)
    later ones:              max(fault_tolerance.deadline_floor_s,
                                 fault_tolerance.deadline_factor x the slowest rate so far x work)
where the rate of a unit is its seconds per unit of `work` (a policy step's tokens, a generate
call's prompts; 1 for a checkpoint), and a kind may add an estimate of its own (a generate
call: its worst case tokens, prompts x n x max_response_length, at the best tokens/s measured).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gantry.run.activity import decode_heartbeat
from gantry.run.runtime import HEARTBEAT_TTL_S

EXIT_DEADLINE = 1  # an ordinary failure: a restart may well succeed (a hung service)


@dataclass
class _Limit:
    expires: float
    seconds: float
    what: Callable[[], str]
    why: str


class Watchdog:
    """Deadlines on calls, from any thread, nested or not: the first limit to expire counts."""

    def __init__(self, on_expiry: Callable[[str], None]) -> None:
        self._on_expiry = on_expiry
        self._cond = threading.Condition()
        self._limits: dict[int, _Limit] = {}
        self._serial = 0
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    @contextmanager
    def limit(self, seconds: float, what: Callable[[], str], why: str = "") -> Iterator[None]:
        """The block must end within `seconds` (0: no limit); `what()` names it if it does not,
        `why` says where the number comes from."""
        if seconds <= 0:
            yield
            return
        with self._cond:
            self._serial += 1
            token = self._serial
            self._limits[token] = _Limit(time.monotonic() + seconds, seconds, what, why)
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                del self._limits[token]

    def _watch(self) -> None:
        with self._cond:
            while True:
                if not self._limits:
                    self._cond.wait()
                    continue
                first = min(self._limits.values(), key=lambda limit: limit.expires)
                left = first.expires - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                break
        text = f"{first.what()} did not return within {first.seconds:g} s"
        try:
            self._on_expiry(text + (f" ({first.why})" if first.why else ""))
        finally:  # also when reporting fails (Redis down): the process must not hang on
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_DEADLINE)  # the stuck thread cannot be stopped; the process can


@dataclass
class Deadlines:
    """The deadline of the next unit of each kind, from the units measured so far."""

    factor: float = 3.0
    floor_s: float = 300.0
    first_s: float = 1800.0
    enabled: bool = True
    slowest: dict[str, float] = field(default_factory=dict)  # kind -> seconds per work unit
    fastest: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, fault_tolerance: Any) -> Deadlines:
        """From the `[fault_tolerance]` section (gantry.config's FaultToleranceConfig)."""
        return cls(
            factor=fault_tolerance.deadline_factor,
            floor_s=fault_tolerance.deadline_floor_s,
            first_s=fault_tolerance.first_deadline_s,
            enabled=fault_tolerance.deadlines,
        )

    def seconds_for(
        self, kind: str, work: float = 1.0, estimate_s: float = 0.0
    ) -> tuple[float, str]:
        """(seconds, why) for a unit of `kind` doing `work`; `estimate_s`: the kind's own
        estimate of a slow case (already multiplied by the factor), counted when larger.
        (0, "") when deadlines are off."""
        if not self.enabled:
            return 0.0, ""
        slowest = self.slowest.get(kind)
        if slowest is None:
            return self.first_s, f"the first {kind}: fault_tolerance.first_deadline_s"
        scaled = self.factor * slowest * max(work, 0.0)
        best = max(scaled, estimate_s, self.floor_s)
        if best == self.floor_s:
            return best, "fault_tolerance.deadline_floor_s"
        if best == scaled:
            return best, f"{self.factor:g} x the slowest {kind} so far, {slowest:.3g} s per unit"
        return best, f"{self.factor:g} x the worst case at the best rate measured"

    def record(self, kind: str, seconds: float, work: float = 1.0) -> None:
        """A unit of `kind` took `seconds` for `work`."""
        rate = seconds / max(work, 1e-9)
        self.slowest[kind] = max(self.slowest.get(kind, 0.0), rate)
        self.fastest[kind] = min(self.fastest.get(kind, rate), rate)

    def best_rate(self, kind: str) -> float | None:
        """The fewest seconds per work unit measured for `kind` (None before the first)."""
        return self.fastest.get(kind)


class Units:
    """A process's units of work: each one's activity state (what its heartbeat says), its
    deadline (the watchdog) and its measured time (the next deadlines)."""

    def __init__(self, activity: Any, watchdog: Watchdog, deadlines: Deadlines) -> None:
        self.activity, self.watchdog, self.deadlines = activity, watchdog, deadlines

    @contextmanager
    def run(
        self,
        kind: str,
        state: str,
        detail: str,
        *,
        work: float = 1.0,
        estimate_s: float = 0.0,
        extra_s: float = 0.0,
        then: str = "idle",
    ) -> Iterator[None]:
        """Do the block as activity `state` (`detail` says what), within the deadline of
        `kind` for `work` (plus `extra_s`, a bound of its own such as a sync's check-in)."""
        seconds, why = self.deadlines.seconds_for(kind, work, estimate_s)
        if seconds:
            seconds, why = seconds + extra_s, why + (f" + {extra_s:g} s" if extra_s else "")
        started = time.monotonic()
        with (
            self.activity.doing(state, detail, then=then, deadline=(seconds, why)),
            self.watchdog.limit(seconds, lambda: f"{state} {detail}".strip(), why),
        ):
            yield
        self.deadlines.record(kind, time.monotonic() - started, work)


def overdue(snapshot: dict | None, now: float, grace_s: float) -> str | None:
    """What a worker's heartbeat (gantry.run.activity's snapshot) says it has been doing for
    longer than its deadline plus `grace_s` (its own watchdog should have ended it), else None."""
    if not snapshot or not snapshot.get("deadline_s"):
        return None
    running = now - float(snapshot.get("since", now))
    if running <= float(snapshot["deadline_s"]) + grace_s:
        return None
    return (
        f"stuck: {snapshot.get('state', '?')} {snapshot.get('detail', '')}".rstrip()
        + f" running for {running:.0f} s, deadline {float(snapshot['deadline_s']):g} s"
        + (f" ({snapshot['deadline_why']})" if snapshot.get("deadline_why") else "")
    )


def describe(snapshot: dict | None, now: float) -> str:
    """What a worker was last seen doing (its heartbeat), for a message: "while generating 16
    prompts (weights v7), for 45 s (its last heartbeat 31 s ago)"."""
    if not snapshot:
        return "(no heartbeat read from it)"
    doing = f"{snapshot.get('state', '?')} {snapshot.get('detail', '')}".rstrip()
    running = now - float(snapshot.get("since", now))
    beat = now - float(snapshot.get("beat", now))
    return f"while {doing}, for {running:.0f} s (its last heartbeat {beat:.0f} s ago)"


def lapsed_or_overdue(
    seen: dict[Any, dict | None], name: Any, value: bytes | None, grace_s: float = 0.0
) -> str:
    """For a supervisor reading worker `name`'s heartbeat key (`value`; None: lapsed), with
    `seen` its last snapshot per worker: why the worker is lost ("stopped sending heartbeats
    ... while generating ..." once seen and now lapsed, or "stuck: ..." when past its deadline
    by more than `grace_s`, by default two heartbeat TTLs: its own watchdog ends it at the
    deadline, the controller and then the launcher come after), or "" while it is fine."""
    now = time.time()
    if value is None:
        if name not in seen:
            return ""  # not up yet
        return "stopped sending heartbeats (hung or stopped) " + describe(seen[name], now)
    snapshot = seen[name] = decode_heartbeat(value)
    return overdue(snapshot, now, grace_s=grace_s or 2 * HEARTBEAT_TTL_S) or ""


def exit_on_thread_error(report: Callable[[str], None]) -> Callable[[], None]:
    """An exception that ends any thread of this process (the heartbeat's, a background
    sync's) ends the process through `report` (its failure path), not the thread alone:
    a stored error must not leave the process running without it. A thread marked
    `reports_its_errors` (the uploader's: its owner reports its error at close) is left out. Returns what restores the
    previous hook (for the process's orderly end: an engine's threads may raise as it shuts
    down)."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        previous(args)  # the traceback, in the log
        if issubclass(args.exc_type, SystemExit):
            return
        if getattr(args.thread, "reports_its_errors", False):  # its owner raises it later
            return
        name = args.thread.name if args.thread is not None else "a thread"
        try:
            report(f"thread {name}: {args.exc_type.__name__}: {args.exc_value}")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_DEADLINE)

    threading.excepthook = hook

    def restore() -> None:
        threading.excepthook = previous

    return restore
