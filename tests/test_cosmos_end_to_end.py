"""A cosmos-rl-shaped script through the real launcher (`python -m gantry.launch`), a few steps.

The scripts read their config as cosmos-rl scripts do (argparse `--config`, `Config.from_dict`).
They need neither the tokenizer nor [custom] values in the workers: until the launcher and the
workers pass `config=` and `model_path=` to load_dataset_script, the workers see cosmos-rl's
defaults there (docs/cosmos-rl.md)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gantry.config import config_to_toml, load_config

ROOT = Path(__file__).resolve().parents[1]

GRPO = """
import argparse
import tomllib

from torch.utils.data import Dataset

from cosmos_rl.launcher.worker_entry import main as launch_worker
from cosmos_rl.policy.config import Config


class SumDataset(Dataset):
    def setup(self, config, *args, **kwargs):
        self.items = [(i % 5, (i * 3) % 5) for i in range(64)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        a, b = self.items[idx]
        return [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}]

    def get_reference_answer(self, idx):
        return str(sum(self.items[idx]))


def exact(to_be_evaluated, reference, *args, **kwargs):
    return float(to_be_evaluated.strip() == reference)


def answered(to_be_evaluated, reference, prompt=None):
    assert prompt[0]["role"] == "user"
    return 1.0, {"answered": 1.0}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=str, required=True)
    args = parser.parse_known_args()[0]
    with open(args.config, "rb") as f:
        config = Config.from_dict(tomllib.load(f))
    assert config.train.train_policy.dataset.name == ""
    launch_worker(dataset=lambda config: SumDataset(), reward_fns=[exact, (answered, 0.25)])
"""

SFT = """
import cosmos_rl.launcher.worker_entry


class Conversations:
    def __len__(self):
        return 64

    def __getitem__(self, idx):
        return [
            {"role": "user", "content": f"Echo {idx % 7}"},
            {"role": "assistant", "content": str(idx % 7)},
        ]


if __name__ == "__main__":
    cosmos_rl.launcher.worker_entry.main(dataset=Conversations())
"""


def launch(tmp_path, base, body, *overrides):
    config = load_config(base, [f"train.output_dir={tmp_path / 'out'}", *overrides])
    (tmp_path / "cosmos.toml").write_text(config_to_toml(config))
    (tmp_path / "script.py").write_text(textwrap.dedent(body))
    result = subprocess.run(
        [sys.executable, "-m", "gantry.launch", "--config", str(tmp_path / "cosmos.toml"),
         str(tmp_path / "script.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cosmos_grpo_script_trains_through_the_launcher(tmp_path):
    outcome = launch(
        tmp_path,
        "configs/quickstart-grpo.toml",
        GRPO,
        "train.max_num_steps=3",
        "rollout.backend=transformers",
        "train.train_batch_per_replica=64",
        "train.train_policy.mini_batch=64",
        "rollout.batch_size=4",
    )
    assert outcome["steps"] == 3
    assert outcome["reward_mean_first_10"] >= 0.25  # the weighted (reward, info) function ran


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cosmos_sft_script_trains_through_the_launcher(tmp_path):
    outcome = launch(
        tmp_path,
        "configs/quickstart-sft.toml",
        SFT,
        "train.max_num_steps=3",
        "train.train_batch_per_replica=8",
        "train.train_policy.mini_batch=8",
        "validation.enable=false",
    )
    assert outcome["steps"] == 3
