"""Runs over several nodes: the node plan (who runs what, on which GPUs), the launcher's checks
of the node flags, and a 2-node GRPO run on this machine (two launchers; node 0 on 127.0.0.2,
so nothing reaches it through a hard-coded 127.0.0.1), whose Redis wants the password and which
survives the policy dying: both nodes restart from the last checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from gantry.config import load_config
from gantry.launch.attempt import process_command
from gantry.launch.launcher import main
from gantry.launch.nodes import NodePlanError, Placed, node_plan, with_cpu_shares
from gantry.launch.redis_server import free_port
from gantry.run.runtime import RunInfo

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", "configs/quickstart-grpo.toml", "datasets/arithmetic.py"]


def config(*overrides: str):
    return load_config(None, list(overrides))


def names(plan: list[list[Placed]]) -> list[list[str]]:
    return [[p.name for p in node] for node in plan]


def test_one_node_runs_everything_and_splits_its_gpus():
    cfg = config(
        "policy.parallelism.dp_shard_size=2", "rollout.parallelism.n_init_replicas=2",
        "rollout.parallelism.tp_size=2",
    )  # fmt: skip
    (node,) = node_plan(cfg, 1, gpus_per_node=8)
    assert [(p.name, p.gpus) for p in node] == [
        ("controller", ()), ("policy0", (0, 1)), ("rollout0", (2, 3)), ("rollout1", (4, 5)),
    ]  # fmt: skip
    assert node[1].env == {"CUDA_VISIBLE_DEVICES": "0,1"} and node[0].env == {}
    (cpu,) = node_plan(cfg, 1)
    assert all(p.gpus == () for p in cpu)


def test_rollout_replicas_of_a_cpu_node_split_its_cores():
    cfg = config("rollout.parallelism.n_init_replicas=2")
    (node,) = node_plan(cfg, 1)
    shared = with_cpu_shares(node, [0, 1, 2, 3, 4])
    assert [(p.name, p.cpus) for p in shared] == [
        ("controller", ()), ("policy0", ()), ("rollout0", (0, 1)), ("rollout1", (2, 3)),
    ]  # fmt: skip
    (one,) = node_plan(config(), 1)
    assert with_cpu_shares(one, [0, 1])[-1].cpus == (0, 1)
    (three,) = node_plan(config("rollout.parallelism.n_init_replicas=3"), 1)
    assert [p.cpus for p in with_cpu_shares(three, [0, 1])[2:]] == [(0,), (1,), (0,)]
    (gpu,) = node_plan(cfg, 1, gpus_per_node=4)
    assert with_cpu_shares(gpu, [0, 1, 2, 3]) == gpu  # GPU nodes: devices, not cores
    info = RunInfo(
        run_id="r", run_dir="/tmp/r", redis_url="redis://127.0.0.1:1", dataset_script="d.py",
        dataset_size=1, model_path="m", policy_master="127.0.0.1:2",
    )  # fmt: skip
    assert process_command(cfg, info, shared[3])[-2:] == ["--cpus", "2,3"]
    assert "--cpus" not in process_command(cfg, info, node[2])


def test_a_rollout_worker_refuses_cores_it_may_not_use():
    usable = sorted(os.sched_getaffinity(0))
    result = subprocess.run(
        [sys.executable, "-m", "rollout", "--run-dir", "x", "--cpus", f"{usable[-1] + 1}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"are not among the cores this process may use ({','.join(map(str, usable))})" in (
        result.stderr
    )


def test_grpo_nodes_split_between_policy_and_rollout():
    cfg = config(
        "policy.parallelism.n_init_replicas=2", "policy.parallelism.dp_shard_size=8",
        "rollout.parallelism.n_init_replicas=8", "rollout.parallelism.tp_size=2",
    )  # fmt: skip
    plan = node_plan(cfg, 4, gpus_per_node=8)  # 16 policy GPUs: 2 nodes, then 2 rollout nodes
    assert names(plan) == [
        ["controller", "policy0"], ["policy1"],
        [f"rollout{i}" for i in range(4)], [f"rollout{i}" for i in range(4, 8)],
    ]  # fmt: skip
    assert plan[3][3].gpus == (6, 7)
    with pytest.raises(NodePlanError, match="cannot be spread evenly over 3 rollout node"):
        node_plan(cfg, 4, policy_nodes=1, gpus_per_node=32)
    with pytest.raises(NodePlanError, match="needing 16 GPUs, but has 8"):
        node_plan(cfg, 3, policy_nodes=1, gpus_per_node=8)
    with pytest.raises(NodePlanError, match="leave no node for the rollout replicas"):
        node_plan(cfg, 2, policy_nodes=2)


def test_sft_trains_on_every_node():
    cfg = config('train.train_policy.type="sft"', "policy.parallelism.n_init_replicas=2")
    assert names(node_plan(cfg, 2)) == [["controller", "policy0"], ["policy1"]]


def test_node_flags_are_checked_before_anything_starts(tmp_path, capsys, monkeypatch):
    base = [*QUICKSTART, f"train.output_dir={tmp_path}", "--nnodes", "2"]
    monkeypatch.delenv("GANTRY_REDIS_PASSWORD", raising=False)
    assert main([*base, "--node-rank", "2"]) == 2
    assert "--node-rank 2 with --nnodes 2" in capsys.readouterr().err
    assert main([*base, "--controller", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main([*base, "--controller", "127.0.0.1:6390"]) == 2
    assert "needs a Redis password in GANTRY_REDIS_PASSWORD" in capsys.readouterr().err
    monkeypatch.setenv("GANTRY_REDIS_PASSWORD", "pw")
    assert main([*base, "--controller", "198.51.100.7:6390"]) == 2  # not this machine's
    assert "does not resolve to an address of this machine" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_node_that_cannot_reach_node_0_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GANTRY_REDIS_PASSWORD", "pw")
    port = free_port()
    code = main([
        *QUICKSTART, f"train.output_dir={tmp_path}", "--nnodes", "2", "--node-rank", "1",
        "--controller", f"127.0.0.1:{port}", "--connect-timeout", "2",
    ])  # fmt: skip
    assert code == 2
    assert f"cannot reach the run's Redis at redis://127.0.0.1:{port}/0 after 2s" in (
        capsys.readouterr().err
    )


def two_node_commands(tmp_path, *overrides: str) -> list[list[str]]:
    """Node 1's and node 0's launcher commands of a GRPO run; node 0 on 127.0.0.2."""
    port = free_port("127.0.0.2")
    common = [
        sys.executable, "-m", "gantry.launch", *QUICKSTART, f"train.output_dir={tmp_path}",
        "rollout.backend=transformers", "logging.log_interval=1", *overrides,
        "--nnodes", "2", "--controller", f"127.0.0.2:{port}", "--run-id", "two-nodes",
    ]  # fmt: skip
    return [[*common, "--node-rank", str(rank)] for rank in (1, 0)]


def start_node(command: list[str], password: str) -> subprocess.Popen:
    env = dict(os.environ, GANTRY_REDIS_PASSWORD=password)
    return subprocess.Popen(
        command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def start_two_nodes(tmp_path, password: str, *overrides: str) -> list[subprocess.Popen]:
    """Node 1 then node 0 of a GRPO run, each a launcher process (the joining node first: it
    waits for node 0)."""
    return [start_node(command, password) for command in two_node_commands(tmp_path, *overrides)]


@pytest.mark.redis
def test_a_reachable_redis_wants_the_password(tmp_path):
    from gantry.launch.redis_server import RedisServer, RedisServerError

    with pytest.raises(RedisServerError, match="needs a password"):
        RedisServer(tmp_path, bind="127.0.0.2")
    server = RedisServer(tmp_path, bind="127.0.0.2", password="pw")
    url = server.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url, protocol=2).set("k", "v")
        assert redis.Redis.from_url(url, password="pw").ping()
        assert "pw" not in " ".join(Path(f"/proc/{server.process.pid}/cmdline").read_text())
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_two_node_run_survives_the_policy_on_node_0_dying(tmp_path):
    """Node 0 runs the controller and the policy, node 1 the rollout replica; the policy is
    killed after the step-3 checkpoint: both nodes restart from it and the run finishes."""
    password = "two-node-secret"
    nodes = start_two_nodes(
        tmp_path, password, "train.max_num_steps=8", "train.ckpt.enable_checkpoint=true",
        "train.ckpt.save_freq=3", "train.ckpt.export_safetensors=false",
    )  # fmt: skip
    run_dir = tmp_path / "two-nodes"
    log = run_dir / "logs" / "controller.log"
    try:
        deadline = time.monotonic() + 300
        while "checkpoint step 3 complete" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and nodes[1].poll() is None
            time.sleep(0.2)
        pid = int(re.search(r"policy replica 0 registered \(pid (\d+)\)", log.read_text())[1])
        os.kill(pid, signal.SIGKILL)
        outputs = [node.communicate(timeout=400)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    joiner, head = outputs
    assert nodes[1].returncode == 0, head[-6000:]
    assert nodes[0].returncode == 0, joiner[-6000:]
    assert "[rollout0" in joiner and "[rollout0" not in head  # the rollout ran on node 1
    assert "[policy0" in head and "[controller" in head
    assert "restart 1/2: resuming from" in head
    assert "node 0 started the run again: restarting node 1's processes" in joiner
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["steps"] == 8 and outcome["resumed_from"]
    assert "0" in outcome["rollout_replicas"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["redis_url"].startswith("redis://127.0.0.2:")
    for text in [head, joiner, *(p.read_text() for p in (run_dir / "logs").iterdir())]:
        assert password not in text
    assert password not in (run_dir / "run.json").read_text()


def run_info(run_dir: Path, redis_url: str, run_id: str = "r") -> RunInfo:
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunInfo(
        run_id=run_id, run_dir=str(run_dir), redis_url=redis_url, dataset_script="d.py",
        dataset_size=1, model_path="m",
    )  # fmt: skip


@pytest.mark.redis
def test_an_error_recorded_on_another_node_stops_node_0(tmp_path, redis_url):
    """Run directories of nodes are not shared: node 0's launcher finds node 1's fatal record
    in the run's Redis and copies it into its own run directory for the report."""
    from gantry.comm.transport import ControlPlane
    from gantry.run.runtime import FatalWatch, record_fatal

    head = run_info(tmp_path / "node0", redis_url)
    other = run_info(tmp_path / "node1", redis_url)
    plane = ControlPlane(redis_url)
    watch = FatalWatch(Path(head.run_dir), plane, head.keys)
    assert not watch()
    record_fatal(other, "rollout0", "DatasetScriptError: reward f raised\nTraceback ...")
    assert watch.look_now()
    assert json.loads((tmp_path / "node0" / "fatal.json").read_text()) == {
        "process": "rollout0", "error": "DatasetScriptError: reward f raised",
    }  # fmt: skip
    record_fatal(head, "policy0", "a consequence")  # the first record wins, everywhere
    assert "rollout0" in (tmp_path / "node0" / "fatal.json").read_text()
    plane.close()


@pytest.mark.redis
def test_node_0_names_a_node_that_does_not_join(tmp_path, redis_url, capsys, monkeypatch):
    from gantry.comm.transport import ControlPlane
    from gantry.launch.multinode import Cluster, JoinWatch, announce_joined

    info = run_info(tmp_path / "run", redis_url)
    cluster = Cluster(3, 0, "127.0.0.1", "127.0.0.1", 0, "gantry:launch:r", [])
    monkeypatch.setattr(JoinWatch, "REPORT_AFTER_S", 0.2)
    watch = JoinWatch(info, cluster, timeout_s=1.5)
    plane = ControlPlane(redis_url)
    announce_joined(plane, Cluster(3, 1, "127.0.0.1", "127.0.0.1", 0, cluster.run_key, []), 0)
    stopped, began = False, time.monotonic()
    while not stopped and time.monotonic() - began < 10:
        stopped = watch()
        time.sleep(0.05)
    out = "".join(capsys.readouterr())
    assert stopped and 1.4 < time.monotonic() - began < 4
    assert "node 1 joined" in out and re.search(r"node\(s\) 2 not joined after 1s", out)
    fatal = json.loads((tmp_path / "run" / "fatal.json").read_text())
    assert fatal["process"] == "launcher"
    assert fatal["error"].startswith("node(s) 2 did not join within 2s")
    plane.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_node_with_the_wrong_password_is_reported_by_node_0(tmp_path):
    """Node 1 is refused by node 0's Redis and says so; node 0 names it and stops the run at
    fault_tolerance.node_join_timeout_s with exit 2, not retried, no process left behind."""
    joiner, head = two_node_commands(tmp_path, "fault_tolerance.node_join_timeout_s=6")
    wrong, nodes = start_node(joiner, "wrong"), [None, start_node(head, "right")]
    began = time.monotonic()
    try:
        wrong_out = wrong.communicate(timeout=60)[0]
        head_out = nodes[1].communicate(timeout=90)[0]
    finally:
        wrong.kill()
        nodes[1].kill()
    assert wrong.returncode == 2 and "refused GANTRY_REDIS_PASSWORD" in wrong_out, wrong_out
    assert nodes[1].returncode == 2, head_out[-3000:]
    assert "node(s) 1 not joined after 6s" in head_out
    assert "error: launcher: node(s) 1 did not join within 6s" in head_out
    assert "restart" not in head_out and time.monotonic() - began < 60
    run_dir = tmp_path / "two-nodes"
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"
    survivors = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True
    ).stdout.split()
    assert survivors == []
