"""Child processes of a run: started with their output prefixed by role, watched, stopped.

Each child runs in its own process group so that stopping it also stops what it started
(engine workers), and nothing else: processes are found by the pids we started, never by name.
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

STOP_GRACE_S = 10.0
EXIT_RESTARTED = 75  # wait() gave up because the run is being started again
DRAIN_TIMEOUT_S = 60.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    args: list[str]
    env: dict[str, str] | None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    reader: threading.Thread | None = None


class ProcessGroupSupervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, Child] = {}
        self._print_lock = threading.Lock()

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        full = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        full.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # tqdm bars garble prefixed logs
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
        with self._log_path(child.name).open("a") as log:
            for line in child.process.stdout:
                log.write(line)
                log.flush()
                child.tail.append(line)
                with self._print_lock:
                    sys.stdout.write(f"[{child.name:<{width}}] {line}")
                    sys.stdout.flush()

    def wait(
        self,
        main: str | None,
        expendable: Callable[[str], bool] = lambda name: False,
        on_lost: Callable[[str, str], None] = lambda name, how: None,
        stop_when: Callable[[], bool] = lambda: False,
        restart: Callable[[str, int], bool] = lambda name, code: False,
    ) -> int:
        """Block until `main` exits 0 and the others follow (0; with no `main`, until every
        child exited 0), or a child fails (1), or `stop_when()` (EXIT_RESTARTED). An
        `expendable` child that fails is reported to `on_lost(name, how)` and the run goes
        on, unless every expendable child is gone; another child that fails is started again
        when `restart(name, exit code)` says so, the others running on."""
        lost: set[str] = set()
        while True:
            if stop_when():
                return EXIT_RESTARTED
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
                self._report_lost(child, code)
                on_lost(child.name, _how(code))
                if all(n in lost for n in self.children if expendable(n)):
                    self._say("every expendable process is gone; stopping the run")
                    return 1
            if main is None:
                if all(c.process.poll() is not None for c in self.children.values()):
                    return 0  # every one exited, the failed ones expendable
            elif self.children[main].process.poll() == 0:
                return self._drain(main, lost)
            time.sleep(0.2)

    def _report_lost(self, child: Child, code: int) -> None:
        self._report_death(child, code, "the run goes on without it", last_lines=10)

    def _restart(self, child: Child, code: int) -> None:
        self._report_death(child, code, "starting it again, the others running on", last_lines=10)
        self.start(child.name, child.args, child.env)

    def _report_death(self, child: Child, code: int, outcome: str, last_lines: int) -> None:
        """Say that `child` died, what happens now, and the end of its output."""
        if child.reader is not None:
            child.reader.join(timeout=2)
        tail = "".join(list(child.tail)[-last_lines:]).rstrip()
        self._say(
            f"{child.name} (pid {child.process.pid}) died with {_how(code)}; {outcome}. Its "
            f"last output (full log: {self._log_path(child.name)}):\n{tail}"
        )

    def _drain(self, main: str, lost: set[str]) -> int:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for child in self.children.values():
            if child.name in lost:
                continue
            try:
                code = child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(
                    f"{child.name} did not exit {DRAIN_TIMEOUT_S:.0f}s after {main}; stopping it"
                )
                continue
            if code != 0:
                return self._failed(child, code)
        return 0

    def _failed(self, child: Child, code: int) -> int:
        self._report_death(
            child, code, "stopping the other processes", last_lines=child.tail.maxlen
        )
        return 1

    def _log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _say(self, text: str) -> None:
        with self._print_lock:
            print(f"[launcher] {text}", file=sys.stderr, flush=True)

    def stop_all(self) -> None:
        """SIGTERM every live child's process group, then SIGKILL what is left after a grace."""
        live = [c for c in self.children.values() if c.process.poll() is None]
        for child in live:
            _signal_group(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in live:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.process.pid, signal.SIGKILL)
                child.process.wait()
        for child in self.children.values():
            if child.reader is not None:
                child.reader.join(timeout=2)


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
