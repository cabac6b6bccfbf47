"""Fault injection on whole runs: a rollout replica killed by pid mid-run is dropped, its prompts
go to the others and a replica started afterwards takes work, and every prompt is trained
exactly once (counted from metrics.jsonl); a killed policy process makes the launcher start the
run again from its last checkpoint, which reaches the final step; a killed controller is started
again alone and carries on from its state in Redis, losing and repeating nothing."""

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

    def __init__(self, tmp_path: Path, *overrides: str, base: list[str] = QUICKSTART) -> None:
        args = [
            sys.executable, "-m", "gantry.launch", *base,
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def controller_pid(launcher: subprocess.Popen, not_pid: int = 0, timeout: float = 60) -> int:
    """The pid of the launcher's controller child (found by parent pid, never by name)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (proc / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            ours = parent == launcher.pid and command[1:3] == [b"-m", b"controller"]
            if ours and int(proc.name) != not_pid:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError("the launcher has no controller process")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_controller_restarts_alone_and_no_step_or_prompt_is_lost(tmp_path):
    steps = 12
    run = Run(tmp_path, "train.train_batch_per_replica=64", f"train.max_num_steps={steps}")
    try:
        run_dir = run.run_dir()
        run.wait_for(rf"step 3/{steps}", 300)
        os.kill(controller_pid(run.process), signal.SIGKILL)
        run.wait_for(r"controller restarted \(1 time", 120)
        assert run.finish(timeout=500) == 0, run.output()[-8000:]
    finally:
        run.kill()
    output = run.output()
    assert "controller restart 1/3" in output
    # The workers ran on: registered once, no restart of the run.
    assert len(re.findall(r"\[controller *\] \S+ INFO policy replica 0 registered", output)) == 1
    assert "restart 1/2" not in output
    metrics = metrics_of(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)), output[-8000:]
    trained = [p for m in metrics for p in m["prompt_ids"]]
    assert len(trained) == steps * len(metrics[0]["prompt_ids"]) == len(set(trained))
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["steps"] == steps and outcome["controller_restarts"] == 1
    assert outcome["final_export"].endswith("export/final")


SFT = [
    "--config", "configs/quickstart-sft.toml", "datasets/arithmetic.py",
    "train.train_batch_per_replica=64", "train.train_policy.mini_batch=16",
    "validation.enable=true", "validation.freq=10", "logging.log_interval=1", "custom.size=3000",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sft_controller_killed_twice_gives_the_losses_of_an_unbroken_run(tmp_path):
    """The restarted controllers send the same batches in the same order: every step's loss
    equals the one of the same run without a kill."""
    steps = 40
    whole = subprocess.run(
        [sys.executable, "-m", "gantry.launch", *SFT, f"train.output_dir={tmp_path / 'whole'}",
         f"train.max_num_steps={steps}"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert whole.returncode == 0, whole.stdout[-5000:] + whole.stderr[-3000:]
    (whole_dir,) = [p for p in (tmp_path / "whole").iterdir() if not p.name.startswith(".")]
    run = Run(tmp_path / "killed", f"train.max_num_steps={steps}", base=SFT)
    try:
        run_dir = run.run_dir()
        run.wait_for(rf"step 4/{steps}", 300)
        first = controller_pid(run.process)
        os.kill(first, signal.SIGKILL)
        run.wait_for(r"controller restarted \(1 time", 120)
        run.wait_for(rf"step 2\d/{steps}", 300)
        os.kill(controller_pid(run.process, not_pid=first), signal.SIGKILL)
        run.wait_for(r"controller restarted \(2 time", 120)
        assert run.finish(timeout=400) == 0, run.output()[-8000:]
    finally:
        run.kill()

    def records(path: Path) -> tuple[dict, list]:
        lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m["loss"] for m in lines if "loss" in m}, [
            m["step"] for m in lines if m.get("validation")
        ]

    (want, want_val), (got, got_val) = records(whole_dir), records(run_dir)
    assert sorted(got) == list(range(1, steps + 1)) and got_val == want_val, run.output()[-6000:]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["steps"] == steps and outcome["controller_restarts"] == 2
    assert [v["step"] for v in outcome["validations"]] == want_val
