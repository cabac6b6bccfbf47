"""Running a test script on several torch.distributed ranks (gloo) through torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(
    script: str | Path, nproc: int, args: list[str], *, timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` ranks with torchrun --standalone (a free port of its own);
    asserts every rank exited 0 and returns the combined output."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", str(script), *map(str, args),
    ]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result
