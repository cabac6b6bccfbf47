"""Child processes of a run: started with their output kept in logs/ (and shown, filtered, by
gantry.launch.console), watched, stopped.

Each child runs in its own session and process group, so that a terminal's Ctrl-C reaches the
launcher alone (which then stops the run in order) and stopping a child also stops what it
started. Processes are found by the pids we started and their descendants in /proc
(gantry.launch.lifeline), never by name: what a child started in a session of its own
(torchrun's ranks) is killed with it, and so is a stopped (SIGSTOPped, hung) process, which
SIGTERM cannot end.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gantry.launch import lifeline
from gantry.launch.console import Console, cause_of, emit

STOP_GRACE_S = 10.0
EXIT_RESTARTED = 75  # wait() gave up because the run is being started again
DRAIN_TIMEOUT_S = 60.0
CHECK_INTERVAL_S = 2.0  # how often the process trees are looked at and `hung` is asked


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    args: list[str]
    env: dict[str, str] | None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    reader: threading.Thread | None = None
    tree: list[lifeline.Ident] = field(default_factory=list)  # descendants last seen


@dataclass
class Failure:
    """Why the run stopped: which process, and the line of its log that says why."""

    name: str
    how: str
    cause: str
    log: Path


class ProcessGroupSupervisor:
    def __init__(self, log_dir: Path, console: Console | None = None) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.console = console or Console(verbose=True, tty=False)
        self.children: dict[str, Child] = {}
        self.failure: Failure | None = None
        self._checked = 0.0

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        full = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        full.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # tqdm bars garble prefixed logs
        full[lifeline.LAUNCHER_ENV] = lifeline.launcher_identity()  # children die with us
        process = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=full,
            start_new_session=True,
        )
        child = Child(name, process, args, env)
        child.reader = threading.Thread(target=self._pump, args=(child,), daemon=True)
        child.reader.start()
        self.children[name] = child
        return child

    def _pump(self, child: Child) -> None:
        width = max(len(n) for n in [*self.children, child.name])
        # Appended: a restarted run's processes continue the logs of the attempt before.
        log = self._log_path(child.name).open("a")
        try:
            for line in child.process.stdout:
                with contextlib.suppress(OSError):  # a full disk: the console still shows it
                    log.write(line)
                    log.flush()
                child.tail.append(line)
                self.console.child_line(child.name, width, line)
        finally:
            with contextlib.suppress(OSError):
                log.close()

    def wait(
        self,
        main: str | None,
        expendable: Callable[[str], bool] = lambda name: False,
        on_lost: Callable[[str, str], None] = lambda name, how: None,
        stop_when: Callable[[], bool] = lambda: False,
        restart: Callable[[str, int], bool] = lambda name, code: False,
        hung: Callable[[str], bool | str] = lambda name: False,
    ) -> int:
        """Block until `main` exits 0 and the others follow (0; with no `main`, until every
        child exited 0), or a child fails (1), or `stop_when()` (EXIT_RESTARTED). An
        `expendable` child that fails is reported to `on_lost(name, how)` and the run goes
        on, unless every expendable child is gone; another child that fails is started again
        when `restart(name, exit code)` says so, the others running on. A live child that
        `hung(name)` says stopped working (its heartbeat lapsed) is killed, and then counts
        as failed like any other; a string from `hung` says why (what it was doing)."""
        lost: set[str] = set()
        while True:
            if stop_when():
                return EXIT_RESTARTED
            self._check_trees(hung)
            for child in list(self.children.values()):
                code = child.process.poll()
                if code is None or code == 0 or child.name in lost:
                    continue
                if not expendable(child.name):
                    if not restart(child.name, code):
                        return self._failed(child, code)
                    self._restart(child, code)
                    continue
                lost.add(child.name)
                self._report_death(child, code, "the run goes on without it")
                on_lost(child.name, _how(code))
                if all(n in lost for n in self.children if expendable(n)):
                    emit("[launcher] every expendable process is gone; stopping the run", err=True)
                    return 1
            if main is None:
                if all(c.process.poll() is not None for c in self.children.values()):
                    return 0  # every one exited, the failed ones expendable
            elif self.children[main].process.poll() == 0:
                return self._drain(main, lost)
            time.sleep(0.2)

    def _check_trees(self, hung: Callable[[str], bool | str]) -> None:
        """Every CHECK_INTERVAL_S: note each live child's descendants (killed with it later,
        even once they are orphans), and kill a child whose heartbeat lapsed or that is past
        its deadline (gantry.run.deadline): not left behind, whatever the controller did."""
        if time.monotonic() - self._checked < CHECK_INTERVAL_S:
            return
        self._checked = time.monotonic()
        for child in self.children.values():
            if child.process.poll() is not None:
                continue
            child.tree = lifeline.descendants(child.process.pid)
            why = hung(child.name)
            if why:
                if not isinstance(why, str):
                    why = "stopped sending heartbeats (hung or stopped)"
                emit(
                    f"[launcher] {child.name} (pid {child.process.pid}) {why}: killing it and "
                    "what it started",
                    err=True,
                )
                self._kill(child)

    def _kill(self, child: Child) -> None:
        """SIGKILL a child (live, or just reaped), its process group and every descendant we
        saw or see now."""
        if child.process.poll() is None:  # else its pid may be another process's by now
            child.tree += lifeline.descendants(child.process.pid)
        _signal_group(child.process.pid, signal.SIGKILL)
        lifeline.kill_tree(child.tree)

    def _restart(self, child: Child, code: int) -> None:
        self._report_death(child, code, "starting it again, the others running on")
        self.start(child.name, child.args, child.env)

    def _report_death(self, child: Child, code: int, outcome: str) -> Failure:
        """One line: `child` died, why (the line of its output that says so), what happens
        now, and where the rest is. What it started goes with it."""
        self._kill(child)
        if child.reader is not None:
            child.reader.join(timeout=2)
        # Killed by a signal, its last line is what it was doing, not why it died.
        cause = cause_of(list(child.tail), last_resort=code > 0)
        failure = Failure(child.name, _how(code), cause, self._log_path(child.name))
        emit(
            f"[launcher] {child.name} (pid {child.process.pid}) died with {failure.how}"
            f"{': ' + cause if cause else ''}; {outcome} (full log: {failure.log})",
            err=True,
        )
        return failure

    def _drain(self, main: str, lost: set[str]) -> int:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for child in self.children.values():
            if child.name in lost:
                continue
            try:
                code = child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                emit(
                    f"[launcher] {child.name} did not exit {DRAIN_TIMEOUT_S:.0f}s after {main}; "
                    "stopping it",
                    err=True,
                )
                continue
            if code != 0:
                return self._failed(child, code)
        return 0

    def _failed(self, child: Child, code: int) -> int:
        self.failure = self._report_death(child, code, "stopping the other processes")
        return 1

    def _log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def stop_all(self) -> None:
        """SIGTERM every live child's process group, then SIGKILL what is left after a grace,
        and every descendant seen (in other sessions, stopped, orphaned): nothing survives."""
        live = [c for c in self.children.values() if c.process.poll() is None]
        for child in live:
            child.tree += lifeline.descendants(child.process.pid)
            _signal_group(child.process.pid, signal.SIGTERM)
            # A stopped process would hold SIGTERM pending forever: it is killed now.
            lifeline.kill_tree([i for i in child.tree if lifeline.is_stopped(i[0])])
            if lifeline.is_stopped(child.process.pid):
                child.process.kill()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in live:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.process.pid, signal.SIGKILL)
                child.process.wait()
        for child in live:  # reaped a moment ago: their group ids are not reused yet
            _signal_group(child.process.pid, signal.SIGKILL)  # what outlived its leader
            lifeline.kill_tree(child.tree)
        for child in self.children.values():
            if child.reader is not None:
                child.reader.join(timeout=2)


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
