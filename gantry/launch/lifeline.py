"""The launcher owns its process tree: its processes die with it, and it can kill all of theirs.

- `launcher_identity()` is what the launcher puts in each child's environment (LAUNCHER_ENV,
  "pid:start time"); `watch_launcher()`, called first thing in each role's `__main__` (and in the
  torchrun agent, started as `python -m gantry.launch.lifeline gantry.launch.policy_job ...`),
  starts a thread that, once that launcher is gone (even SIGKILLed, which no handler sees),
  SIGKILLs this process's descendants, its process group and itself. A thread and not
  PR_SET_PDEATHSIG: that signal would kill the process alone, leaving what it started (vLLM's
  engine processes, torchrun's ranks, which run in sessions of their own) behind.
- `exec_with_parent_death()` is the command prefix for a program that is not ours
  (redis-server): PR_SET_PDEATHSIG (SIGKILL), which survives exec, then exec.
- `descendants(pid)` and `kill_tree()` find processes by parent links in /proc (never by name),
  each with its start time, so that a pid reused in the meantime is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import time

LAUNCHER_ENV = "GANTRY_LAUNCHER"
WATCH_INTERVAL_S = 0.5
# The redis-server wrapper: `python -S -c CODE PARENT_PID PROGRAM ARGS...` (no site: it starts in
# milliseconds). 1 = PR_SET_PDEATHSIG; a parent gone before the call means exit at once.
_PDEATHSIG_CODE = (
    "import ctypes, os, sys; ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.argv[2], sys.argv[2:])"
)

Ident = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time, or None when it is gone or a zombie (dead, not yet reaped)."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(ident: Ident) -> bool:
    return start_time(ident[0]) == ident[1]


def is_stopped(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] == "T"


def launcher_identity() -> str:
    return f"{os.getpid()}:{start_time(os.getpid())}"


def descendants(pid: int) -> list[Ident]:
    """Every live process below `pid` (children first), by parent links: also those in
    sessions of their own, which a process group signal misses."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        if (start := start_time(child)) is not None:
            found.append((child, start))
        todo.extend(children.get(child, []))
    return found


def kill_tree(idents: list[Ident]) -> None:
    """SIGKILL each process that is still the one we saw (SIGKILL stops a stopped one too)."""
    for ident in idents:
        if is_alive(ident):
            with contextlib.suppress(ProcessLookupError):
                os.kill(ident[0], signal.SIGKILL)


def exec_with_parent_death(command: list[str]) -> list[str]:
    """`command`, run so that it gets SIGKILL when this process dies (Linux; as is elsewhere)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-S", "-c", _PDEATHSIG_CODE, str(os.getpid()), *command]


def watch_launcher() -> threading.Thread | None:
    """In a process a launcher started: die with that launcher (see the module docstring)."""
    text = os.environ.get(LAUNCHER_ENV, "")
    if ":" not in text or not sys.platform.startswith("linux"):
        return None  # started by hand (a late rollout replica): nobody to follow
    pid, start = (int(part) for part in text.split(":"))
    thread = threading.Thread(
        target=_watch, args=((pid, start),), name="launcher-watch", daemon=True
    )
    thread.start()
    return thread


def _watch(launcher: Ident) -> None:
    while is_alive(launcher):
        time.sleep(WATCH_INTERVAL_S)
    with contextlib.suppress(OSError):  # its output went to the launcher: a broken pipe now
        print(f"the launcher (pid {launcher[0]}) is gone: exiting", file=sys.stderr, flush=True)
    kill_tree(descendants(os.getpid()))
    if os.getpgrp() == os.getpid():  # this process leads its group: the launcher made it so
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    """`python -m gantry.launch.lifeline MODULE ARGS...`: run MODULE as __main__ (as
    `python -m MODULE ARGS...` would), dying with the launcher."""
    watch_launcher()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
