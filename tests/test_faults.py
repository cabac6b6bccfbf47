"""Faults from the user's inputs that a restart would meet again, on the real launcher and the
quickstart (shortened): a reward function that returns inf or NaN, or raises, at a later sample
(after some steps were trained) ends the run at once with exit 2 and one line naming the
function and the sample; no update is made from it, nothing non-finite is exported, the run is
not restarted, and no process of the run is left."""

from __future__ import annotations

import json
import math
import textwrap
import time

import pytest

from tests.test_interrupt import LONG, Launcher, commands, wait_gone

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

    def read_next(stream, block_ms):
        reads.append(block_ms)
        assert len(reads) < 3, "the error was not raised while idle"
        return []

    worker = SimpleNamespace(
        plane=SimpleNamespace(read_next=read_next),
        keys=SimpleNamespace(policy_commands="commands"),
        weights=None,
        sync_error=TimeoutError("rollout 1 did not check in within 600 s"),
    )
    worker._check_sync = MethodType(PolicyWorker._check_sync, worker)
    with pytest.raises(RuntimeError, match="weight sync failed: rollout 1 did not check in"):
        PolicyWorker._serve(worker)
    assert reads == [1000]
