"""Errors that a restart of the run would meet again, whatever the process that raises them.

A worker that fails with one (gantry.run.runtime.run_worker) exits with EXIT_BAD_INPUT and
writes RUN_DIR/fatal.json, and the launcher ends the run at once with its one line instead of
starting it again from the last checkpoint: the same code on the same data fails the same way.
"""

from __future__ import annotations


class RecursOnRetry(Exception):
    """Mixin: this error comes from the inputs (the dataset script, its data, the config),
    not from the machine; a retry meets it again."""


class NonFiniteError(RecursOnRetry, ArithmeticError):
    """A reward, loss, gradient or weight that is NaN or infinite: the update or the export
    is refused before anything is changed or written."""
