"""Tests of gantry.config: loading, overrides, error messages, cross-section rules, serialisations
(cosmos-rl configs: tests/test_config_cosmos.py)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
from pydantic import BaseModel

from gantry.config import (
    ConfigError,
    ConfigWarning,
    GantryConfig,
    config_to_dict,
    config_to_toml,
    load_config,
    read_resolved_config,
    write_resolved_config,
)

REPO = Path(__file__).resolve().parents[1]

FULL_EXAMPLE = """
[policy]
model_name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
model_max_length = 2048

[policy.parallelism]
n_init_replicas = 1

[rollout]
backend = "transformers"
n_generation = 4
max_response_length = 64
batch_size = 2
gpu_memory_utilization = 0.5
enforce_eager = false
seed = 3

[rollout.parallelism]
n_init_replicas = 1
tp_size = 1

[rollout.sampling_config]
temperature = 0.9
top_p = 0.95
top_k = 50
repetition_penalty = 1.1

[train]
epoch = 2
output_dir = "/tmp/gantry-out"
optm_lr = 1e-5
optm_weight_decay = 0.01
optm_betas = [0.9, 0.95]
optm_grad_norm_clip = 0.5
train_batch_per_replica = 16
max_num_steps = 10
seed = 7
sync_weight_interval = 2

[train.train_policy]
type = "grpo"
epsilon_low = 0.2
epsilon_high = 0.28
kl_beta = 0.01
allowed_outdated_steps = 2
mu_iterations = 2
loss_type = "token-mean"

[train.ckpt]
enable_checkpoint = true
save_freq = 5
export_safetensors = false
max_keep = -1

[logging]
logger = ["console"]
project_name = "demo"
experiment_name = "run-1"
log_interval = 3

[redis]
url = "redis://127.0.0.1:6379/0"
port = 0
executable = ""

[custom]
dataset = "arithmetic"
max_operand = 9
levels = [1, 2, 3]

[custom.prompt]
template = "Compute: {question}"
"""


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return str(excinfo.value).splitlines()


def test_defaults_validate():
    config = load_config(None)
    assert config == GantryConfig()
    assert config.policy.model_name_or_path == "gantry:tiny-qwen2"
    assert config.train.train_batch_per_replica % config.rollout.n_generation == 0
    assert config.logging.logger == ["console"]
    assert config.redis.url == ""


def test_every_field_is_documented():
    def models(model):
        yield model
        for field in model.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from models(field.annotation)

    for model in models(GantryConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert model.model_config["extra"] == "forbid", model.__name__


def test_full_example_loads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete Gantry config warns about nothing
        config = load_config(write(tmp_path, FULL_EXAMPLE))
    assert config.policy.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert config.rollout.backend == "transformers"
    assert config.rollout.sampling_config.top_k == 50
    assert config.train.optm_betas == (0.9, 0.95)
    assert config.train.max_num_steps == 10
    assert config.train.train_policy.epsilon_high == 0.28
    assert config.train.ckpt.max_keep == -1
    assert config.logging.experiment_name == "run-1"
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    assert config.custom == {
        "dataset": "arithmetic",
        "max_operand": 9,
        "levels": [1, 2, 3],
        "prompt": {"template": "Compute: {question}"},
    }


def test_overrides(tmp_path):
    config = load_config(
        write(tmp_path, FULL_EXAMPLE),
        [
            "train.optm_lr=3e-6",
            "rollout.sampling_config.temperature=0.7",
            "logging.logger=[]",
            "train.output_dir=./elsewhere",  # not TOML: taken as a plain string
            "policy.model_name_or_path=Qwen/Qwen2.5-1.5B",
            "logging.experiment_name=2024",  # a string field keeps the text
            "train.ckpt.enable_checkpoint=false",
            "custom.prompt.template=Q: {question}",
            "custom.max_operand=99",
            "custom.new.deep.key=[1, 2]",
            'custom.name="quoted"',
        ],
    )
    assert config.train.optm_lr == 3e-6
    assert config.rollout.sampling_config.temperature == 0.7
    assert config.logging.logger == []
    assert config.train.output_dir == "./elsewhere"
    assert config.policy.model_name_or_path == "Qwen/Qwen2.5-1.5B"
    assert config.logging.experiment_name == "2024"
    assert config.train.ckpt.enable_checkpoint is False
    assert config.custom["prompt"] == {"template": "Q: {question}"}
    assert config.custom["max_operand"] == 99
    assert config.custom["new"] == {"deep": {"key": [1, 2]}}
    assert config.custom["name"] == "quoted"
    assert config.custom["levels"] == [1, 2, 3]  # untouched keys stay


def test_overrides_without_file():
    config = load_config(None, ["train.max_num_steps=5", "rollout.n_generation=4"])
    assert config.train.max_num_steps == 5
    assert config.rollout.n_generation == 4
    assert config.policy == GantryConfig().policy


@pytest.mark.parametrize("override", ["train.optm_lr", "=3", "train..optm_lr=1", "train.=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [override])
    (problem,) = problems_of(excinfo)
    assert repr(override) in problem
    assert "section.key=value" in problem


def test_override_into_a_value():
    with pytest.raises(ConfigError, match=r"train\.epoch is a value, not a section"):
        load_config(None, ["train.epoch=2", "train.epoch.x=1"])


def test_unknown_key_names_key_section_and_suggestion(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "[train]\noptm_lrr = 1e-5\n"))
    (problem,) = problems_of(excinfo)
    assert "train.optm_lrr" in problem
    assert "unknown key 'optm_lrr' in [train]; did you mean 'optm_lr'?" in problem


def test_unknown_key_in_nested_section_and_override():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ["rollout.sampling_config.temprature=0.5"])
    (problem,) = problems_of(excinfo)
    assert "[rollout.sampling_config]" in problem
    assert "did you mean 'temperature'?" in problem


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ["redis.zzz=1"])
    (problem,) = problems_of(excinfo)
    assert "unknown key 'zzz' in [redis]" in problem
    assert "valid keys: url, port, executable" in problem


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "[trian]\nepoch = 2\n\n[train.ckpts]\nsave_freq = 3\n"))
    problems = problems_of(excinfo)
    assert "unknown section [trian]; did you mean [train]?" in problems
    assert "unknown section [train.ckpts]; did you mean [train.ckpt]?" in problems


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, '[train]\noptm_lr = "fast"\n'))
    assert problems_of(excinfo) == ["train.optm_lr: expected a number, got 'fast'"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ('rollout.n_generation="8"', "rollout.n_generation: expected an integer, got '8'"),
        ("rollout.enforce_eager=1", "rollout.enforce_eager: expected true or false, got 1"),
        ("train.epoch=1.5", "train.epoch: expected an integer, got 1.5"),
        ("train.optm_lr=0", "train.optm_lr: must be > 0, got 0"),
        ("rollout.backend=trtllm", "rollout.backend: expected one of 'vllm' or 'transformers'"),
        ('logging.logger=["wandb", "comet"]', "logging.logger: 'comet': unknown logger; valid"),
        ('logging.logger=["console", "mlflow"]', "'mlflow': unknown logger; valid: 'console'"),
        ("train.ckpt=3", "train.ckpt: expected a table, got 3"),
        ("train.optm_betas=[0.9, 1.0]", "train.optm_betas: each beta must be in [0, 1)"),
        ("rollout.sampling_config.top_p=inf", "top_p: expected a finite number, got inf"),
        ("train.ckpt.max_keep=0", "train.ckpt.max_keep: must be >= 1, or -1"),
        ("train.optm_grad_norm_clip=0.0", "cosmos-rl reads 0 as no clipping"),
        ("redis.url=localhost:6379", "redis.url: expected a URL starting with redis://"),
        ("redis.port=70000", "redis.port: must be <= 65535, got 70000"),
        ("train.max_num_steps=0", "train.max_num_steps: must be > 0, got 0"),
    ],
)
def test_bad_values(override, expected):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [override])
    assert expected in str(excinfo.value)


def test_multiple_errors_collected(tmp_path):
    path = write(tmp_path, '[train]\noptm_lr = "fast"\nepochs = 2\n\n[rollot]\nseed = 1\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["rollout.batch_size=0", "nonsense"])
    problems = problems_of(excinfo)
    assert len(problems) == 5, problems
    text = str(excinfo.value)
    for part in ["train.optm_lr", "'epochs'", "[rollot]", "rollout.batch_size", "'nonsense'"]:
        assert part in text


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found") as excinfo:
        load_config(path)
    assert str(path) in str(excinfo.value)


def test_toml_syntax_error(tmp_path):
    path = write(tmp_path, "[train]\noptm_lr = = 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "invalid TOML" in message
    assert "line 2" in message


def test_batch_must_be_a_multiple_of_n_generation():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ["train.train_batch_per_replica=30", "rollout.n_generation=8"])
    (problem,) = problems_of(excinfo)
    assert "train.train_batch_per_replica = 30" in problem
    assert "rollout.n_generation = 8" in problem
    assert "try 24 or 32" in problem


def test_grpo_needs_two_generations():
    with pytest.raises(ConfigError, match="at least 2 completions"):
        load_config(None, ["rollout.n_generation=1"])


def test_staleness_must_cover_sync_interval():
    with pytest.raises(ConfigError, match="allowed_outdated_steps = 1 must be at least"):
        load_config(
            None, ["train.sync_weight_interval=4", "train.train_policy.allowed_outdated_steps=1"]
        )
    load_config(
        None, ["train.sync_weight_interval=4", "train.train_policy.allowed_outdated_steps=3"]
    )


def test_sft_needs_no_groups():
    # SFT trains on samples, not groups of completions: n_generation does not constrain it.
    config = load_config(
        None,
        [
            'train.train_policy.type="sft"',
            "rollout.n_generation=1",
            "train.train_batch_per_replica=3",
            "validation.enable=true",
            "validation.freq=7",
        ],
    )
    assert config.train.train_policy.type == "sft" and config.validation.freq == 7
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ["validation.frequency=3"])
    (problem,) = problems_of(excinfo)
    assert "validation.frequency" in problem and "freq" in problem


@pytest.mark.parametrize(
    "key",
    [
        "policy.parallelism.tp_size",
        "policy.parallelism.cp_size",
        "policy.parallelism.pp_size",
    ],
)
def test_only_one_supported(key):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [f"{key}=2"])
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"{key}: got 2, but only 1 is supported in this version")


def test_toml_round_trip(tmp_path):
    config = load_config(
        write(tmp_path, FULL_EXAMPLE),
        [
            'custom.odd key="tab\\there"',  # a key TOML must quote, a tab
            r'custom.text="caf\u00e9 \U0001F642 del\u007f"',  # TOML decodes the escapes
            "custom.when=2024-05-01T12:00:00Z",
            "custom.mixed=[{a = 1}]",
        ],
    )
    assert config.custom["odd key"] == "tab\there"
    assert config.custom["text"] == "caf\u00e9 \U0001f642 del\x7f"
    text = config_to_toml(config)
    assert GantryConfig.model_validate(tomllib.loads(text)) == config
    assert load_config(write(tmp_path, text, "again.toml")) == config
    # None values are left out: the default experiment_name has no line.
    assert "experiment_name" not in config_to_toml(GantryConfig())
    assert load_config(write(tmp_path, config_to_toml(GantryConfig()), "d.toml")) == GantryConfig()


def test_resolved_json_round_trip(tmp_path):
    config = load_config(write(tmp_path, FULL_EXAMPLE), ["train.max_num_steps=3"])
    path = tmp_path / "config.json"
    write_resolved_config(config, path)
    assert read_resolved_config(path) == config
    assert config_to_dict(config)["train"]["optm_betas"] == [0.9, 0.95]


def test_resolved_json_mismatch_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"train": {"epochs": 2}}')
    with pytest.raises(ConfigError, match=r"config\.json: train\.epochs: unknown key"):
        read_resolved_config(path)


def test_no_torch_import():
    code = "import gantry.config, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_batch_must_divide_over_a_replicas_ranks():
    with pytest.raises(ConfigError) as excinfo:
        load_config(
            None,
            ["train.train_batch_per_replica=18", "rollout.n_generation=6",
             "policy.parallelism.dp_shard_size=2", "policy.parallelism.dp_replicate_size=2"],
        )  # fmt: skip
    (problem,) = problems_of(excinfo)
    assert "dp_replicate_size x dp_shard_size = 4" in problem and "try 24" in problem
    config = load_config(None, ["policy.parallelism.dp_shard_size=-1"])  # resolved at launch
    assert config.policy.parallelism.dp_shard_size == -1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("policy.parallelism.dp_shard_size=0", "must be >= 1, or -1"),
        ("train.optm_warmup_steps=1.5", "fraction of the run's steps and must be in (0, 1]"),
        ("train.optm_warmup_steps=-2", "must be >= 0"),
        ('train.param_dtype="fp8"', "expected one of"),
        (
            'train.ckpt.upload_s3="final"',
            "train.ckpt.upload_s3 = 'final' needs train.ckpt.s3_bucket",
        ),
        ("train.ckpt.upload_hf=true", "needs train.ckpt.hf_repo_name"),
        ("train.ckpt.upload_s3=true", "expected one of"),
    ],
)
def test_policy_scale_keys_are_checked(override, expected):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [override])
    assert expected in str(excinfo.value)


def test_policy_scale_keys_load():
    config = load_config(
        None,
        ["train.optm_warmup_steps=0.1", "train.optm_decay_type=\"cosine\"",
         "train.ckpt.upload_s3=\"all\"", "train.ckpt.s3_bucket=b", "train.resume=true",
         "train.train_policy.mini_batch=4", "policy.parallelism.n_init_replicas=2"],
    )  # fmt: skip
    assert config.train.optm_warmup_steps == 0.1 and config.train.optm_decay_type == "cosine"
    assert config.train.ckpt.upload_s3 == "all" and config.train.resume is True
    assert config.policy.parallelism.n_init_replicas == 2


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")), ids=lambda p: p.name
)
def test_example_configs_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # examples use implemented keys only
        load_config(path)
