"""`python -m gantry status RUN_DIR`: the live view read from a real Redis.

Fast tests fill a real redis-server by hand the way the workers and the controller write it
(Activity heartbeats, the journal snapshot, prompt streams read by a consumer group, a
SyncWeights command, check-ins published by `SyncCheckIns`) and read the screen back; the
check-in hook is exercised on a real TCPStore; the slow test SIGSTOPs the rollout replica of a
real run and asserts that the status names it as the one the weight sync waits for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from gantry.comm.protocol import Keys, PromptTask, Receiver, SyncPlan, SyncWeights
from gantry.comm.sync_status import SyncCheckIns, read_check_ins
from gantry.comm.transport import ControlPlane
from gantry.run.activity import STATES, Activity
from gantry.run.runtime import RunInfo
from gantry.watch.status import StatusError, open_run, read_status
from gantry.watch.status_text import render, waits

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "r1"
GROUP = f"{RUN_ID}/plan1"


def make_run_dir(tmp_path: Path, url: str) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunInfo(
        run_id=RUN_ID, run_dir=str(run_dir), redis_url=url, dataset_script="d.py",
        dataset_size=10, model_path="m",
    ).write()  # fmt: skip
    config = {"train": {"max_num_steps": 20, "train_policy": {"type": "grpo",
              "allowed_outdated_steps": 2}}}  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def beat(client: redis.Redis, role: str, replica: str, record: dict | bytes, age_s: float) -> None:
    """A heartbeat key as `ControlPlane.beat` leaves it `age_s` after the beat (TTL 30 s)."""
    value = record if isinstance(record, bytes) else json.dumps(record).encode()
    client.set(Keys(RUN_ID).heartbeat(role, replica), value, px=int((30 - age_s) * 1000))


def activity(role: str, replica: str, state: str, since_s: float, detail: str = "") -> dict:
    record = Activity(role, replica, host="node0").snapshot()
    return {**record, "state": state, "detail": detail, "since": time.time() - since_s}


def plan() -> SyncPlan:
    receivers = [Receiver(replica="0", ranks=1), Receiver(replica="1", ranks=1)]
    return SyncPlan(group=GROUP, host="127.0.0.1", port=1, receivers=receivers, timeout_s=600)


def fill_run(url: str, *, open_sync: bool = True) -> redis.Redis:
    """A GRPO run at version 4 whose sync to v4 waits on rollout 1 (generating for 40 s)."""
    keys, client = Keys(RUN_ID), redis.Redis.from_url(url)
    replicas = [
        {"name": "0", "ranks": 1, "version": 4, "held": 4, "in_flight": {"0:1": 4, "0:2": 4}},
        {"name": "1", "ranks": 1, "version": 4, "held": 3, "in_flight": {"0:3": 3}},
    ]
    state = {
        "version": 4, "steps_sent": 5, "started": True, "in_flight": None,
        "registered": [["policy", "0"], ["rollout", "0"], ["rollout", "1"]],
        "open_syncs": [[GROUP, 4, ["1"]]] if open_sync else [],
        "fleet": {"replicas": replicas, "plans": [[[["0", 1], ["1", 1]], plan().model_dump()]]},
    }  # fmt: skip
    client.set(keys.journal("state"), json.dumps(state))
    client.set(keys.manifest, json.dumps({"senders": 1, "entries": []}))
    plane = ControlPlane(url)
    plane.send(keys.policy_commands, SyncWeights(version=4, plan=plan()))
    for replica, ids in (("0", ["0:1", "0:2"]), ("1", ["0:3"])):
        stream = keys.prompts(replica)
        plane.ensure_group(stream, "rollout")
        for prompt_id in ids:
            epoch, index = prompt_id.split(":")
            plane.send(stream, PromptTask(prompt_id=prompt_id, epoch=int(epoch), index=int(index)))
        plane.read_group([stream], "rollout", f"rollout-{replica}", 10, 10)
    plane.close()
    beat(client, "policy", "0", activity("policy", "0", "syncing", 3, "sync 4"), 0.5)
    beat(client, "rollout", "0", activity("rollout", "0", "idle", 1), 0.4)
    beat(client, "rollout", "1", activity("rollout", "1", "generating", 40, "2 prompts"), 12)
    return client


@pytest.mark.redis
def test_the_status_names_the_replica_a_sync_waits_for(tmp_path, redis_url):
    run_dir = make_run_dir(tmp_path, redis_url)
    client = fill_run(redis_url)
    arrived = {"policy sender 0": 1.0, "rollout replica 0 tp rank 0": 2.0}
    SyncCheckIns(client, Keys(RUN_ID))(GROUP, 4, arrived, 0.5)
    status = read_status(run_dir, open_run(run_dir))
    (wait,) = waits(status)
    assert wait.startswith("sync 4 (ordered ")
    assert (
        "waiting for rollout 1 (last heartbeat 12 s ago, generating since 40 s: 2 prompts" in wait
    )
    assert "not checked in: rollout replica 1 tp rank 0" in wait
    screen = render(status)
    assert "rollout 0: 2 / 1" not in screen  # both read: dispatched 2, read 2
    assert "rollout 0: 2 / 2" in screen and "rollout 1: 1 / 1" in screen
    assert "max_staleness 2: results from v3 on are trainable" in screen
    assert "prompts in flight by least version: v3: 1, v4: 2" in screen
    assert len(screen.splitlines()) < 40  # one screen


@pytest.mark.redis
def test_without_published_check_ins_the_unconfirmed_replica_is_named(tmp_path, redis_url):
    run_dir = make_run_dir(tmp_path, redis_url)
    fill_run(redis_url)
    (wait,) = waits(read_status(run_dir, open_run(run_dir)))
    assert "sync 4" in wait and "waiting for rollout 1 (last heartbeat 12 s ago" in wait


@pytest.mark.redis
def test_every_activity_state_and_a_bare_beat_render(tmp_path, redis_url):
    run_dir = make_run_dir(tmp_path, redis_url)
    client = fill_run(redis_url, open_sync=False)
    for state in STATES:
        beat(client, "rollout", "0", activity("rollout", "0", state, 5, f"doing {state}"), 1)
        screen = render(read_status(run_dir, open_run(run_dir)))
        assert f"{state} for 5.0 s: doing {state}" in screen
    beat(client, "rollout", "1", b"1", 20)
    status = read_status(run_dir, open_run(run_dir))
    screen = render(status)
    assert "(bare heartbeat)" in screen
    assert "no heartbeat: rollout 1 (last heartbeat 20 s ago, its heartbeat stopped" in screen
    client.delete(Keys(RUN_ID).heartbeat("rollout", "1"))  # expired: still registered
    screen = render(read_status(run_dir, open_run(run_dir)))
    assert "rollout 1 (no heartbeat for over 30 s" in screen


def run_status(run_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gantry", "status", str(run_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


@pytest.mark.redis
def test_the_command_says_one_line_when_redis_is_gone_or_the_run_is_over(tmp_path, redis_url):
    run_dir = make_run_dir(tmp_path, "redis://127.0.0.1:1/0")  # nothing listens on port 1
    gone = run_status(run_dir)
    assert gone.returncode == 1
    assert gone.stderr.count("\n") == 1 and "is unreachable" in gone.stderr, gone.stderr
    (run_dir / "result.json").write_text(json.dumps({"steps": 20}))
    over = run_status(run_dir)
    assert over.returncode == 0 and over.stdout.startswith("the run is over:"), over.stderr
    assert "steps 20" in over.stdout and over.stdout.count("\n") == 1
    with pytest.raises(StatusError, match="no run.json"):
        open_run(tmp_path)


@pytest.mark.redis
def test_the_command_prints_the_screen(tmp_path, redis_url):
    run_dir = make_run_dir(tmp_path, redis_url)
    fill_run(redis_url)
    shown = run_status(run_dir)
    assert shown.returncode == 0, shown.stderr
    assert "waiting for:\n  sync 4 (ordered" in shown.stdout
    assert "waiting for rollout 1" in shown.stdout


@pytest.mark.redis
def test_check_ins_are_published_as_members_arrive(redis_url):
    """The hook in sync_groups.check_in on a real TCPStore: the sender alone shows only
    itself; once the receiver checks in, both."""
    import torch.distributed as dist

    from gantry.comm import sync_groups

    client = redis.Redis.from_url(redis_url)
    keys = Keys(RUN_ID)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    one = SyncPlan(group=GROUP, host="127.0.0.1", port=store.port,
                   receivers=[Receiver(replica="0", ranks=1)], timeout_s=30)  # fmt: skip
    listener = SyncCheckIns(client, keys)
    sync_groups.add_check_in_listener(listener)
    try:
        sender = threading.Thread(
            target=sync_groups.check_in, args=(store, one, 1, "policy sender 0", 7)
        )
        sender.start()
        deadline = time.monotonic() + 10
        while read_check_ins(client, keys, 7) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        published = read_check_ins(client, keys, 7)
        assert published["group"] == GROUP
        assert list(published["arrived"]) == ["policy sender 0"]
        sync_groups.check_in(store, one, 1, "rollout replica 0 tp rank 0", 7)
        sender.join(timeout=10)
        assert not sender.is_alive()
    finally:
        sync_groups.remove_check_in_listener(listener)
    arrived = read_check_ins(client, keys, 7)["arrived"]
    assert sorted(arrived) == ["policy sender 0", "rollout replica 0 tp rank 0"]
    assert 0 < client.ttl(f"{keys.prefix}sync:7") <= 3600


def wait_until(what, timeout: float, why: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := what():
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {why}")


def rollout_pid(run_dir: Path) -> int | None:
    """The rollout replica's pid from its heartbeat (its Activity record)."""
    client = open_run(run_dir)
    status = read_status(run_dir, client)
    process = status.process("rollout", "0")
    return process.activity.get("pid") if process and process.activity else None


def open_sync_waiting_on(run_dir: Path, replica: str):
    status = read_status(run_dir, open_run(run_dir))
    rollout = status.process("rollout", replica)
    stopped = rollout is not None and (rollout.beat_age or 0) > 3  # it really is stopped
    return stopped and any(replica in sync.unconfirmed for sync in status.syncs)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_status_of_a_run_with_a_stopped_rollout_names_it(tmp_path):
    """A real run (one rollout replica, transformers engine) whose rollout process is
    SIGSTOPped: the next weight sync waits for it, and `gantry status` says so; SIGCONT and
    the run finishes; its metrics plot."""
    steps = 12
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gantry.launch", "--config", "configs/quickstart-grpo.toml",
         "datasets/arithmetic.py", f"train.output_dir={tmp_path}", "rollout.backend=transformers",
         "train.train_batch_per_replica=64", "rollout.batch_size=4", f"train.max_num_steps={steps}",
         "train.train_policy.allowed_outdated_steps=3", "train.ckpt.export_safetensors=false"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True)
    reader.start()
    pid = None
    try:
        run_dir = wait_until(
            lambda: next(tmp_path.glob("*/run.json"), None), 120, "run.json"
        ).parent
        metrics = run_dir / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 300,
                   "step 3")  # fmt: skip
        pid = wait_until(lambda: rollout_pid(run_dir), 30, "the rollout's pid in its heartbeat")
        os.kill(pid, signal.SIGSTOP)
        # Before the controller drops it (its heartbeat expires after 30 s).
        wait_until(lambda: open_sync_waiting_on(run_dir, "0"), 25, "a sync waiting on rollout 0")
        shown = run_status(run_dir)
        os.kill(pid, signal.SIGCONT)
        pid = None
        assert shown.returncode == 0, shown.stderr
        waiting = shown.stdout.split("waiting for:\n", 1)[1].split("\n\n", 1)[0]
        assert "sync " in waiting and ": waiting for rollout 0 (last heartbeat" in waiting, (
            shown.stdout
        )
        assert launcher.wait(timeout=400) == 0, "".join(output)[-6000:]
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    over = run_status(run_dir)
    assert over.returncode == 0 and over.stdout.startswith("the run is over:")
    from gantry.watch.plot import panels_for, plot_run, read_metrics

    assert {"reward", "loss", "KL", "staleness"} <= {
        p.title for p in panels_for(read_metrics(run_dir))
    }
    assert plot_run(run_dir).stat().st_size > 10_000
