"""A torch Dataset of dicts, returned by a Gantry-style get_dataset (its class defined in the
script, which Gantry imports as `gantry_dataset_script`), through the places that take samples:
rollout prompts and the policy's VLM re-encoding index it (fast), and real runs through
`python -m gantry.launch`: SFT with encoder processes and validation, GRPO (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gantry.data.plugin import load_dataset_script, prompt_messages

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import torch.utils.data


class Additions(torch.utils.data.Dataset):
    def __init__(self, size, offset):
        self.size, self.offset = size, offset

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        a, b = (index + self.offset) % 5, (index * 3) % 5
        question = {"role": "user", "content": f"What is {a} + {b}?"}
        answer = {"role": "assistant", "content": str(a + b)}
        return {"messages": [question, answer], "answer": str(a + b)}


def get_dataset(config):
    return Additions(config.get("size", 64), 0)


def get_val_dataset(config):
    return Additions(8, 1)


def exact(completion, sample, **kw):
    return float(completion.strip() == sample["answer"])


reward_fns = [exact]
"""


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "torch_additions.py"
    path.write_text(SCRIPT)
    return path


def test_rollout_prompts_and_policy_reencoding_index_a_torch_dataset(script, tiny_llm):
    from rollout.prompts import PromptBuilder

    loaded = load_dataset_script(script)
    samples = loaded.load_samples({"size": 10})
    assert type(samples).__name__ == "Additions" and len(samples) == 10
    prompts = PromptBuilder(str(tiny_llm)).build(samples, [3, 0, 9], script)
    assert len(prompts) == 3 and all(isinstance(p, list) and p for p in prompts)
    # GRPOTrainer._prompt_vision takes a VLM prompt's messages the same way.
    assert prompt_messages(samples[3], "", 3) == samples[3]["messages"][:1]
    assert loaded.score(" 7 ", samples[3], 3) == 1.0  # 3 + 4
    assert loaded.score("6", samples[3], 3) == 0.0


def launch(out: Path, config: str, script: Path, *overrides: str) -> tuple[str, dict]:
    cmd = [
        sys.executable, "-m", "gantry.launch", "--config", config, str(script),
        f'train.output_dir="{out}"', "custom.size=64", "logging.log_interval=1", *overrides,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return result.stdout, json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_sft_with_encoder_processes_on_a_torch_dataset(script, tmp_path):
    """Two encoder processes unpickle the script's Dataset class (they used to die with
    `No module named 'gantry_dataset_script'`, then BrokenProcessPool); validation too."""
    _, result = launch(
        tmp_path / "out", "configs/quickstart-sft.toml", script,
        "train.train_policy.dataloader_num_workers=2", "train.train_batch_per_replica=16",
        "train.train_policy.mini_batch=8", "train.max_num_steps=4", "validation.freq=2",
    )  # fmt: skip
    assert result["type"] == "sft" and result["steps"] == 4
    assert [v["step"] for v in result["validations"]] == [2, 4]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_grpo_on_a_torch_dataset(script, tmp_path):
    _, result = launch(
        tmp_path / "out", "configs/quickstart-grpo.toml", script, "rollout.backend=transformers",
        "train.max_num_steps=2", "train.train_batch_per_replica=64",
    )  # fmt: skip
    assert result["steps"] == 2 and result["duplicates"] == 0
