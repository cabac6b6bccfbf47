"""How a run ended, when the controller could not say it: result.json written by the launcher.

The controller writes result.json when training finishes. When the run is interrupted (Ctrl-C,
SIGTERM, SIGHUP) or fails, the launcher writes it instead:
`{"status": "interrupted" | "failed", "last_step": N, ...}`, N being the last training step in
metrics.jsonl (0 before the first). Files of an earlier job in a run directory that is taken
over (a requeued SLURM job keeps its run id) are removed first, so that what is there is this
run's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from gantry.run.checkpoints import write_json_atomic
from gantry.run.runtime import FATAL_FILE

RESULT = "result.json"


def clear_stale(run_dir: Path) -> None:
    for name in (RESULT, FATAL_FILE):
        (run_dir / name).unlink(missing_ok=True)


def last_step(run_dir: Path) -> int:
    """The step of the last training record in metrics.jsonl (validation records skipped;
    a run started again repeats steps, and its last record is where it stood)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if not record.get("validation") and isinstance(record.get("step"), int):
            step = record["step"]
    return step


def write_result(run_dir: Path, status: str, started: float, **fields) -> dict:
    """result.json with `status` and the last step, unless the controller wrote one (the run
    finished as it was being stopped); what the file holds."""
    path = run_dir / RESULT
    if path.is_file():
        return json.loads(path.read_text())
    result = {
        "status": status,
        "last_step": last_step(run_dir),
        "seconds": time.monotonic() - started,
        **fields,
    }
    try:
        write_json_atomic(path, result)
    except OSError as exc:  # a full disk: the console line is what the user gets
        print(f"[launcher] {RESULT} could not be written: {exc}", file=sys.stderr, flush=True)
    return result
