"""Fault injection on whole runs: a rollout replica killed by pid mid-run is dropped, its prompts
go to the others and a replica started afterwards takes work, and every prompt is trained
exactly once (counted from metrics.jsonl); a killed policy process makes the launcher start the
run again from its last checkpoint, which reaches the final step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", "configs/quickstart-grpo.toml", "datasets/arithmetic.py"]


class Run:
    """A launcher process whose output is collected by a thread, so a test can wait for a line
    without blocking on the pipe."""

    def __init__(self, tmp_path: Path, *overrides: str) -> None:
        args = [
            sys.executable, "-m", "gantry.launcher", *QUICKSTART,
            f"train.output_dir={tmp_path}", "rollout.backend=transformers",
            "logging.log_interval=1", *overrides,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the output:\n{self.output()[-6000:]}")

    def run_dir(self) -> Path:
        return Path(self.wait_for(r"run directory: (\S+)", 60).group(1))

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_a_killed_rollout_replica_is_replaced_and_every_prompt_is_trained_once(tmp_path):
    steps = 40
    run = Run(
        tmp_path, "rollout.parallelism.n_init_replicas=2", "train.train_batch_per_replica=64",
        "rollout.batch_size=2", f"train.max_num_steps={steps}",
    )  # fmt: skip
    joiner = None
    try:
        run_dir = run.run_dir()
        pid = int(run.wait_for(r"rollout replica 1 registered \(pid (\d+)\)", 300).group(1))
        run.wait_for(rf"step 3/{steps}", 300)
        os.kill(pid, signal.SIGKILL)
        run.wait_for(r"rollout replica 1 failed: process died with signal SIGKILL: dropped", 60)
        joiner = subprocess.Popen(
            [sys.executable, "-m", "rollout", "--run-dir", str(run_dir), "--replica", "7"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert run.finish(timeout=500) == 0, run.output()[-8000:]
        assert joiner.wait(timeout=60) == 0
    finally:
        run.kill()
        if joiner is not None and joiner.poll() is None:
            joiner.kill()
    metrics = metrics_of(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)), run.output()[-8000:]
    trained = [p for m in metrics for p in m["prompt_ids"]]
    per_step = len(metrics[0]["prompt_ids"])
    assert len(trained) == steps * per_step and len(set(trained)) == len(trained)
    outcome = json.loads((run_dir / "result.json").read_text())
    assert sorted(outcome["rollout_replicas"]) == ["0", "7"]
    assert outcome["rollout_replicas"]["7"]["groups"] > 0
    (gone,) = outcome["departed_rollout_replicas"]
    assert gone["replica"] == "1" and "SIGKILL" in gone["left"]


@pytest.mark.timeout(600)
def test_a_killed_policy_resumes_from_the_last_checkpoint(tmp_path):
    steps = 10
    run = Run(
        tmp_path, "train.train_batch_per_replica=64", f"train.max_num_steps={steps}",
        "train.ckpt.enable_checkpoint=true", "train.ckpt.save_freq=3",
        "train.ckpt.export_safetensors=false",
    )  # fmt: skip
    try:
        run_dir = run.run_dir()
        pid = int(run.wait_for(r"policy replica 0 registered \(pid (\d+)\)", 300).group(1))
        run.wait_for(r"checkpoint step 3 complete", 300)
        run.wait_for(rf"step 5/{steps}", 300)
        os.kill(pid, signal.SIGKILL)
        assert run.finish(timeout=500) == 0, run.output()[-8000:]
    finally:
        run.kill()
    output = run.output()
    # The launcher sees the policy's torchrun agent exit, or first the rollout replica that a
    # transfer in flight took down with it: either way it restarts the run.
    assert re.search(r"policy0 \(pid \d+\) died|every expendable process is gone", output)
    resumed_at = int(re.search(r"restart 1/2: resuming from \S+step_(\d+)", output).group(1))
    assert resumed_at >= 3
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["steps"] == steps and outcome["resumed_from"].endswith(f"step_{resumed_at}")
    # The steps after the checkpoint were trained again: the last record of each step counts.
    last = {m["step"]: m for m in metrics_of(run_dir)}
    assert sorted(last) == list(range(1, steps + 1))
    trained = [p for m in last.values() for p in m["prompt_ids"]]
    assert len(set(trained)) == len(trained)
