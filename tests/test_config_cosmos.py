"""Tests of cosmos-rl configs in Gantry: configs of both cosmos-rl releases load (moved keys read at
their new place), keys that change what is trained are refused by name, performance hints are
accepted with one warning and returned for run.json, and the tables never overlap the schema."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from gantry.config import ConfigError, ConfigWarning, GantryConfig, load_config
from gantry.config.cosmos_keys import HINTS, MOVED, REFUSED, SAME_AS_GANTRY
from gantry.run.runtime import RunInfo


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_warned(path: Path | None, overrides=()) -> tuple[GantryConfig, dict, list[str]]:
    ignored: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(path, overrides, ignored=ignored)
    ours = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert len(ours) <= 1, ours
    return config, ignored, ours


# The Cosmos-Reason1 guide's examples/post_training/configs/sft.toml, in the layout of the
# cosmos-rl release the guides pin (validation keys in [train]); logger without wandb.
PINNED_SFT = """
redis = "12800"

[train]
resume = false
epoch = 1
output_dir = "./outputs/sft"
optm_name = "AdamW"
optm_lr = 2e-6
optm_impl = "fused"
optm_weight_decay = 0.01
optm_betas = [0.9, 0.999]
optm_warmup_steps = 20
optm_grad_norm_clip = 1.0
async_tp_enabled = false
compile = false
param_dtype = "bfloat16"
fsdp_reduce_dtype = "float32"
fsdp_offload = false
fsdp_reshard_after_forward = "default"
train_batch_per_replica = 32
sync_weight_interval = 1
enable_validation = true
validation_step = 30
validation_batch_per_replica = 2

[policy]
model_name_or_path = "nvidia/Cosmos-Reason1-7B"
model_max_length = 4096
model_gradient_checkpointing = true

[logging]
logger = ["console"]
project_name = "cosmos_reason1"
experiment_name = "post_training/sft"

[train.train_policy]
type = "sft"
dataset.name = "nvidia/Cosmos-Reason1-SFT-Dataset"
dataset.subset = "robovqa"
dataset.split = "understanding"
dataset.test_size = 100
enable_dataset_cache = false
dataloader_num_workers = 4
dataloader_prefetch_factor = 4
conversation_column_name = "conversations"
mini_batch = 4

[train.ckpt]
enable_checkpoint = true
save_freq = 100
max_keep = 2
save_mode = "async"

[policy.parallelism]
n_init_replicas = 1
tp_size = 1
cp_size = 1
dp_shard_size = 4
pp_size = 1
dp_replicate_size = 1
cp_rotate_method = "allgather"
"""

# The guide's rl.toml in the current release's layout ([validation] section, on_policy), with
# the keys the guide sets (temperature = 0.9) at values
# Gantry honours: temperature as the sampler's.
CURRENT_GRPO = """
redis = "12800"

[train]
epoch = 80
output_dir = "./outputs/rl"
optm_lr = 2e-6
optm_betas = [0.9, 0.95]
optm_warmup_steps = 20
compile = false
master_dtype = "float32"
param_dtype = "bfloat16"
train_batch_per_replica = 128
sync_weight_interval = 1

[rollout]
gpu_memory_utilization = 0.7
enable_chunked_prefill = false
max_response_length = 6144
n_generation = 8
batch_size = 4
quantization = "none"

[rollout.sampling_config]
temperature = 0.9

[policy]
model_name_or_path = "nvidia/Cosmos-Reason1-7B"
model_max_length = 10240
model_gradient_checkpointing = true

[logging]
logger = ["console"]
project_name = "cosmos_reason1"
experiment_name = "post_training/rl"

[validation]
enable = false
freq = 50

[train.train_policy]
type = "grpo"
variant = "grpo"
dataset.name = "nvidia/Cosmos-Reason1-RL-Dataset"
dataset.subset = "robovqa"
dataset.split = "rl"
enable_dataset_cache = false
dataloader_num_workers = 4
dataloader_prefetch_factor = 4
prompt_column_name = "qa_pairs"
temperature = 0.9
epsilon_low = 0.2
epsilon_high = 0.2
kl_beta = 0.0
mu_iterations = 1
mini_batch = 2
on_policy = false
entropy_coeff = 0.0

[train.train_policy.overlong_reward]
enable_overlong_penalty = false

[train.ckpt]
enable_checkpoint = true
save_freq = 100
max_keep = 2
save_mode = "async"

[rollout.parallelism]
n_init_replicas = 1
tp_size = 2
pp_size = 1

[policy.parallelism]
n_init_replicas = 1
tp_size = 1
cp_size = 1
dp_shard_size = 2
pp_size = 1
dp_replicate_size = 1
"""


def test_pinned_release_layout_loads_with_moves_applied(tmp_path):
    config, ignored, notes = load_warned(write(tmp_path, PINNED_SFT))
    assert config.validation.enable is True
    assert config.validation.freq == 30
    assert config.validation.batch_size == 2
    (note,) = notes
    for old, new in [
        ("train.enable_validation", "validation.enable"),
        ("train.validation_step", "validation.freq"),
        ("train.validation_batch_per_replica", "validation.batch_size"),
    ]:
        assert f"read {old} (older cosmos-rl) as {new}" in note
    assert ignored == {
        "train.async_tp_enabled": False,
        "train.compile": False,
        "train.train_policy.dataset": {
            "name": "nvidia/Cosmos-Reason1-SFT-Dataset",
            "subset": "robovqa",
            "split": "understanding",
            "test_size": 100,
        },
        "train.train_policy.enable_dataset_cache": False,
        "train.train_policy.dataloader_prefetch_factor": 4,
        "train.train_policy.conversation_column_name": "conversations",
        "policy.parallelism.cp_rotate_method": "allgather",
    }
    assert "[redis] port = 12800" in note and config.redis.port == 12800
    assert config.policy.parallelism.dp_shard_size == 4
    assert config.train.train_policy.mini_batch == 4
    assert config.logging.project_name == "cosmos_reason1"


def test_current_release_layout_loads(tmp_path):
    config, ignored, notes = load_warned(write(tmp_path, CURRENT_GRPO))
    assert config.validation.enable is False and config.validation.freq == 50
    assert config.rollout.sampling_config.temperature == 0.9
    assert config.train.train_batch_per_replica == 128
    assert config.rollout.parallelism.tp_size == 2
    assert ignored["train.train_policy.temperature"] == 0.9
    assert config.train.train_policy.variant == "grpo"  # implemented (DAPO): in the schema
    assert config.train.train_policy.overlong_reward.enable_overlong_penalty is False
    assert ignored["rollout.quantization"] == "none"
    assert "rollout.parallelism.pp_size" in ignored
    assert "moved" not in notes[0] and "older cosmos-rl" not in notes[0]


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [
        ("train.enable_validation", "validation.enable", "true"),
        ("train.validation_step", "validation.freq", "7"),
        ("train.validation_batch_per_replica", "validation.batch_size", "3"),
        ("rollout.val_batch_size", "validation.batch_size", "5"),
    ],
)
def test_moved_key_takes_effect_and_conflict_is_an_error(old, new, value):
    config, _, (note,) = load_warned(None, [f"{old}={value}"])
    section, key = new.split(".")
    assert str(getattr(getattr(config, section), key)).lower() == value
    assert f"read {old} (older cosmos-rl) as {new}" in note
    with pytest.warns(ConfigWarning):  # the same value twice: fine
        load_config(None, [f"{old}={value}", f"{new}={value}"])
    other = "false" if value == "true" else "11"
    with pytest.raises(ConfigError, match=f"{old} = .* and {new} = .* disagree.*keep only {new}"):
        load_config(None, [f"{old}={value}", f"{new}={other}"])


def test_on_policy_is_synchronous_training_under_either_name():
    config, ignored, (note,) = load_warned(None, ["train.train_policy.fully_on_policy=true"])
    assert "train.train_policy.fully_on_policy (older cosmos-rl)" in note and ignored == {}
    assert config.train.train_policy.on_policy
    assert config.train.train_policy.allowed_outdated_steps == 0
    assert load_config(None, []).train.train_policy.allowed_outdated_steps == 4
    both = ["train.train_policy.on_policy=true", "train.train_policy.allowed_outdated_steps=2"]
    with pytest.raises(ConfigError, match=r"on_policy = true .* allowed_outdated_steps = 2"):
        load_config(None, both)
    with pytest.raises(ConfigError, match=r"on_policy = true needs train\.sync_weight_interval"):
        load_config(None, ["train.train_policy.on_policy=true", "train.sync_weight_interval=2"])


# A value Gantry does not honour, for every refused key (a key added to REFUSED without one
# here fails test_every_refused_key_has_a_refused_value).
REFUSED_VALUES = {
    "distillation": "{ enable = true }",
    "vla": "{ vla_type = 'openvla-oft' }",
    "mode": '"colocated"',
    "validation.dataset": '{ name = "x" }',
    "validation.use_remote_reward": "true",
    "validation.remote_reward": "{ scale = 1.0 }",
    "policy.is_diffusers": "true",
    "policy.model_safetensor_path": '"/w"',
    "policy.model_revision": '"main"',
    "policy.trainable_map": "{ a = true }",
    "policy.freeze_pattern": '["visual.*"]',
    "policy.trainable_pattern": '["lm_head"]',
    "policy.aux_loss_coeff": "0.01",
    "rollout.include_stop_str_in_output": "true",
    "rollout.quantization": '"fp8"',
    "rollout.multi_turn_config": "{ enable = true }",
    "train.optm_warmup_start_factor": "0.1",
    "train.optm_decay_ratio": "0.1",
    "train.ema_enable": "true",
    "train.transfer_dtype": '"bfloat16"',
    "train.logprob_dtype": '"bfloat16"',
    "train.fp8": "{ enable_fp8 = true }",
    "train.fp4": "{ enable_fp4 = true }",
    "train.non_text": "true",
    "train.sequence_packing": "true",
    "train.train_policy.trainer_type": '"custom"',
    "train.train_policy.algo": '"reinforce"',
    "train.train_policy.use_remote_reward": "true",
    "train.train_policy.bypass_reward": "true",
    "train.train_policy.group_reward_calculation": "true",
    "train.train_policy.temperature": "0.9",
    "train.train_policy.advantage_low": "-1.0",
    "train.train_policy.advantage_high": "1.0",
    "train.train_policy.batch_size_per_optimize": "8",
    "train.train_policy.max_token_len_per_mini_batch": "8192",
    "train.train_policy.uncentralized_training": "true",
    "train.train_policy.outdated_rollout_fetch_batch_size": "4",
    "train.train_policy.max_inflight_steps": "2",
    "train.train_policy.reference_reset_interval": "100",
    "train.train_policy.dataloader_seed": "7",
    "train.train_policy.dataloader_drop_last": "false",
    "train.train_policy.system_prompt": '"You are helpful."',
    "train.train_policy.enable_dp_load_balancing": "true",
}
REFUSED_KEYS = sorted(
    f"{section}.{key}" if section else key for section, keys in REFUSED.items() for key in keys
)


def test_every_refused_key_has_a_refused_value():
    assert sorted(REFUSED_VALUES) == REFUSED_KEYS


@pytest.mark.parametrize("dotted", REFUSED_KEYS)
def test_refused_key_is_an_error_naming_it(dotted):
    section, _, key = dotted.rpartition(".")
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [f"{dotted}={REFUSED_VALUES[dotted]}"])
    (problem,) = excinfo.value.problems
    assert problem.startswith(f"{dotted} = ")
    assert "cosmos-rl key that changes what is trained" in problem
    assert REFUSED[section][key] in problem  # what to do


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("train.train_policy.advantage_high", "5.0"),  # never reached with 8 completions
        ("train.train_policy.trainer_type", '"grpo"'),
        ("train.fp8", '{ enable_fp8 = false, fp8_recipe = "dynamic_scaling" }'),
        ("distillation", "{ enable = false }"),
        ("mode", '"disaggregated"'),
    ],
)
def test_refused_key_at_gantrys_behaviour_is_accepted_and_recorded(dotted, value):
    _, ignored, (note,) = load_warned(None, [f"{dotted}={value}"])
    assert dotted in ignored and dotted in note


def test_advantage_bound_that_can_clip_is_refused():
    # 5 is below (n - 1) / sqrt(n) = 5.88 for 36 completions: the clip would act.
    with pytest.raises(ConfigError, match="advantage_high"):
        load_config(None, ["rollout.n_generation=36", "train.train_policy.advantage_high=5.0"])


HINT_KEYS = sorted(
    f"{section}.{key}" if section else key for section, keys in HINTS.items() for key in keys
)


@pytest.mark.parametrize("dotted", HINT_KEYS)
def test_hint_is_accepted_with_one_warning_and_returned(dotted):
    _, ignored, (note,) = load_warned(None, [f"{dotted}=3"])
    assert ignored == {dotted: 3}
    assert note == f"ignored cosmos-rl keys that do not change the result: {dotted}"


def test_ignored_keys_go_into_run_json(tmp_path):
    ignored: dict = {}
    with pytest.warns(ConfigWarning):
        load_config(write(tmp_path, PINNED_SFT), ignored=ignored)
    info = RunInfo(
        run_id="r", run_dir=str(tmp_path), redis_url="", dataset_script="d.py",
        dataset_size=1, model_path="m", ignored_config_keys=ignored,
    )  # fmt: skip
    info.write()
    assert RunInfo.read(tmp_path).ignored_config_keys == ignored
    assert RunInfo.read(tmp_path).ignored_config_keys["train.compile"] is False


def test_unknown_key_is_still_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"did you mean 'entropy_coeff'"):
        load_config(None, ["train.train_policy.entropy_coef=0.1"])


@pytest.mark.parametrize(
    "loggers",
    ['["console", "wandb"]', '["tensorboard"]', '["Console", "WandB", "TensorBoard"]', "[]"],
)
def test_logger_trackers_accepted_as_cosmos_rl_writes_them(loggers):
    config = load_config(None, [f"logging.logger={loggers}"])
    assert config.logging.logger == json.loads(loggers)  # kept as written, read case-insensitively


def test_logger_unknown_name_refused_with_the_valid_ones():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ['logging.logger=["console", "mlflow", "wandb"]'])
    (problem,) = excinfo.value.problems
    assert problem == (
        "logging.logger: 'mlflow': unknown logger; valid: 'console', 'wandb', 'tensorboard'"
    )


def test_logger_console_list_and_labels_accepted(tmp_path):
    path = write(
        tmp_path,
        '[logging]\nlogger = ["console"]\nproject_name = "p"\nexperiment_name = "post/sft"\n',
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        config = load_config(path)
    assert config.logging.logger == ["console"]
    assert (config.logging.project_name, config.logging.experiment_name) == ("p", "post/sft")


def test_tables_are_disjoint_from_schema_and_each_other():
    for table in (HINTS, REFUSED):
        for section, names in table.items():
            model = GantryConfig
            for part in filter(None, section.split(".")):
                model = model.model_fields[part].annotation
            assert not set(names) & set(model.model_fields), section
    for section in HINTS:
        assert not HINTS[section] & set(REFUSED.get(section, {})), section
    for dotted in SAME_AS_GANTRY:
        section, _, key = dotted.rpartition(".")
        assert key in REFUSED[section], dotted
    for old in MOVED:
        section, _, key = old.rpartition(".")
        assert key not in HINTS.get(section, set()) | set(REFUSED.get(section, {})), old


def test_docs_name_every_moved_refused_and_hint_key():
    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    section = page[page.index("## cosmos-rl configs") : page.index("## All keys")]
    for old, new in MOVED.items():
        assert f"`{old}` | `{new}`" in section, old
    for table in (HINTS, REFUSED):
        for names in table.values():
            for key in names:
                assert f"`{key}`" in section, key
