"""SLURM submission (gantry/launch/slurm.py): the [slurm] section, the sbatch script and ./slurm.sh.

The CLI's dry run and submission, the errors that name a bad key, the allocation rules; each
rendered #SBATCH header is parsed the way sbatch parses it (tests/sbatch_reading.py) and every
option checked. The script run as a batch job, emulated and on a real one-node cluster, is
tested in tests/test_slurm_job.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gantry.config import ConfigError, load_config
from gantry.launch.slurm import render_sbatch
from tests.sbatch_reading import check_sbatch_header

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "configs" / "quickstart-grpo.toml"
SFT = ROOT / "configs" / "quickstart-sft.toml"
DATASET = ROOT / "datasets" / "arithmetic.py"


def slurm_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "gantry.launch.slurm", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env=env,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ the CLI


def test_dry_run_prints_the_script(tmp_path):
    out = tmp_path / "out"
    result = slurm_cli(
        "--config", GRPO, DATASET, "slurm.nodes=2", 'slurm.partition="gpu"',
        "slurm.account=proj", 'slurm.sbatch_args=["--qos=high"]',
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
        "#SBATCH --exclusive",  # whole nodes by default: the launcher runs every process
        "#SBATCH --mem=0",
        "#SBATCH --requeue",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=04:00:00",
        f"#SBATCH --output={out}/slurm-logs/%x-%j.out",
        f"#SBATCH --error={out}/slurm-logs/%x-%j.err",
        "#SBATCH --qos=high",
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
        ("slurm.controller_port=80", ["slurm.controller_port", "1024 to 65535"]),
        ("slurm.exclusive=false", ["slurm.cpus_per_task", "one CPU"]),
        ('slurm.mem="lots"', ["slurm.mem", "512G"]),
        ('slurm.sbatch_args=["--exclusive"]', ["slurm.sbatch_args", "slurm.exclusive"]),
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


def test_shared_nodes_get_the_cpus_and_memory_asked(tmp_path):
    result = slurm_cli(
        "--config", GRPO, DATASET, "slurm.exclusive=false", "slurm.cpus_per_task=12",
        'slurm.mem="64G"', "slurm.requeue=false", "slurm.controller_port=7000", "--dry-run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    options = check_sbatch_header(result.stdout)
    assert options["--cpus-per-task"] == "12" and options["--mem"] == "64G"
    assert "--exclusive" not in options and "--no-requeue" in options
    assert "--cpus-per-task=12" in result.stdout  # srun's step gets them too
    assert "GANTRY_CONTROLLER_PORT=7000" in result.stdout


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


def test_module_imports_no_torch():
    code = textwrap.dedent(
        """
        import sys
        import gantry.launch.slurm, gantry.config.loader
        assert "torch" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
