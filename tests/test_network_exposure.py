"""Closed by default: every socket a single-node run listens on is bound to 127.0.0.1, and the
stores a multi-node run exposes want the run's secret.

The sockets are read from /proc/net/tcp{,6} (LISTEN entries) and mapped to the run's processes
through their file descriptors (/proc/PID/fd socket inodes), while the run trains."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from gantry.launch import lifeline
from gantry.launch.attempt import network_env
from gantry.launch.redis_server import RedisServer, free_port
from gantry.run.runtime import RunInfo

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", "configs/quickstart-grpo.toml", "datasets/arithmetic.py"]
LISTEN = "0A"  # the TCP state of a listening socket in /proc/net/tcp


def listening_by_inode() -> dict[str, tuple[str, int]]:
    """Every listening TCP socket of the machine: inode -> (address, port)."""
    found = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with_fds = Path(f"/proc/{pid}/fd")
    try:
        for fd in with_fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:  # the process is gone
        pass
    return inodes


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def listening_of(pids: list[int]) -> set[tuple[str, int, str]]:
    """(address, port, command) of each socket these processes listen on."""
    listening = listening_by_inode()
    return {
        (*listening[inode], command_of(pid))
        for pid in pids
        for inode in socket_inodes(pid) & listening.keys()
    }


def is_loopback(address: str) -> bool:
    return address == "::1" or address.startswith("127.") or address.startswith("::ffff:127.")


def test_the_socket_reader_sees_an_open_socket():
    """What the run test relies on: a socket bound to every interface is seen as such."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        seen = listening_of([os.getpid()])
    assert ("0.0.0.0", port) in {(a, p) for a, p, _ in seen}
    assert not is_loopback("0.0.0.0") and not is_loopback("::")


def test_a_single_node_run_puts_gloo_and_nccl_on_the_loopback_interface(monkeypatch):
    info = RunInfo(
        run_id="r", run_dir="/tmp/r", redis_url="redis://127.0.0.1:1/0", dataset_script="d.py",
        dataset_size=1, model_path="m", policy_master="127.0.0.1:2",
    )  # fmt: skip
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth7")  # the user's choice stays
    assert network_env(info) == {"GLOO_SOCKET_IFNAME": "lo"}
    info.head_host = "node-a"  # several nodes: the weight-sync store is in the run's Redis
    assert network_env(info) == {"GANTRY_RUN_STORE": "redis://127.0.0.1:1/0 gantry:r:sync-store/"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_socket_of_a_single_node_run_is_on_loopback(tmp_path):
    """The real launcher: a policy job of 2 ranks, a vLLM replica of 2 TP workers; every
    socket of every process of the run listens on 127.0.0.1, and the ones that would be open
    by themselves (Redis, torchrun's agent store, gloo's pairs, vLLM's) were seen."""
    launcher = subprocess.Popen(
        [
            sys.executable, "-m", "gantry.launch", *QUICKSTART, f"train.output_dir={tmp_path}",
            "policy.parallelism.dp_shard_size=2", "rollout.parallelism.tp_size=2",
            "train.max_num_steps=3",
        ],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen: set[tuple[str, int, str]] = set()
    try:
        while launcher.poll() is None:
            tree = [launcher.pid] + [pid for pid, _ in lifeline.descendants(launcher.pid)]
            seen |= listening_of(tree)
            time.sleep(0.3)
        output = launcher.stdout.read()
    finally:
        if launcher.poll() is None:
            lifeline.kill_tree(lifeline.descendants(launcher.pid))
            launcher.kill()
    assert launcher.returncode == 0, output[-4000:]
    open_ones = sorted(s for s in seen if not is_loopback(s[0]))
    assert not open_ones, "\n".join(f"{a}:{p} {c}" for a, p, c in open_ones)
    commands = " ".join(c for _, _, c in seen)
    assert "redis-server" in commands, seen
    assert "gantry.launch.policy_job" in commands, seen  # torchrun's agent store
    assert "-m policy" in commands, seen  # the ranks' gloo pairs and the weight-sync store
    assert "VLLM::Worker" in commands, seen  # vLLM's TP groups


@pytest.mark.slow
def test_the_run_store_refuses_a_wrong_secret(tmp_path):
    """A multi-node run's stores are in its Redis: a peer with the wrong secret, or none, is
    refused in one line naming the variable; one with the secret reads and writes."""
    from gantry.comm.store import RedisStore, StoreRefused

    with RedisServer(tmp_path, password="the-secret") as server:
        for wrong in ("not-it", None):
            with pytest.raises(StoreRefused) as refused:
                RedisStore(server.url, wrong, "t/", timeout_s=5)
            message = str(refused.value)
            assert "\n" not in message and "GANTRY_REDIS_PASSWORD" in message, message
            assert "the-secret" not in message
        store = RedisStore(server.url, "the-secret", "t/", timeout_s=5)
        store.set("a", "1")
        assert store.get("a") == b"1" and store.add("n", 2) == 2 and store.add("n", 3) == 5
        assert store.compare_set("c", "", "x") == b"x" and store.compare_set("c", "y", "z") == b"x"
        assert store.check(["a", "c"]) and not store.check(["a", "missing"])
        assert store.multi_get(["a", "n"]) == [b"1", b"5"]
        assert store.clone().get("n") == b"5"  # c10d clones a store for its other threads
        started = time.monotonic()
        with pytest.raises(Exception, match="wait timeout"):
            store.wait(["missing"], timedelta(seconds=0.3))
        assert 0.3 <= time.monotonic() - started < 2
        assert store.delete_key("a") and not store.check(["a"])


@pytest.mark.slow
def test_the_weight_sync_store_of_a_multi_node_run_wants_the_secret(tmp_path, monkeypatch):
    """Across nodes the launcher names the run's Redis (GANTRY_RUN_STORE): the weight-sync
    store is kept there, and a member with the wrong secret is refused."""
    from gantry.comm.store import RedisStore, StoreRefused
    from gantry.comm.sync_groups import connect_store

    with RedisServer(tmp_path, password="the-secret") as server:
        monkeypatch.setenv("GANTRY_RUN_STORE", f"{server.url} gantry:r:sync-store/")
        monkeypatch.setenv("GANTRY_REDIS_PASSWORD", "not-it")
        with pytest.raises(StoreRefused):
            connect_store("127.0.0.2", free_port(), host_it=False, timeout_s=5)
        monkeypatch.setenv("GANTRY_REDIS_PASSWORD", "the-secret")
        store = connect_store("127.0.0.2", 4567, host_it=True, timeout_s=5)
        assert isinstance(store, RedisStore)
        store.set("k", "v")
        assert server_keys(server) == [b"gantry:r:sync-store/127.0.0.2:4567/k"]


def server_keys(server: RedisServer) -> list[bytes]:
    import redis

    client = redis.Redis(host=server.bind, port=server.port, password=server.password)
    try:
        return sorted(client.keys("*"))
    finally:
        client.close()


def _run_info(tmp_path: Path, redis_url: str, head: str) -> RunInfo:
    info = RunInfo(
        run_id="net", run_dir=str(tmp_path), redis_url=redis_url, dataset_script="d.py",
        dataset_size=1, model_path="m", head_host=head, policy_master=f"{head}:{free_port()}",
    )  # fmt: skip
    info.write()
    return info


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_policy_agent_without_the_secret_is_refused_in_one_line(tmp_path):
    """torchrun's agent of a multi-node run (node 0 on 127.0.0.2) meets through the run's
    Redis: started with the wrong secret, it stops at once with one line and exit 2."""
    with RedisServer(tmp_path / "redis", password="the-secret") as server:
        _run_info(tmp_path, server.url, "127.0.0.2")
        result = subprocess.run(
            [
                sys.executable, "-m", "gantry.launch.policy_job", str(tmp_path), "--nnodes=2",
                "--nproc-per-node=1", "--rdzv-backend=gantry", "--rdzv-endpoint=127.0.0.2:1",
                "--rdzv-id=net-0", "--rdzv-conf=rank=1", "-m", "policy",
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=100,
            env=dict(os.environ, GANTRY_REDIS_PASSWORD="not-it"),
        )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "refused" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_multi_node_policy_job_meets_through_redis_with_the_secret(tmp_path):
    """Two agents of 1 rank each (two "nodes", node 0 on 127.0.0.2) form the policy job
    through the run's Redis: no TCPStore of torchrun listens, and the ranks' group works."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from gantry.run.runtime import RunInfo\n"
        "from policy.parallel import join_policy_job\n"
        "env = join_policy_job(RunInfo.read(sys.argv[1]), timeout_s=60)\n"
        "import gc; gc.collect()  # the store's Python half must outlive this\n"
        "t = torch.tensor([env.rank + 1.0]); dist.all_reduce(t, group=dist.new_group([0, 1]))\n"
        "print('sum', int(t.item()))\n"
    )
    with RedisServer(tmp_path / "redis", password="the-secret") as server:
        info = _run_info(tmp_path, server.url, "127.0.0.2")
        env = dict(os.environ, GANTRY_REDIS_PASSWORD="the-secret", PYTHONPATH=str(ROOT))
        agents = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gantry.launch.policy_job",
                    str(tmp_path),
                    "--nnodes=2",
                    "--nproc-per-node=1",
                    "--rdzv-backend=gantry",
                    f"--rdzv-endpoint={info.policy_master}",
                    "--rdzv-id=net-0",
                    f"--rdzv-conf=rank={rank}",
                    str(script),
                    str(tmp_path),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )  # fmt: skip
            for rank in (0, 1)
        ]
        outputs = [agent.communicate(timeout=280)[0] for agent in agents]
    for agent, output in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, output[-3000:]
        assert "sum 3" in output, output[-3000:]
