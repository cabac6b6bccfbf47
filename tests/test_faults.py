"""Faults on the real launcher and the quickstart (shortened). From the user's inputs, which a
restart would meet again: a reward function that returns inf or NaN, or raises, at a later
sample (after some steps were trained) ends the run at once with exit 2 and one line naming the
function and the sample; no update is made from it, nothing non-finite is exported, the run is
not restarted, and no process of the run is left. Hangs: a reward function that never
returns is named within a minute of its deadline; a generate call that never returns too, its
replica dropped and the run going on with the other (every prompt trained once); a SIGSTOPped
policy is named with what it was doing, killed, and the run starts again from its checkpoint.
No process of the run is left after any of them."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import textwrap
import time

import pytest

from gantry.launch import lifeline
from tests.test_interrupt import LONG, QUICKSTART, Launcher, commands, wait_gone

# The reward goes bad after 200 calls in a rollout process (3 steps of 64 completions).
POISONED = textwrap.dedent(
    """
    calls = 0

    def get_dataset(config):
        return [{"prompt": f"say {i}", "answer": str(i % 10)} for i in range(512)]

    def poisoned(completion, sample, **kw):
        global calls
        calls += 1
        if calls > 200:
            BAD
        return float(completion.strip() == sample["answer"])

    reward_fns = [poisoned]
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ('return float("inf")', "returned inf on sample"),
        ("raise KeyError('label')", "KeyError"),
    ],
    ids=["inf", "raises"],  # NaN: tests/test_plugin.py (the same check)
)
def test_a_bad_reward_at_a_later_sample_ends_the_run_at_once(tmp_path, bad, said):
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED.replace("BAD", bad))
    launcher = Launcher(
        tmp_path / "out", "--config", "configs/quickstart-grpo.toml", str(script), *LONG,
        "fault_tolerance.max_restarts=2",
    )  # fmt: skip
    try:
        run_dir = launcher.run_dir()
        launcher.wait_for(r"step 2/", 200)  # trained a while before the reward goes bad
        tree = launcher.tree()
        assert launcher.finish(timeout=200) == 2, launcher.output()[-6000:]
        assert not wait_gone(tree, 10), commands(wait_gone(tree, 0))
    finally:
        launcher.kill()
    output = launcher.output()
    assert "restart 1/2" not in output and "Traceback" not in output, output[-6000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("[launcher] error: rollout0: "), output[-4000:]
    assert "reward function poisoned" in last and said in last and "not retried" in last, last
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["retried"] is False, result
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert steps and all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps)
    assert not (run_dir / "export" / "final").exists()


STUCK = POISONED.replace("poisoned", "stuck").replace("BAD", "__import__('time').sleep(3600)")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_reward_function_that_never_returns_is_named_within_its_timeout(tmp_path):
    """The heartbeat thread keeps beating while the reward hangs: the deadline names it."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    launcher = Launcher(
        tmp_path / "out", "--config", "configs/quickstart-grpo.toml", str(script), *LONG,
        "fault_tolerance.max_restarts=0", "rollout.reward_timeout=3",
    )  # fmt: skip
    try:
        launcher.run_dir()
        launcher.wait_for(r"step 2/", 200)
        tree = launcher.tree()
        started = time.monotonic()
        assert launcher.finish(timeout=120) != 0, launcher.output()[-6000:]
        assert time.monotonic() - started < 63  # named within a minute of the deadline
        assert not wait_gone(tree, 10), commands(wait_gone(tree, 0))
    finally:
        launcher.kill()
    output = launcher.output()
    assert "reward function stuck on sample" in output, output[-4000:]
    assert "did not return within 3 s" in output and "Traceback" not in output


def test_a_stored_sync_error_is_raised_while_the_policy_is_idle():
    """A background weight sync that failed (weight_sync_timeout) stores its error; the policy's
    loop raises it at its next wake-up even when no command comes."""
    from types import MethodType, SimpleNamespace

    from policy.worker import PolicyWorker

    reads = []

    def read_commands(stream, block_ms):
        reads.append(block_ms)
        assert len(reads) < 3, "the error was not raised while idle"
        return []

    worker = SimpleNamespace(
        plane=SimpleNamespace(read_commands=read_commands),
        keys=SimpleNamespace(policy_commands="commands"),
        weights=None,
        sync_error=TimeoutError("rollout 1 did not check in within 600 s"),
    )
    worker._check_sync = MethodType(PolicyWorker._check_sync, worker)
    with pytest.raises(RuntimeError, match="weight sync failed: rollout 1 did not check in"):
        PolicyWorker._serve(worker)
    assert reads == [1000]


def trained_once(run_dir, steps: int) -> None:
    """Every step recorded (the last record of a step counts: a restarted run trains the steps
    after its checkpoint again) and every prompt trained exactly once."""
    last = {}
    for line in (run_dir / "metrics.jsonl").open():
        record = json.loads(line)
        last[record["step"]] = record
    assert sorted(last) == list(range(1, steps + 1)), sorted(last)
    trained = [p for m in last.values() for p in m["prompt_ids"]]
    assert len(trained) == steps * len(last[1]["prompt_ids"]) == len(set(trained))


def two_replicas(tmp_path, steps: int) -> Launcher:
    """The quickstart with two rollout replicas, no restart of the run, short deadlines."""
    return Launcher(
        tmp_path / "out", *QUICKSTART, *LONG, f"train.max_num_steps={steps}",
        "rollout.parallelism.n_init_replicas=2", "rollout.batch_size=2",
        "fault_tolerance.max_restarts=0", "fault_tolerance.deadline_floor_s=20",
        "fault_tolerance.first_deadline_s=120",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_generate_call_that_never_returns_is_named_and_its_replica_dropped(tmp_path, monkeypatch):
    """The test hook hangs replica 1's fifth generate call (its heartbeat beating on): past
    the call's deadline the replica names it and exits, is killed with what it started, its
    prompts go to replica 0, and the run finishes with every prompt trained once."""
    from rollout.worker import HANG_ENV

    monkeypatch.setenv(HANG_ENV, "1:5")
    steps = 10
    launcher = two_replicas(tmp_path, steps)
    try:
        run_dir = launcher.run_dir()
        pid = int(launcher.wait_for(r"rollout replica 1 registered \(pid (\d+)\)", 300).group(1))
        hung = (pid, lifeline.start_time(pid))
        launcher.wait_for(r"generate call 5 hangs \(test hook\)", 300)
        hung_at = time.monotonic()
        said = launcher.wait_for(
            r"rollout 1 failed: stuck: generating \d+ prompts \(weights v\d+\) did not return "
            r"within ([\d.]+) s \(([^)]+)\)",
            300,
        )
        assert time.monotonic() - hung_at < float(said.group(1)) + 60, said.group(0)
        assert not wait_gone([hung], 15), commands([hung])
        tree = launcher.tree()
        assert launcher.finish(timeout=400) == 0, launcher.output()[-6000:]
        assert not wait_gone(tree, 10), commands(wait_gone(tree, 0))
    finally:
        launcher.kill()
    output = launcher.output()
    assert re.search(r"rollout replica 1 failed: stuck: generating .*: dropped", output), output
    assert "Traceback" not in output
    trained_once(run_dir, steps)
    result = json.loads((run_dir / "result.json").read_text())
    (gone,) = result["departed_rollout_replicas"]
    assert gone["replica"] == "1" and "stuck: generating" in gone["left"], gone


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stopped_policy_is_named_with_what_it_did_killed_and_the_run_resumes(tmp_path):
    """SIGSTOP stops every thread of the policy, its watchdog too: its heartbeat lapses
    (HEARTBEAT_TTL_S, 30 s), it is named with what it was doing within a minute of that, the
    stopped process is killed, and the run starts again from its last checkpoint."""
    steps = 8
    launcher = Launcher(
        tmp_path / "out", *QUICKSTART, *LONG, f"train.max_num_steps={steps}",
        "train.ckpt.enable_checkpoint=true", "train.ckpt.save_freq=3",
        "train.ckpt.export_safetensors=false",
    )  # fmt: skip
    stopped = None
    try:
        run_dir = launcher.run_dir()
        pid = int(launcher.wait_for(r"policy replica 0 registered \(pid (\d+)\)", 300).group(1))
        stopped = (pid, lifeline.start_time(pid))
        launcher.wait_for(r"checkpoint step 3 complete", 300)
        first = launcher.tree()
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        said = launcher.wait_for(
            r"(policy0 \(pid \d+\)|policy replica 0) stopped sending heartbeats \(hung or "
            r"stopped\) while \w+",
            120,
        )
        assert time.monotonic() - stopped_at < 30 + 60, said.group(0)
        assert not wait_gone([stopped], 20), commands([stopped])
        launcher.wait_for(r"restart 1/2: resuming from \S+step_\d+", 120)
        launcher.wait_for(rf"policy replica 0 registered \(pid (?!{pid}\))\d+\)", 300)
        second = launcher.tree()
        assert launcher.finish(timeout=400) == 0, launcher.output()[-6000:]
        assert not wait_gone(first + second, 10), commands(wait_gone(first + second, 0))
    finally:
        if stopped is not None and lifeline.is_alive(stopped):
            os.kill(stopped[0], signal.SIGCONT)  # a failed test leaves no stopped process
        launcher.kill()
    trained_once(run_dir, steps)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stopped_rollout_replica_is_named_killed_and_the_run_goes_on(tmp_path):
    """A SIGSTOPped replica's heartbeat lapses: the controller drops it naming what it was
    doing, the launcher kills it, and the other replica generates its prompts."""
    steps = 10
    launcher = two_replicas(tmp_path, steps)
    stopped = None
    try:
        run_dir = launcher.run_dir()
        pid = int(launcher.wait_for(r"rollout replica 1 registered \(pid (\d+)\)", 300).group(1))
        stopped = (pid, lifeline.start_time(pid))
        launcher.wait_for(rf"step 2/{steps}", 300)
        tree = launcher.tree()
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The launcher (it looks every 2 s) or the controller (every 5 s) sees it first.
        said = launcher.wait_for(
            rf"rollout1 \(pid {pid}\) stopped sending heartbeats \(hung or stopped\) while "
            r"\w+.*: killing it",
            120,
        )
        assert time.monotonic() - stopped_at < 30 + 60, said.group(0)
        assert not wait_gone([stopped], 15), commands([stopped])
        launcher.wait_for(r"rollout replica 1 (stopped sending heartbeats|failed).*: dropped", 30)
        assert launcher.finish(timeout=400) == 0, launcher.output()[-6000:]
        assert not wait_gone(tree, 10), commands(wait_gone(tree, 0))
    finally:
        if stopped is not None and lifeline.is_alive(stopped):
            os.kill(stopped[0], signal.SIGCONT)
        launcher.kill()
    trained_once(run_dir, steps)
