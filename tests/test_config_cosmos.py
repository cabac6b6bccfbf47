"""Tests of cosmos-rl configs in Gantry: keys Gantry does not implement are accepted with one
warning that names them (and never overlap the schema), implemented keys take effect."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from gantry.config import ConfigWarning, GantryConfig, load_config
from gantry.config.cosmos_keys import KNOWN_UNIMPLEMENTED


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


COSMOS_STYLE = """
redis = "12800"

[policy]
model_name_or_path = "Qwen/Qwen2.5-3B-Instruct"
model_max_length = 4096
model_gradient_checkpointing = true

[policy.parallelism]
n_init_replicas = 1
tp_size = 1
cp_size = 1
dp_shard_size = 2
pp_size = 1
cp_rotate_method = "allgather"

[policy.lora]
r = 8

[rollout]
n_generation = 8
batch_size = 4
enable_chunked_prefill = false

[rollout.parallelism]
n_init_replicas = 1
tp_size = 1
pp_size = 1

[train]
epoch = 1
train_batch_per_replica = 64
fsdp_offload = false
param_dtype = "bfloat16"
compile = false

[train.train_policy]
type = "grpo"
temperature = 1.0
dataloader_num_workers = 4

[train.train_policy.dataset]
name = "openai/gsm8k"

[train.ckpt]
enable_checkpoint = true
save_mode = "async"

[validation]
enable = false

[validation.dataset]
name = "x"
"""


def test_cosmos_unimplemented_keys_warn_once_and_are_accepted(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(write(tmp_path, COSMOS_STYLE))
    ours = [w for w in caught if issubclass(w.category, ConfigWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert message.startswith("ignored cosmos-rl keys not implemented by Gantry yet: ")
    for key in [
        "policy.parallelism.cp_rotate_method",
        "policy.lora",
        "rollout.enable_chunked_prefill",
        "rollout.parallelism.pp_size",
        "train.compile",
        "train.train_policy.temperature",
        "train.train_policy.dataset",
        "validation.dataset",
    ]:
        assert key in message, key
    for key in ["model_gradient_checkpointing", "dp_shard_size", "param_dtype", "save_mode"]:
        assert key not in message, f"{key} is implemented: no warning"
    assert config.policy.model_gradient_checkpointing is True
    assert config.policy.parallelism.dp_shard_size == 2
    assert config.train.param_dtype == "bfloat16" and config.train.fsdp_offload is False
    assert config.train.ckpt.save_mode == "async"
    assert "validation.dataset.name" not in message  # a dropped table is named once
    assert config.validation.enable is False
    assert "[redis] port = 12800" in message
    assert config.redis.port == 12800
    assert config.train.train_batch_per_replica == 64
    assert config.train.ckpt.enable_checkpoint is True
    assert config.policy.model_name_or_path == "Qwen/Qwen2.5-3B-Instruct"


def test_unimplemented_override_warns():
    with pytest.warns(ConfigWarning, match=r"train\.optm_decay_ratio"):
        config = load_config(None, ["train.optm_decay_ratio=0.1"])
    assert config == GantryConfig()


def test_known_unimplemented_is_disjoint_from_schema():
    for section, names in KNOWN_UNIMPLEMENTED.items():
        model = GantryConfig
        for part in filter(None, section.split(".")):
            model = model.model_fields[part].annotation
        assert not names & set(model.model_fields), section
