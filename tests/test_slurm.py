"""SLURM submission (gantry/launch/slurm.py): the [slurm] section, the sbatch script and ./slurm.sh.

The rendered script is checked three ways: its #SBATCH header is parsed the way sbatch parses it
and every option checked; it is run with bash under the environment SLURM gives a batch job,
with `srun` and `scontrol` emulated by small scripts on PATH and launch.sh replaced by one that
records what each node was given; and, where slurmctld/slurmd are installed and the test runs as
root (the `slow` test), a one-node SLURM cluster is started in tmp_path and the script is
checked with `sbatch --test-only`, then submitted and run to completion.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gantry.config import ConfigError, load_config
from gantry.launch.launcher import parse_args
from gantry.launch.redis_server import free_port
from gantry.launch.slurm import render_sbatch

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "configs" / "quickstart-grpo.toml"
SFT = ROOT / "configs" / "quickstart-sft.toml"
DATASET = ROOT / "datasets" / "arithmetic.py"
pytestmark = pytest.mark.timeout(60)

# Overrides that must reach every node's launcher unchanged: a space, both quote characters.
TRICKY = ['custom.note=it\'s a "test"', 'logging.experiment_name="two words"']


def slurm_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "gantry.launch.slurm", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env=env,
    )  # fmt: skip


# --------------------------------------------------------------- sbatch's reading of a script


def split_directive(text: str) -> list[str]:
    """The words of an #SBATCH line as sbatch reads them: blanks split, double quotes group,
    a backslash escapes the next character, '#' outside quotes starts a comment."""
    words, word, quoted, escaped, in_word = [], "", False, False, False
    for char in text:
        if escaped:
            word, escaped, in_word = word + char, False, True
        elif char == "\\":
            escaped = in_word = True
        elif char == '"':
            quoted, in_word = not quoted, True
        elif char == "#" and not quoted:
            break
        elif char.isspace() and not quoted:
            if in_word:
                words.append(word)
            word, in_word = "", False
        else:
            word, in_word = word + char, True
    assert not quoted, f"unbalanced quote in #SBATCH{text}"
    return [*words, word] if in_word else words


def sbatch_options(script: str) -> list[tuple[str, str | None]]:
    """(option, value) of each #SBATCH option, read like sbatch: only #SBATCH lines that come
    before the first command count (comments and blank lines may sit between them)."""
    lines = script.splitlines()
    assert lines[0].startswith("#!"), "sbatch wants an interpreter line first"
    options = []
    for line in lines[1:]:
        if line.startswith("#SBATCH"):
            for word in split_directive(line[len("#SBATCH") :]):
                name, sep, value = word.partition("=")
                options.append((name, value if sep else None))
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return options


_COUNT = re.compile(r"[1-9]\d*")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# sbatch's --time forms, written out independently of gantry.launch.slurm's validator.
_TIME = re.compile(r"\d+|\d+:\d\d|\d+:\d\d:\d\d|\d+-\d\d?|\d+-\d\d?:\d\d|\d+-\d\d?:\d\d:\d\d")
SBATCH_LONG_OPTIONS = {  # option -> check of its value (None: a flag that takes no value)
    "--job-name": _NAME.fullmatch,
    "--nodes": re.compile(r"[1-9]\d*(-[1-9]\d*)?").fullmatch,
    "--ntasks-per-node": _COUNT.fullmatch,
    "--gpus-per-node": re.compile(r"([A-Za-z0-9_]+:)?[1-9]\d*").fullmatch,
    "--cpus-per-task": _COUNT.fullmatch,
    "--partition": re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*").fullmatch,
    "--account": _NAME.fullmatch,
    "--time": _TIME.fullmatch,
    "--output": lambda v: v.startswith("/") and "%j" in v,
    "--error": lambda v: v.startswith("/") and "%j" in v,
    "--qos": _NAME.fullmatch,
    "--mail-type": re.compile(r"(NONE|BEGIN|END|FAIL|ALL)(,(BEGIN|END|FAIL|ALL))*").fullmatch,
    "--exclusive": None,
}


def check_sbatch_header(script: str) -> dict[str, str | None]:
    options = sbatch_options(script)
    names = [name for name, _ in options]
    assert len(names) == len(set(names)), f"an option is given twice: {names}"
    for name, value in options:
        assert name in SBATCH_LONG_OPTIONS, f"{name} is not an sbatch option we expect"
        check = SBATCH_LONG_OPTIONS[name]
        if check is None:
            assert value is None, f"{name} takes no value, got {value!r}"
        else:
            assert value is not None and check(value), f"{name}: bad value {value!r}"
    return dict(options)


# ------------------------------------------------------------------------------------ the CLI


def test_dry_run_prints_the_script(tmp_path):
    out = tmp_path / "out"
    result = slurm_cli(
        "--config", GRPO, DATASET, "slurm.nodes=2", 'slurm.partition="gpu"',
        "slurm.account=proj", 'slurm.sbatch_args=["--qos=high", "--exclusive"]',
        f"train.output_dir={out}", "--dry-run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=gantry",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=04:00:00",
        f"#SBATCH --output={out}/slurm-logs/%x-%j.out",
        f"#SBATCH --error={out}/slurm-logs/%x-%j.err",
        "#SBATCH --qos=high",
        "#SBATCH --exclusive",
    ]
    check_sbatch_header(script)
    assert "set -x" not in script and "echo $GANTRY_REDIS_PASSWORD" not in script
    assert f"--config {GRPO} {DATASET} slurm.nodes=2 'slurm.partition=\"gpu\"'" in script
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not out.exists(), "a dry run writes nothing"
    assert os.access(ROOT / "slurm.sh", os.X_OK)


@pytest.mark.parametrize(
    "override, named",
    [
        ("slurm.partiton=gpu", ["slurm.partiton", "did you mean 'partition'"]),
        ("slurm.time=1:2:3:4", ["slurm.time", "HH:MM:SS"]),
        ("slurm.time=25:99:00", ["slurm.time", "minutes/seconds < 60"]),
        ("slurm.time=0", ["slurm.time", "no limit"]),
        ("slurm.nodes=0", ["slurm.nodes", ">= 1"]),
        ("slurm.controller_port=80", ["slurm.controller_port", ">= 1024"]),
        ("slurm.job_name=my job", ["slurm.job_name", "letters, digits"]),
        ('slurm.sbatch_args=["--nodes=3"]', ["slurm.sbatch_args", "slurm.nodes"]),
        ('slurm.sbatch_args=["qos=high"]', ["slurm.sbatch_args", "--qos=high"]),
        ('slurm.sbatch_args=["-N4"]', ["slurm.sbatch_args", "slurm.nodes"]),
        ("slurm.policy_nodes=2", ["slurm.policy_nodes", "rollout"]),  # nodes=2 below
    ],
)
def test_bad_slurm_settings_exit_2_naming_the_key(override, named):
    result = slurm_cli("--config", GRPO, DATASET, "slurm.nodes=2", override, "--dry-run")
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error: ")
    for text in named:
        assert text in result.stderr
    assert not result.stdout


def test_bad_slurm_table_in_a_toml_file(tmp_path):
    config = tmp_path / "rl.toml"
    config.write_text('[slurm]\nnodes = 2\ntime = "forever"\ngpu_per_node = 4\n')
    result = slurm_cli("--config", config, DATASET, "--dry-run")
    assert result.returncode == 2
    assert (
        "slurm.gpu_per_node: unknown key 'gpu_per_node' in [slurm]; did you mean 'gpus_per_node'?"
        in (result.stderr)
    )
    assert "slurm.time: expected a SLURM time limit" in result.stderr


def test_missing_dataset_script_exits_2(tmp_path):
    result = slurm_cli("--config", GRPO, tmp_path / "nope.py", "--dry-run")
    assert result.returncode == 2 and "dataset script not found" in result.stderr


@pytest.mark.parametrize("value", ["30", "30:00", "04:00:00", "100:00:00", "2-0", "1-12:30", "7-00:00:00"])  # fmt: skip
def test_slurm_time_formats_accepted(value):
    assert load_config(None, [f"slurm.time={value}"]).slurm.time == value


def test_policy_nodes_rule_depends_on_the_run_type():
    from gantry.launch.slurm import allocation_problems

    grpo = load_config(GRPO, ["slurm.nodes=3", "slurm.policy_nodes=2"])
    assert allocation_problems(grpo) == []
    sft = load_config(SFT, ["slurm.nodes=2", "slurm.policy_nodes=2"])  # SFT: no rollout nodes
    assert allocation_problems(sft) == []
    too_many = load_config(SFT, ["slurm.nodes=2", "slurm.policy_nodes=3"])
    assert allocation_problems(too_many) == ["slurm.policy_nodes = 3 exceeds slurm.nodes = 2"]
    idle = load_config(SFT, ["slurm.nodes=3", "slurm.policy_nodes=1"])
    assert "leave 2 of the 3 nodes idle" in allocation_problems(idle)[0]
    with pytest.raises(ValueError, match="exceeds"):
        render_sbatch(too_many, SFT, DATASET)
    with pytest.raises(ConfigError, match="slurm.policy_nodes"):
        load_config(GRPO, ["slurm.policy_nodes=-1"])


def test_submit_writes_the_script_and_reports_the_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_sbatch = bin_dir / "sbatch"
    fake_sbatch.write_text(f'#!/bin/bash\ncp "$1" {tmp_path}/submitted\necho "Submitted batch job 77"\n')  # fmt: skip
    fake_sbatch.chmod(0o755)
    out = tmp_path / "out"
    args = ["--config", GRPO, DATASET, f"train.output_dir={out}", "slurm.job_name=arith"]
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    result = slurm_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    written = out / "slurm-logs" / "arith.sbatch"
    assert written.read_text() == (tmp_path / "submitted").read_text()
    assert "#SBATCH --job-name=arith" in written.read_text()
    assert "submitted job 77" in result.stdout
    assert f"{out}/slurm-logs/arith-77.out" in result.stdout
    assert f"{out}/slurm-77/logs/<role>.log" in result.stdout

    no_sbatch = slurm_cli(*args, env={**os.environ, "PATH": str(tmp_path / "empty")})
    assert no_sbatch.returncode == 1
    assert "sbatch not found: run on a SLURM login node, or use --dry-run" in no_sbatch.stderr


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


def test_script_runs_under_the_slurm_environment(tmp_path):
    root = fake_checkout(tmp_path)
    bin_dir, records, logs = tmp_path / "bin", tmp_path / "records", tmp_path / "logs with space"
    for folder in (bin_dir, records, logs):
        folder.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
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
    hosts = ["gpu-a1", "gpu-b2", "gpu-c3"]
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "GANTRY_TEST_RECORDS": str(records),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "gantry",
        "SLURM_JOB_NODELIST": ",".join(hosts),
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "0",  # the batch script runs on the first node
    }
    result = run_as_batch_job(script_path, env)
    job_out, job_err = logs / "gantry-4242.out", logs / "gantry-4242.err"
    assert result.returncode == 0, job_err.read_text()
    assert "controller gpu-a1:6399" in job_out.read_text()

    srun_argv = nul_fields(records / "srun.argv")
    assert "--container-image=/images/gantry image.sqsh" in srun_argv
    assert "--ntasks-per-node=1" in srun_argv and "--kill-on-bad-exit=1" in srun_argv
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
        f"slurm.log_dir={logs}", 'slurm.sbatch_args=["--exclusive"]',
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


def test_module_imports_no_torch():
    code = textwrap.dedent(
        """
        import sys
        import gantry.launch.slurm, gantry.config.loader
        assert "torch" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
