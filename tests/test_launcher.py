"""The launcher on bad input (exit 2 before any worker starts) and its dry run."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)

DATASET = textwrap.dedent(
    """
    def get_dataset(config):
        return [{"prompt": f"say {i}", "answer": str(i)} for i in range(10)]

    def exact(completion, sample, **kw):
        return float(completion.strip() == sample["answer"])

    reward_fns = [exact]
    """
)


def launch(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "gantry.launch", *map(str, args)],
        capture_output=True, text=True, cwd=cwd or ROOT, timeout=100,
    )  # fmt: skip


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "toy.py"
    path.write_text(DATASET)
    return path


def write_config(tmp_path, text: str) -> Path:
    path = tmp_path / "rl.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_unknown_key_exits_2_naming_key_and_suggestion(tmp_path, dataset):
    config = write_config(tmp_path, "[train]\noptm_lrr = 1e-5\n")
    result = launch("--config", config, dataset)
    assert result.returncode == 2
    assert "optm_lrr" in result.stderr and "optm_lr" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_wrong_type_override_exits_2(tmp_path, dataset):
    result = launch(dataset, "train.optm_lr=fast", f"train.output_dir={tmp_path}/out")
    assert result.returncode == 2
    assert "train.optm_lr" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_and_broken_dataset_scripts_exit_2(tmp_path):
    result = launch(tmp_path / "missing.py")
    assert result.returncode == 2 and "missing.py" in result.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("def get_dataset(config):\n    return [{'prompt': 'x'}]\n")
    result = launch(broken)
    assert result.returncode == 2 and "reward_fns" in result.stderr and "broken.py" in result.stderr


def test_dataset_too_small_for_one_step_exits_2(tmp_path, dataset):
    result = launch(dataset, "train.train_batch_per_replica=96", "rollout.n_generation=8")
    assert result.returncode == 2
    assert "train.train_batch_per_replica" in result.stderr


def test_dry_run_prints_resolved_config_and_plan(tmp_path, dataset):
    config = write_config(tmp_path, "[train]\nepoch = 3\n")
    result = launch(
        "--config",
        config,
        dataset,
        "rollout.n_generation=4",
        "train.train_batch_per_replica=8",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert "epoch = 3" in result.stdout and "n_generation = 4" in result.stdout
    # 10 prompts x 3 epochs / (8 / 4) prompts per step
    assert "policy steps: 15" in result.stdout


def test_dry_run_shows_the_policy_layout_and_takes_overrides_after_flags(tmp_path, dataset):
    result = launch(
        dataset, "--dry-run", "rollout.n_generation=4", "train.train_batch_per_replica=8",
        "policy.parallelism.n_init_replicas=2", "policy.parallelism.dp_shard_size=-1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # two replicas of one rank each (CPU: -1 is 1); 10 prompts / (2 x 8 / 4) per step
    assert "policy: 2 replica(s) x 1 rank(s)" in result.stdout
    assert "policy steps: 2" in result.stdout


@pytest.mark.slow
def test_bad_resume_and_bad_layout_exit_2(tmp_path, dataset):
    result = launch(dataset, f"train.output_dir={tmp_path}", f"train.resume={tmp_path / 'none'}")
    assert result.returncode == 2 and "no complete checkpoint in" in result.stderr
    result = launch(
        dataset, "rollout.n_generation=4", "train.train_batch_per_replica=8",
        "policy.parallelism.dp_shard_size=3",
    )  # fmt: skip
    assert result.returncode == 2
    assert "divisible by the ranks of a policy replica" in result.stderr


def test_only_a_dead_controller_restarts_and_only_within_its_budget():
    from gantry.launch.attempt import ControllerRestarts
    from gantry.run.runtime import EXIT_RUN_FAILED

    restart = ControllerRestarts(most=2)
    assert not restart("policy0", 1)  # a policy death restarts the whole run instead
    assert not restart("controller", EXIT_RUN_FAILED)  # the controller failed the run
    assert restart("controller", -9) and restart("controller", 1)
    assert not restart("controller", -9)  # budget spent: the whole run restarts
    assert not ControllerRestarts(most=0)("controller", -9)


def test_a_model_path_that_is_not_there_exits_2_before_any_worker(tmp_path, dataset):
    missing = tmp_path / "models" / "qwen-sft"
    result = launch(
        dataset, f"policy.model_name_or_path={missing}", f"train.output_dir={tmp_path}/out"
    )
    assert result.returncode == 2, result.stderr
    assert "policy.model_name_or_path" in result.stderr and "no directory there" in result.stderr
    assert not list((tmp_path / "out").glob("2*"))  # no run directory, no process started


def test_a_reward_function_name_the_script_lacks_exits_2_before_any_worker(tmp_path):
    """train.train_policy.reward_function is checked against the script's reward_fns by the
    launcher (a list given on the command line is a list, not a string)."""
    result = launch(
        "datasets/arithmetic.py", "--config", "configs/quickstart-grpo.toml",
        'train.train_policy.reward_function=["correct_reward", "accuracy"]',
        f"train.output_dir={tmp_path}/out",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "reward_function names 'accuracy'" in result.stderr, result.stderr
    assert "correct_reward, format_reward" in result.stderr
    assert not list((tmp_path / "out").glob("2*"))
