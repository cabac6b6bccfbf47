"""The rendered sbatch script run as a batch job (gantry/launch/slurm.py): under the environment
SLURM gives a batch job, with `srun` and `scontrol` emulated by small scripts on PATH and
launch.sh replaced by one that records what each node was given; and, where slurmctld/slurmd
are installed and the test runs as root (the `slow` test), on a one-node SLURM cluster started
in tmp_path, checked with `sbatch --test-only`, then submitted and run to completion.
The CLI and the script's header: tests/test_slurm.py.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gantry.config import load_config
from gantry.launch.launcher import parse_args
from gantry.launch.redis_server import free_port
from gantry.launch.slurm import render_sbatch
from tests.sbatch_reading import check_sbatch_header, sbatch_options

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "configs" / "quickstart-grpo.toml"
DATASET = ROOT / "datasets" / "arithmetic.py"

# Overrides that must reach every node's launcher unchanged: a space, both quote characters.
TRICKY = ['custom.note=it\'s a "test"', 'logging.experiment_name="two words"']


# ------------------------------------------------- the script under an emulated SLURM job

FAKE_SCONTROL = """\
#!/bin/bash
# `scontrol show hostnames LIST` for a comma-separated LIST of host names.
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unsupported: $*" >&2; exit 2; }
tr ',' '\\n' <<< "$3"
"""
FAKE_SRUN = """\
#!/bin/bash
# One job step: the command once per node, with SLURM_NODEID set and --output's %x %j %n
# expanded; fails if a node fails. Records its own arguments.
printf '%s\\0' "$@" > "$GANTRY_TEST_RECORDS/srun.argv"
out=""
while [ $# -gt 0 ] && [[ "$1" == -* ]]; do
  case "$1" in
    --output=*) out="${1#--output=}" ;;
    --nodes=*) [ "${1#--nodes=}" = "$SLURM_NNODES" ] || { echo "bad $1" >&2; exit 2; } ;;
    --ntasks-per-node=1|--kill-on-bad-exit=1|--gpus-per-node=*|--cpus-per-task=*) ;;
    --container-*) ;;
    *) echo "fake srun: unexpected option $1" >&2; exit 2 ;;
  esac
  shift
done
IFS=, read -ra hosts <<< "$SLURM_JOB_NODELIST"
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
  log="${out//\\%x/$SLURM_JOB_NAME}"; log="${log//\\%j/$SLURM_JOB_ID}"; log="${log//\\%n/$n}"
  SLURM_NODEID=$n SLURM_PROCID=$n SLURMD_NODENAME=${hosts[$n]} "$@" > "$log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_LAUNCH = """\
#!/bin/bash
# Stands in for Gantry's launch.sh: records its arguments and environment.
records="$GANTRY_TEST_RECORDS/node$SLURM_NODEID"
printf '%s\\0' "$@" > "$records.argv"
printf '%s\\0' "$GANTRY_REDIS_PASSWORD" "$GANTRY_RUN_ID" "$PWD" "${GANTRY_TEST_SETUP:-}" > "$records.env"
echo "launcher on node $SLURM_NODEID"
"""


def fake_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "launch.sh").write_text(FAKE_LAUNCH)
    (root / "launch.sh").chmod(0o755)
    return root


def nul_fields(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


def run_as_batch_job(script_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a batch script as slurmd would: its #SBATCH --output/--error honoured."""
    options = dict(sbatch_options(script_path.read_text()))

    def log(option: str) -> Path:
        name = options[option].replace("%x", env["SLURM_JOB_NAME"])
        return Path(name.replace("%j", env["SLURM_JOB_ID"]))

    with log("--output").open("w") as out, log("--error").open("w") as err:
        return subprocess.run(
            ["bash", str(script_path)], stdout=out, stderr=err, env=env, timeout=30
        )


def emulated_slurm_job(tmp_path: Path, hosts: list[str]) -> tuple[dict[str, str], Path]:
    """The environment SLURM gives a batch job on `hosts`, with srun and scontrol emulated on
    PATH; and the folder the fakes record into."""
    bin_dir, records = tmp_path / "bin", tmp_path / "records"
    for folder in (bin_dir, records):
        folder.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "GANTRY_TEST_RECORDS": str(records),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "gantry",
        "SLURM_JOB_NODELIST": ",".join(hosts),
        "SLURM_NNODES": str(len(hosts)),
        "SLURM_NODEID": "0",  # the batch script runs on the first node
        "SLURM_CPUS_ON_NODE": "96",
    }
    return env, records


def test_script_runs_under_the_slurm_environment(tmp_path):
    root = fake_checkout(tmp_path)
    logs = tmp_path / "logs with space"
    logs.mkdir()
    overrides = [
        "slurm.nodes=3",
        "slurm.controller_port=6399",
        f"slurm.log_dir={logs}",
        'slurm.setup=["export GANTRY_TEST_SETUP=done-$SLURM_NODEID", "echo \'setup\' on node $SLURM_NODEID"]',
        'slurm.srun_args=["--container-image=/images/gantry image.sqsh"]',
        *TRICKY,
    ]  # fmt: skip
    config = load_config(GRPO, overrides)
    script = render_sbatch(config, GRPO, DATASET, overrides, root=root)
    check_sbatch_header(script)
    script_path = tmp_path / "job.sbatch"
    script_path.write_text(script)
    env, records = emulated_slurm_job(tmp_path, ["gpu-a1", "gpu-b2", "gpu-c3"])
    result = run_as_batch_job(script_path, env)
    job_out, job_err = logs / "gantry-4242.out", logs / "gantry-4242.err"
    assert result.returncode == 0, job_err.read_text()
    assert "controller gpu-a1:6399" in job_out.read_text()

    srun_argv = nul_fields(records / "srun.argv")
    assert "--container-image=/images/gantry image.sqsh" in srun_argv
    assert "--ntasks-per-node=1" in srun_argv and "--kill-on-bad-exit=1" in srun_argv
    assert "--cpus-per-task=96" in srun_argv  # the whole node's CPUs for its launcher
    passwords = set()
    for node in range(3):
        assert nul_fields(records / f"node{node}.argv") == [
            "--nnodes", "3", "--node-rank", str(node), "--controller", "gpu-a1:6399",
            "--run-id", "slurm-4242", "--config", str(GRPO), str(DATASET), *overrides,
        ]  # fmt: skip
        password, run_id, cwd, setup = nul_fields(records / f"node{node}.env")
        assert (run_id, cwd, setup) == ("slurm-4242", str(root), f"done-{node}")
        passwords.add(password)
        node_log = (logs / f"gantry-4242-node{node}.out").read_text()
        assert node_log == f"setup on node {node}\nlauncher on node {node}\n"
    assert len(passwords) == 1 and len(password) >= 24, "one non-empty password for all nodes"
    # What each node got is what Gantry's launcher takes.
    args = parse_args(nul_fields(records / "node1.argv"))
    assert (args.nnodes, args.node_rank, args.controller, args.run_id) == (
        3, 1, "gpu-a1:6399", "slurm-4242",
    )  # fmt: skip
    assert (args.config, args.dataset, args.overrides) == (str(GRPO), str(DATASET), overrides)
    for path in [script_path, *logs.iterdir()]:
        assert password not in path.read_text(), f"the password leaked into {path}"

    # A new job gets a new password.
    run_as_batch_job(script_path, {**env, "SLURM_JOB_ID": "4243"})
    assert nul_fields(records / "node0.env")[0] not in passwords


def test_a_requeued_job_resumes_its_run_and_each_job_has_its_own_port(tmp_path):
    """A requeued job (SLURM_RESTART_COUNT > 0) resumes its own run directory once it holds a
    complete checkpoint; the Redis port comes from the job id unless slurm.controller_port."""
    root = fake_checkout(tmp_path)
    out = tmp_path / "outputs"
    overrides = ["slurm.nodes=2", f"train.output_dir={out}"]
    config = load_config(GRPO, overrides)
    script_path = tmp_path / "job.sbatch"
    script_path.write_text(render_sbatch(config, GRPO, DATASET, overrides, root=root))
    env, records = emulated_slurm_job(tmp_path, ["gpu-a1", "gpu-b2"])
    (out / "slurm-logs").mkdir(parents=True)  # what slurm.sh does before it submits

    def node_args(**extra: str) -> list[str]:
        result = run_as_batch_job(script_path, {**env, **extra})
        assert result.returncode == 0
        return nul_fields(records / "node1.argv")

    first = node_args()
    assert first[first.index("--controller") + 1] == f"gpu-a1:{20000 + 4242 % 40000}"
    assert not any(arg.startswith("train.resume=") for arg in first)
    run_dir = out / "slurm-4242"
    (run_dir / "checkpoints" / "step_10").mkdir(parents=True)  # a save that never finished
    assert not any(a.startswith("train.resume=") for a in node_args(SLURM_RESTART_COUNT="1"))
    (run_dir / "checkpoints" / "step_10" / "COMPLETE").touch()
    assert node_args(SLURM_RESTART_COUNT="1")[-1] == f"train.resume={run_dir}"
    again = node_args(SLURM_JOB_ID="77")
    assert again[again.index("--controller") + 1] == "gpu-a1:20077"


# --------------------------------------------------------------- a real one-node SLURM cluster

SLURM_CONF = """\
ClusterName=gantrytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm_cluster(tmp_path):
    """slurmctld and slurmd on 127.0.0.1 with state in tmp_path; yields the environment that
    points SLURM's commands at it (SLURM_CONF)."""
    missing = [name for name in ("slurmctld", "slurmd", "sbatch") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip("slurmd needs root to start jobs")
    folder = tmp_path / "slurm"
    (folder / "state").mkdir(parents=True)
    (folder / "spool").mkdir()
    (folder / "dev").mkdir()
    for i in range(8):  # 8 stand-in "GPUs": slurmd only counts them here (task/none)
        (folder / "dev" / f"gpu{i}").touch()
    (folder / "gres.conf").write_text(f"Name=gpu File={folder}/dev/gpu[0-7]\n")
    probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30)
    cpus = re.search(r"CPUs=(\d+)", probe.stdout)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            dir=folder,
            cpus=cpus.group(1) if cpus else os.cpu_count(),
            ctld_port=free_port(),
            slurmd_port=free_port(),
        )  # fmt: skip
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
        subprocess.Popen(["slurmd", "-D", "-N", host], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env, timeout=10
            ).stdout.strip()
            if state == "idle":
                break
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                log = (folder / "slurmctld.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"the test cluster did not come up (node state {state!r}):\n{log}")
            time.sleep(0.2)
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


@pytest.mark.slow
def test_real_slurm_runs_the_rendered_script(tmp_path, slurm_cluster):
    env = {**slurm_cluster, "GANTRY_TEST_RECORDS": str(tmp_path / "records")}
    (tmp_path / "records").mkdir()
    root, logs = fake_checkout(tmp_path), tmp_path / "logs"
    logs.mkdir()  # what slurm.sh does before it submits
    overrides = [
        "slurm.partition=debug", "slurm.time=10", "slurm.cpus_per_task=1",
        f"slurm.log_dir={logs}", "slurm.exclusive=true",
        'slurm.setup=["export GANTRY_TEST_SETUP=done"]', *TRICKY,
    ]  # fmt: skip
    config = load_config(GRPO, overrides)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(config, GRPO, DATASET, overrides, root=root))

    test_only = subprocess.run(
        ["sbatch", "--test-only", str(script)], capture_output=True, text=True, env=env, timeout=30
    )
    assert test_only.returncode == 0, test_only.stderr
    assert "to start at" in test_only.stderr

    submitted = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, timeout=30
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline, state = time.monotonic() + 20, ""
    while time.monotonic() < deadline:
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env
        ).stdout
        state = re.search(r"JobState=(\S+)", shown).group(1)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            break
        time.sleep(0.2)
    job_err = logs / f"gantry-{job}.err"
    assert state == "COMPLETED", job_err.read_text() if job_err.exists() else state
    host = socket.gethostname().split(".")[0]
    assert nul_fields(tmp_path / "records" / "node0.argv") == [
        "--nnodes", "1", "--node-rank", "0", "--controller", f"{host}:6380",
        "--run-id", f"slurm-{job}", "--config", str(GRPO), str(DATASET), *overrides,
    ]  # fmt: skip
    password, run_id, cwd, setup = nul_fields(tmp_path / "records" / "node0.env")
    assert (run_id, cwd, setup) == (f"slurm-{job}", str(root), "done") and password
    assert (logs / f"gantry-{job}-node0.out").read_text() == "launcher on node 0\n"
    for path in logs.iterdir():
        assert password not in path.read_text()
