"""Errors that a restart of the run would meet again, whatever the process that raises them.

A worker that fails with one (gantry.run.runtime.run_worker) exits with EXIT_BAD_INPUT and
writes RUN_DIR/fatal.json, and the launcher ends the run at once with its one line instead of
starting it again from the last checkpoint: the same code on the same data fails the same way.
A full disk is one of them: a restart writes the same checkpoint to the same disk.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# What a write gets from a disk (or a quota) with no room left.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class RecursOnRetry(Exception):
    """Mixin: this error comes from the inputs (the dataset script, its data, the config),
    not from the machine; a retry meets it again."""


class NonFiniteError(RecursOnRetry, ArithmeticError):
    """A reward, loss, gradient or weight that is NaN or infinite: the update or the export
    is refused before anything is changed or written."""


class DiskFullError(RecursOnRetry, OSError):
    """No room left where a checkpoint, an export or a record was being written: which path,
    how many bytes it needed and how many were free (one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it came from (its cause, its context, or a failure that
    torch.distributed.checkpoint collected from a rank), is a full disk."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, DiskFullError) or (
            isinstance(error, OSError) and error.errno in _NO_SPACE
        ):
            return True
        if str(error).startswith("MISCONF") and "No space left" in str(error):
            return True  # the run's Redis cannot write its append-only file
        failures = getattr(error, "failures", None)  # DCP's CheckpointException: rank -> error
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
        todo += [error.__cause__, error.__context__]
    return False


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for this user on the filesystem of `path` (or of its nearest existing parent)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free


def size_text(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit} ({nbytes} bytes)"
    return f"{nbytes} bytes"


def disk_full_error(path: str | os.PathLike, needed: int, what: str = "") -> DiskFullError:
    """The one line for a write to `path` that found (or would find) no room: `needed` bytes
    against what the filesystem has free now."""
    return DiskFullError(
        f"the disk is full: {what or 'writing'} {path} needs {size_text(needed)}, "
        f"{size_text(free_bytes(path))} free there; free some space (or point "
        "train.output_dir at a larger disk) and resume from the last complete checkpoint"
    )
