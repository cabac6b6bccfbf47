"""cosmos-rl-shaped scripts and configs through the real launcher (`python -m gantry.launch`).

The scripts are written the way cosmos-rl users write them (the Cosmos-Reason1 guides' scripts:
`toml` + `Config.from_dict`, a torch Dataset with `setup(config, tokenizer)` and
`get_reference_answer`, cosmos-rl's built-in rewards, a forwarding packer, `val_dataset`), and the
configs in the key layout of each cosmos-rl release; each runs a few real steps."""

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import toml
from PIL import Image

from gantry.config import config_to_toml, load_config
from tests.test_cosmos_scripts import TRANSFORMING  # refused: it changes the prompt

ROOT = Path(__file__).resolve().parents[1]

# The pinned release's shape (cosmos_grpo.py of the Cosmos-Reason1 guides): toml, util, the
# built-in rewards, a packer that wraps a built-in one, setup(config, tokenizer).
GRPO = """
import argparse

import cosmos_rl.utils.util as util
import toml
from cosmos_rl.dispatcher.algo.reward import format_reward_fn, single_choice_reward_fn
from cosmos_rl.dispatcher.data.packer import DataPacker, DecoderOnlyLLMDataPacker
from cosmos_rl.launcher.worker_entry import main as launch_worker
from cosmos_rl.policy.config import Config
from cosmos_rl.utils.logging import logger
from torch.utils.data import Dataset


class SumDataset(Dataset):
    def setup(self, config, tokenizer, *args, **kwargs):
        # [custom] and a key Gantry's schema does not keep (a hint) reach every process.
        assert config.train.train_policy.dataloader_prefetch_factor == 3
        assert tokenizer.encode("1 + 2") and config.policy.model_name_or_path
        size = config.custom["task"]["size"]
        self.items = [(i % 5, (i * 3) % 5) for i in range(size)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        a, b = self.items[idx]
        return [
            {"role": "system", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": f"What is {a} + {b}?"}]},
        ]

    def get_reference_answer(self, idx):
        return str(sum(self.items[idx]))


def custom_reward_fn(to_be_evaluated, reference=None, *args, **kwargs):
    return sum([
        single_choice_reward_fn(to_be_evaluated, reference, *args, **kwargs),
        format_reward_fn(to_be_evaluated, reference, *args, **kwargs),
    ])


def answered(to_be_evaluated, reference, config=None, tokenizer=None):
    assert config.train.train_policy.type == "grpo" and tokenizer is not None
    return 1.0


class DemoDataPacker(DataPacker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.underlying_data_packer = DecoderOnlyLLMDataPacker()

    def setup(self, config, tokenizer, *args, **kwargs):
        super().setup(config, tokenizer, *args, **kwargs)
        self.underlying_data_packer.setup(config, tokenizer, *args, **kwargs)

    def get_rollout_input(self, item):
        return self.underlying_data_packer.get_rollout_input(item)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=str, required=True)
    args = parser.parse_known_args()[0]
    with open(args.config) as f:
        config = Config.from_dict(toml.load(f))
    assert config.train.enable_validation is False and config.validation.enable is False
    logger.info("model %s", util.basename_from_modelpath(config.policy.model_name_or_path))
    launch_worker(
        dataset=lambda config: SumDataset(),
        data_packer=DemoDataPacker(),
        reward_fns=[custom_reward_fn, (answered, 0.25)],
    )
"""

# The current release's shape of the Cosmos-Reason1 LLaVA SFT script: annotation_path and
# media_path under [custom.dataset], images as content parts with the vision settings.
SFT_LLAVA = """
import argparse
import json
import os
import re

import cosmos_rl.launcher.worker_entry
import cosmos_rl.policy.config
import toml
import torch.utils.data


class CustomDataset(torch.utils.data.Dataset):
    def __init__(self, config, annotation_path, media_path, vision_kwargs):
        self.annotation = json.load(open(annotation_path))
        self.media_path, self.vision_kwargs = media_path, vision_kwargs

    def __len__(self):
        return len(self.annotation)

    def __getitem__(self, idx):
        sample = self.annotation[idx]
        user_prompt = re.sub(r"(\\n)?</?(image|video)>(\\n)?", "", sample["conversations"][0]["value"])
        images = sample.get("image") or []
        images = [images] if isinstance(images, str) else images
        content = [{"type": "image", "image": os.path.join(self.media_path, p),
                    **self.vision_kwargs} for p in images]
        content.append({"type": "text", "text": user_prompt})
        return [
            {"role": "user", "content": content},
            {"role": "assistant", "content": sample["conversations"][1]["value"]},
        ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=str, required=True)
    args = parser.parse_known_args()[0]
    with open(args.config) as f:
        config_kwargs = toml.load(f)
    config = cosmos_rl.policy.config.Config.from_dict(config_kwargs)
    assert config.validation.enable and config.train.enable_validation
    custom = config_kwargs["custom"]
    data = custom["dataset"]
    dataset = CustomDataset(config, data["annotation_path"], data["media_path"], custom["vision"])
    val = CustomDataset(config, data["val_annotation_path"], data["media_path"], custom["vision"])
    print(dataset[0])
    cosmos_rl.launcher.worker_entry.main(dataset=dataset, val_dataset=val)
"""


def resolved_table(base: str, tmp_path: Path, *overrides: str) -> dict:
    """A config as a dict in today's layout (to be edited into a release's layout)."""
    config = load_config(base, [f"train.output_dir={tmp_path / 'out'}", *overrides])
    return tomllib.loads(config_to_toml(config))


def pinned_layout(table: dict) -> dict:
    """Validation keys where the release the Cosmos-Reason1 guides pin has them: under [train]."""
    validation = table.pop("validation")
    table["train"]["enable_validation"] = validation["enable"]
    table["train"]["validation_step"] = validation["freq"]
    table["train"]["validation_batch_per_replica"] = validation["batch_size"]
    return table


def launch(tmp_path: Path, table: dict, body: str, timeout: int = 280):
    (tmp_path / "cosmos.toml").write_text(toml.dumps(table))
    (tmp_path / "script.py").write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "gantry.launch", "--config", str(tmp_path / "cosmos.toml"),
         str(tmp_path / "script.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def run_dir_of(tmp_path: Path) -> Path:
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_guide_grpo_script_in_the_pinned_layout_trains(tmp_path):
    table = resolved_table(
        "configs/quickstart-grpo.toml", tmp_path,
        "train.max_num_steps=3", "rollout.backend=transformers",
        "train.train_batch_per_replica=64", "train.train_policy.mini_batch=64",
        "rollout.batch_size=4",
    )  # fmt: skip
    table = pinned_layout(table)
    table["train"]["train_policy"]["dataloader_prefetch_factor"] = 3  # a hint: kept for scripts
    table["custom"] = {"task": {"size": 64}}
    result = launch(tmp_path, table, GRPO)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert "train.enable_validation" in result.stderr  # the moved key, said in one line
    run_dir = run_dir_of(tmp_path)
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["steps"] == 3
    assert outcome["reward_mean_first_10"] >= 0.25  # the weighted `answered` ran with config=
    info = json.loads((run_dir / "run.json").read_text())
    assert info["ignored_config_keys"] == {"train.train_policy.dataloader_prefetch_factor": 3}
    assert Path(info["config_source"]).read_text() == (tmp_path / "cosmos.toml").read_text()


def llava_data(root: Path) -> None:
    (root / "media").mkdir(parents=True)
    for name, color in (("red", (220, 0, 0)), ("blue", (0, 0, 220))):
        Image.new("RGB", (56, 56), color).save(root / "media" / f"{name}.png")

    def entry(question, answer, image=None):
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return {"conversations": turns, **({"image": image} if image else {})}

    train = [
        entry("<image>\nWhat color is it?", "Red.", "red.png"),
        entry("<image>\nWhat color is it?", "Blue.", "blue.png"),
        entry("Say hi.", "Hi."),
        entry("Count to two.", "1 2"),
    ]
    val = [entry("<image>\nColor?", "Red.", "red.png"), entry("Say hi.", "Hi.")]
    (root / "train.json").write_text(json.dumps(train))
    (root / "val.json").write_text(json.dumps(val))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_guide_llava_sft_script_with_images_and_validation_trains(tmp_path):
    llava_data(tmp_path / "data")
    table = resolved_table(
        "configs/vlm-sft-llava.toml", tmp_path,
        'policy.model_name_or_path="gantry:tiny-qwen2.5-vl"', "policy.model_max_length=512",
        "policy.parallelism.dp_shard_size=1", 'train.param_dtype="float32"',
        "train.train_batch_per_replica=2", "train.train_policy.mini_batch=2",
        "train.max_num_steps=2", "validation.freq=2", "validation.batch_size=2",
        "logging.log_interval=1",
    )  # fmt: skip
    data = tmp_path / "data"
    table["custom"] = {
        "dataset": {"annotation_path": str(data / "train.json"), "media_path": str(data / "media"),
                    "val_annotation_path": str(data / "val.json")},
        "vision": {"max_pixels": 3136},
    }  # fmt: skip
    result = launch(tmp_path, table, SFT_LLAVA, timeout=560)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    outcome = json.loads((run_dir_of(tmp_path) / "result.json").read_text())
    assert outcome["steps"] == 2
    (validation,) = outcome["validations"]
    assert validation["step"] == 2 and validation["val_samples"] == 2
    assert validation["val_loss"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("body", "key", "value", "message"),
    [
        (TRANSFORMING, None, None, "Upper.get_rollout_input"),
        (GRPO, "policy.lora", {"target_modules": ["q_proj"], "lora_path": "/a"}, "lora_path"),
        (GRPO, "train.train_policy.use_remote_reward", True, "reward_server.url"),
    ],
)
def test_what_gantry_cannot_follow_stops_the_launch_with_its_name(
    tmp_path, body, key, value, message
):
    table = resolved_table("configs/quickstart-grpo.toml", tmp_path)
    table["train"]["train_policy"]["dataloader_prefetch_factor"] = 3
    table["custom"] = {"task": {"size": 64}}
    if key:
        section, name = key.rsplit(".", 1)
        node = table
        for part in section.split("."):
            node = node.setdefault(part, {})
        node[name] = value
    result = launch(tmp_path, table, body, timeout=100)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any(
        p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")
    )  # refused before a run directory was made
