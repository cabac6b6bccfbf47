"""The run's secrets and listening sockets: a password in redis.url never reaches config.json
or run.json, an embedded Redis always has a password (kept in a 0600 file for the user's
commands), and the weight-sync store listens on the address it was given, not on every
interface."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from gantry.comm.transport import PASSWORD_ENV, SECRET_FILE, redis_password
from gantry.config import load_config
from gantry.launch.placement import LaunchError
from gantry.launch.redis_server import free_port
from gantry.launch.run_secret import ensure_password, take_password_out_of_url, write_secret

ROOT = Path(__file__).resolve().parents[1]


def no_password(monkeypatch) -> None:
    """No password in the environment, and none left there after the test: the code under
    test writes os.environ itself, which monkeypatch restores only for a name it has set."""
    monkeypatch.setenv(PASSWORD_ENV, "")
    monkeypatch.delenv(PASSWORD_ENV)


def test_a_password_in_redis_url_moves_to_the_environment(monkeypatch):
    no_password(monkeypatch)
    config = load_config(None, ['redis.url="redis://gantry:s3cret@10.0.0.5:6390/2"'])
    take_password_out_of_url(config)
    assert config.redis.url == "redis://gantry@10.0.0.5:6390/2"
    assert os.environ[PASSWORD_ENV] == "s3cret"
    monkeypatch.setenv(PASSWORD_ENV, "another")
    config = load_config(None, ['redis.url="redis://:s3cret@10.0.0.5:6390"'])
    with pytest.raises(LaunchError, match="keep one of them"):
        take_password_out_of_url(config)
    unchanged = load_config(None, ['redis.url="redis://10.0.0.5:6390"'])
    take_password_out_of_url(unchanged)
    assert unchanged.redis.url == "redis://10.0.0.5:6390"


def test_the_secret_file_is_the_owners_only_and_read_back(tmp_path, monkeypatch):
    no_password(monkeypatch)
    password = ensure_password()
    assert len(password) >= 24 and os.environ[PASSWORD_ENV] == password
    assert ensure_password() == password  # one per run
    path = write_secret(tmp_path, password)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.delenv(PASSWORD_ENV)
    assert redis_password(tmp_path) == password and redis_password() is None


def test_the_sync_store_listens_on_its_address_only():
    """torch's TCPStore listens on every interface by itself; the sync store is handed a
    socket bound to the plan's host."""
    code = (
        "import sys; from gantry.comm.sync_groups import connect_store; "
        f"s = connect_store('127.0.0.1', {free_port()}, host_it=True, timeout_s=5); "
        "print(s.port, flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=ROOT,
    )  # fmt: skip
    try:
        port = int(child.stdout.readline())
        listening = [
            line.split()[1]
            for name in ("/proc/net/tcp", "/proc/net/tcp6")
            for line in Path(name).read_text().splitlines()[1:]
            if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port
        ]
        assert listening == [f"0100007F:{port:04X}"], listening  # 127.0.0.1 only
    finally:
        child.stdin.close()
        child.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_single_node_run_keeps_its_password_to_itself(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "gantry.launch", "--config", "configs/quickstart-grpo.toml",
         "datasets/arithmetic.py", f"train.output_dir={out}", "train.max_num_steps=2",
         "rollout.backend=transformers", "train.train_batch_per_replica=64",
         "train.train_policy.mini_batch=64", "rollout.n_generation=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    secret = run_dir / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert len(password) >= 24
    for path in run_dir.rglob("*"):
        if path.is_file() and path != secret and path.stat().st_size < 10_000_000:
            assert password.encode() not in path.read_bytes(), f"the password is in {path}"
    assert password not in done.stdout + done.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert info["redis_url"].startswith("redis://127.0.0.1:")


@pytest.mark.redis
def test_the_embedded_server_refuses_clients_without_the_password(tmp_path):
    from gantry.launch.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", free_port(), "", password="pw-" + "x" * 24)
    url = server.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url, socket_connect_timeout=3).ping()
        assert redis.Redis.from_url(url, password="pw-" + "x" * 24).ping()
    finally:
        server.stop()


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_an_unusable_redis_url_is_one_line_and_exit_2(tmp_path):
    """A closed port, then a server that wants a password it is not given: one line each,
    exit 2, no run directory made."""
    from gantry.launch.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", free_port(), "", password="pw-" + "y" * 24)
    url = server.start()
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    try:
        for target, said in [
            (f"redis://127.0.0.1:{free_port()}", "cannot connect"),
            (url, "the server refused the connection without a password"),
        ]:
            done = subprocess.run(
                [sys.executable, "-m", "gantry.launch", "--config",
                 "configs/quickstart-grpo.toml", "datasets/arithmetic.py",
                 f"train.output_dir={tmp_path / 'out'}", f'redis.url="{target}"'],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=100,
            )  # fmt: skip
            assert done.returncode == 2, done.stdout + done.stderr
            (line,) = done.stderr.strip().splitlines()
            assert line.startswith(f"error: redis.url = {target}: {said}"), line
            assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    finally:
        server.stop()
