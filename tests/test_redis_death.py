"""The run's Redis dies (issue 18): the embedded redis-server SIGKILLed mid-run is named in one
line; with a restart left (fault_tolerance.max_restarts) it comes back on the same port, with
the same password, from its append-only file, and the run finishes with every prompt trained
exactly once; without one, the run stops with that line and exit 1; either way no process of
the run is left. Also: the server's persistence and the clients' reconnection, alone."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gantry.comm.protocol import WorkerFailed
from gantry.comm.transport import PASSWORD_ENV, ControlPlane
from gantry.launch.redis_server import RedisServer, RedisWatch
from tests.test_interrupt import LONG, Launcher, commands, wait_gone

HELLO = WorkerFailed(role="rollout", replica="0", error="a message")
QUICKSTART = ["--config", "configs/quickstart-grpo.toml", "datasets/arithmetic.py"]


def redis_pid(launcher: Launcher, timeout: float = 30) -> int:
    """The embedded redis-server among the launcher's children (found by its parent link;
    its command line says which one it is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in {pid for pid, _ in launcher.tree()}:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # redis-server rewrites its command line as "PATH ADDRESS:PORT".
            if argv and argv[0].split(b" ")[0].endswith(b"redis-server"):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no redis-server under the launcher: {commands(launcher.tree())}")


def records(run_dir: Path) -> list[dict]:
    """The last record of each step (a restarted run repeats steps: the last one counts)."""
    last: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if not record.get("validation"):
            last[record["step"]] = record
    return [last[step] for step in sorted(last)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_redis_server_is_restarted_from_its_journal_and_the_run_carries_on(tmp_path):
    steps = 12
    launcher = Launcher(
        tmp_path / "out", *QUICKSTART, *LONG, f"train.max_num_steps={steps}",
        "fault_tolerance.max_restarts=1",
    )  # fmt: skip
    try:
        run_dir = launcher.run_dir()
        launcher.wait_for(rf"step 3/{steps}", 300)
        pid = redis_pid(launcher)
        os.kill(pid, signal.SIGKILL)
        launcher.wait_for(rf"redis-server \(pid {pid}\) died \(signal 9\): starting it again", 30)
        tree = launcher.tree()
        assert launcher.finish(timeout=400) == 0, launcher.output()[-8000:]
        assert not wait_gone(tree, 10), commands(wait_gone(tree, 0))
    finally:
        launcher.kill()
    output = launcher.output()
    assert "(restart 1/1); the run carries on" in output, output[-6000:]
    # The processes reconnected: no restart of the run or of the controller, no traceback.
    assert "restart 1/1:" not in output and "controller restart" not in output, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    metrics = records(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)), output[-6000:]
    trained = [p for m in metrics for p in m["prompt_ids"]]
    assert len(trained) == steps * len(metrics[0]["prompt_ids"]) == len(set(trained))
    assert json.loads((run_dir / "result.json").read_text())["steps"] == steps


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_redis_server_without_a_restart_left_stops_the_run_with_one_line(tmp_path):
    launcher = Launcher(tmp_path / "out", *QUICKSTART, *LONG, "fault_tolerance.max_restarts=0")
    try:
        run_dir = launcher.run_dir()
        launcher.wait_for(r"step 2/", 300)
        tree = launcher.tree()
        pid = redis_pid(launcher)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        assert launcher.finish(timeout=120) == 1, launcher.output()[-8000:]
        assert time.monotonic() - killed < 30  # the workers are not left retrying
        assert not wait_gone(tree, 10), commands(wait_gone(tree, 0))
    finally:
        launcher.kill()
    output = launcher.output()
    line = f"[launcher] redis-server (pid {pid}) died (signal 9): the run cannot go on"
    assert output.count(line) == 1, output[-6000:]
    assert "no restart is left" in output and "Traceback" not in output, output[-6000:]
    assert "restart 1/" not in output, output[-6000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["process"] == "redis-server", result
    assert result["error"].startswith(f"redis-server (pid {pid}) died (signal 9)"), result


@pytest.mark.redis
def test_the_server_comes_back_with_its_data_and_a_blocked_reader_reconnects(tmp_path, monkeypatch):
    """The pieces alone: a committed transaction survives SIGKILL (append-only file), the
    server is started again on its port with its password, and a client blocked in XREAD
    (socket_timeout=None) and a plain one both carry on (gantry.comm.transport's retry)."""
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    server = RedisServer(tmp_path, password="s3cret", persist=True, die_with_parent=True)
    server.start()
    said: list[str] = []
    budget = ["1/1"]
    watch = RedisWatch(
        said.append, server=server, take_restart=lambda: budget.pop() if budget else None
    )
    watch.start()
    plane, port = ControlPlane(server.url), server.port
    try:
        pipe = plane.redis.pipeline(transaction=True)
        pipe.set("state", "7")
        pipe.rpush("records", "a", "b")
        pipe.execute()
        got: list = []
        reader = threading.Thread(target=lambda: got.extend(plane.read_next("s", block_ms=20_000)))
        reader.start()
        time.sleep(0.3)  # the reader is blocked in XREAD
        first = server.process.pid
        os.kill(first, signal.SIGKILL)
        assert plane.redis.get("state") == b"7"  # waits for the restart, then reads it back
        assert plane.redis.lrange("records", 0, -1) == [b"a", b"b"]
        assert server.port == port and server.process.pid != first
        plane.send("s", HELLO)
        reader.join(timeout=20)
        assert got == [HELLO]
        with pytest.raises(redis.AuthenticationError):  # the same password
            redis.Redis(port=port, password="wrong", retry=Retry(NoBackoff(), 0)).ping()
        assert said == [
            f"redis-server (pid {first}) died (signal 9): starting it again on port {port} "
            "from its append-only file (restart 1/1); the run carries on"
        ]
        os.kill(server.process.pid, signal.SIGKILL)  # no restart left
        deadline = time.monotonic() + 5
        while watch.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watch.lost is not None and "no restart is left" in watch.lost
    finally:
        plane.close()
        watch.close()
        server.stop()
    assert server.process.poll() is not None


@pytest.mark.redis
def test_a_configured_redis_that_stops_answering_is_named_by_its_address(tmp_path, monkeypatch):
    from gantry.launch import redis_server

    monkeypatch.setattr(redis_server, "EXTERNAL_PING_S", 0.1)
    monkeypatch.setattr(redis_server, "EXTERNAL_GRACE_S", 0.5)
    server = RedisServer(tmp_path)
    url = server.start()
    said: list[str] = []
    watch = RedisWatch(said.append, url=url).start()
    try:
        time.sleep(0.3)
        assert watch.lost is None  # it answers
        server.stop()
        deadline = time.monotonic() + 10
        while watch.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watch.close()
        server.stop()
    assert said == [watch.lost], said
    assert watch.lost.startswith(f"the run's Redis at {url} (redis.url) has not answered for 0.5 s")
    assert "ConnectionError" in watch.lost and "stopping the run" in watch.lost


@pytest.mark.redis
def test_a_refused_password_is_not_retried(tmp_path, monkeypatch):
    """Reconnecting is for a server that went away, not for a wrong password."""
    server = RedisServer(tmp_path, password="right")
    server.start()
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    plane = ControlPlane(server.url)
    try:
        started = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            plane.redis.ping()
        assert time.monotonic() - started < 1
    finally:
        plane.close()
        server.stop()


@pytest.mark.redis
def test_a_new_job_in_the_same_run_directory_starts_with_an_empty_redis(tmp_path):
    """A requeued job takes its run directory over: the AOF of the job before is not loaded
    (its controller state is past the checkpoint the new job resumes from)."""
    first = RedisServer(tmp_path, persist=True)
    first.start()
    client = redis.Redis(port=first.port, protocol=2)
    client.set("old", "1")
    client.close()
    first.stop()
    second = RedisServer(tmp_path, persist=True)
    second.start()
    try:
        assert redis.Redis(port=second.port, protocol=2).get("old") is None
    finally:
        second.stop()
