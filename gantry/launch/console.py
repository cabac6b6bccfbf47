"""What the launcher shows while a run goes on.

Children's output always goes whole to `logs/<name>.log`. On the console, a line is shown
(prefixed `[name]`) when it is a Gantry log line (`HH:MM:SS LEVEL message`, as
gantry.run.runtime.setup_logging writes them for Gantry's own loggers); vLLM, torch and
transformers output (their warnings, tracebacks, progress bars, lines of other loggers, which
setup_logging tags `[logger.name]`) stays in the log files, unless `--verbose`.

When stdout is a terminal, one progress bar (rich) sits under those lines: step / total,
the reward (GRPO) or the loss (SFT), elapsed time and ETA. It follows `metrics.jsonl`, which
the controller writes; until the first step it shows the latest thing a process said (engine
up, replica registered). Elsewhere (a file, a pipe, CI) there is no bar, only the lines.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from typing import TextIO

from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

GANTRY_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR|CRITICAL) (rank\d+ )?(?!\[)")
ERROR_LINE = re.compile(r"^\d\d:\d\d:\d\d (ERROR|CRITICAL) (rank\d+ )?(?!\[)")
# The last line of a Python traceback: `module.SomeError: message`.
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failed)\b.*")
FOLLOW_INTERVAL_S = 0.5


def is_gantry_line(line: str) -> bool:
    return GANTRY_LINE.match(line) is not None


def cause_of(lines: list[str], last_resort: bool = True) -> str:
    """The one line that says why a process failed: its last Gantry error line, else the last
    exception line of a traceback, else (`last_resort`) its last line; "" without one."""
    lines = [line.rstrip() for line in lines if line.strip()]
    errors = [ERROR_LINE.sub("", line) for line in lines if ERROR_LINE.match(line)]
    exceptions = [line for line in lines if EXCEPTION_LINE.match(line)]
    found = errors or exceptions or (lines if last_resort else [])
    return found[-1] if found else ""


class Console:
    """The launcher's output: children's lines (filtered), its own lines, the progress bar."""

    def __init__(self, *, verbose: bool = True, tty: bool | None = None) -> None:
        self.verbose = verbose
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._progress: Progress | None = None
        self._task = None
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    def child_line(self, name: str, width: int, line: str) -> None:
        """A line of a child's output (the log file has it already)."""
        if not (self.verbose or is_gantry_line(line)):
            return
        emit(f"[{name:<{width}}] {line.rstrip(chr(10))}")
        if self._progress is not None and is_gantry_line(line):
            self._status(GANTRY_LINE.sub("", line).strip())  # the message, without time and level

    def start_progress(self, metrics: Path, total: int) -> None:
        """On a terminal: the bar, following `metrics` until stop()."""
        if not self.tty or self._progress is not None:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[value]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}", style="dim"),
            console=RichConsole(file=sys.stdout),
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self._task = self._progress.add_task("starting", total=total, value="", status="")
        self._progress.start()
        self._follower = threading.Thread(
            target=self._follow, args=(metrics,), name="progress", daemon=True
        )
        self._follower.start()

    def _status(self, text: str) -> None:
        progress = self._progress
        if progress is not None and not progress.tasks[0].completed:
            progress.update(self._task, status=text[:60])

    def _follow(self, metrics: Path) -> None:
        offset, partial = 0, ""
        while not self._stop.wait(FOLLOW_INTERVAL_S):
            if not metrics.is_file():
                continue
            with metrics.open() as f:
                f.seek(offset)
                partial += f.read()
                offset = f.tell()
            *complete, partial = partial.split("\n")
            for line in complete:
                self._show(json.loads(line))

    def _show(self, record: dict) -> None:
        if record.get("validation") or "step" not in record:
            return
        if "reward_mean" in record:
            value = f"reward {record['reward_mean']:.3f}"
        elif "loss" in record:
            value = f"loss {record['loss']:.4f}"
        else:
            value = ""
        # A run started again from a checkpoint repeats steps: the bar goes back with it.
        self._progress.update(
            self._task, completed=record["step"], description="step", value=value, status=""
        )

    def stop(self) -> None:
        """End the bar (it stays on the screen as it was); the lines after it go below."""
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=2)
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


_LOCK = threading.Lock()  # one writer at a time: lines from several threads stay whole


def emit(text: str, *, err: bool = False) -> None:
    """One whole line to stdout (or stderr), from any thread; above the bar when it shows."""
    stream: TextIO = sys.stderr if err else sys.stdout
    with _LOCK:
        stream.write(text + "\n")
        stream.flush()
