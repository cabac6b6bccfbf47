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


def start_two_nodes(tmp_path, password: str, *overrides: str) -> list[subprocess.Popen]:
    """Node 1 then node 0 of a GRPO run, each a launcher process; node 0 on 127.0.0.2."""
    port = free_port("127.0.0.2")
    env = dict(os.environ, GANTRY_REDIS_PASSWORD=password)
    common = [
        sys.executable, "-m", "gantry.launch", *QUICKSTART, f"train.output_dir={tmp_path}",
        "rollout.backend=transformers", "logging.log_interval=1", *overrides,
        "--nnodes", "2", "--controller", f"127.0.0.2:{port}", "--run-id", "two-nodes",
    ]  # fmt: skip
    nodes = []
    for rank in (1, 0):  # the joining node first: it waits for node 0
        command = [*common, "--node-rank", str(rank)]
        nodes.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        )
    return nodes


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
