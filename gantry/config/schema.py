"""The run configuration's schema: one pydantic model per section, every field documented.

Section and key names follow cosmos-rl's schema so that cosmos-rl configs load unchanged;
`[redis]` is Gantry's own. Validators check and never rewrite a value; a cross-section rule
lives in `GantryConfig._sections_agree`. The sections live in `gantry.config.replicas`
(`[policy]`, `[rollout]`), `gantry.config.training` (`[train]`) and `gantry.config.cluster`
(`[redis]`, `[fault_tolerance]`, `[slurm]`); this module holds the root, `[logging]` and
`[validation]`, and re-exports every section model (`from gantry.config.schema import
TrainConfig` works). Loading, overrides and error messages are in `gantry.config.loader`; the
cosmos-rl keys outside this schema (moved, refused, accepted as hints) are in
`gantry.config.cosmos_keys`.
Imports no torch.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from gantry.config.cluster import _MODEL_CONFIG, FaultToleranceConfig, RedisConfig, SlurmConfig
from gantry.config.fields import Dtype, StrictFloat
from gantry.config.replicas import (
    PolicyConfig,
    PolicyParallelism,
    RolloutConfig,
    RolloutParallelism,
    SamplingConfig,
)
from gantry.config.training import CkptConfig, TrainConfig, TrainPolicyConfig

__all__ = [
    "CkptConfig",
    "Dtype",
    "FaultToleranceConfig",
    "GantryConfig",
    "LoggingConfig",
    "PolicyConfig",
    "PolicyParallelism",
    "RedisConfig",
    "RolloutConfig",
    "RolloutParallelism",
    "SamplingConfig",
    "SlurmConfig",
    "StrictFloat",
    "TrainConfig",
    "TrainPolicyConfig",
    "ValidationConfig",
]


def _common_multiple(near: int, *factors: int) -> int:
    """The multiple of every factor closest above `near` (a suggestion for an error message)."""
    step = math.lcm(*factors)
    return max(step, -(-near // step) * step)


# ------------------------------------------------------------------------- [logging], [redis]

# What [logging] logger may name (case-insensitive, as cosmos-rl reads it): the console is the
# controller's output, always on; the trackers run in the controller (controller.trackers).
LOGGERS = ("console", "wandb", "tensorboard")


class LoggingConfig(BaseModel):
    """[logging]: progress reporting and experiment trackers."""

    model_config = _MODEL_CONFIG

    logger: list[str] = Field(
        default_factory=lambda: ["console"],
        description="Where metrics go besides metrics.jsonl, any of 'console' (the controller's "
        "output), 'wandb' (honours WANDB_MODE, WANDB_DIR...; the run id is kept in "
        "trackers.json) and 'tensorboard' (event files under <run_dir>/tensorboard), "
        "case-insensitive.",
    )
    project_name: str = Field(default="gantry", description="Project the run belongs to (wandb).")
    experiment_name: str | None = Field(
        default=None,
        description="Short name of this run (wandb's run name; unset: the run directory's name).",
    )
    log_interval: int = Field(
        default=1,
        gt=0,
        description="Print progress, and write sample completions (samples.jsonl and the "
        "trackers), every N policy steps.",
    )

    @field_validator("logger")
    @classmethod
    def _known_loggers(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name.lower() not in LOGGERS]
        if unknown:
            valid = ", ".join(repr(name) for name in LOGGERS)
            raise ValueError(
                "\n".join(f"{name!r}: unknown logger; valid: {valid}" for name in unknown)
            )
        return value


# ------------------------------------------------------------------------------------- root


class ValidationConfig(BaseModel):
    """[validation]: the loss on held-out data during SFT."""

    model_config = _MODEL_CONFIG

    enable: bool = Field(
        default=False,
        description="Compute the loss on the dataset script's get_val_dataset(config) every "
        "`freq` steps and at the end (SFT).",
    )
    freq: int = Field(default=100, gt=0, description="Validate every N policy steps.")
    val_before_train: bool = Field(
        default=False, description="Also validate the initial weights, before the first step."
    )
    batch_size: int = Field(
        default=8, gt=0, description="Validation samples per forward pass on a policy rank."
    )


class GantryConfig(BaseModel):
    """The whole run configuration, as read from TOML and written to the run directory."""

    model_config = _MODEL_CONFIG

    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The trained model.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="The generators.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The optimisation loop.")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Validation during SFT."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Progress output.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="The control plane.")
    fault_tolerance: FaultToleranceConfig = Field(
        default_factory=FaultToleranceConfig, description="What a run survives."
    )
    slurm: SlurmConfig = Field(
        default_factory=SlurmConfig, description="SLURM submission (./slurm.sh)."
    )
    custom: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form settings handed to the dataset script's get_dataset(config).",
    )

    @model_validator(mode="after")
    def _sections_agree(self) -> GantryConfig:
        problems = []
        n = self.rollout.n_generation
        batch = self.train.train_batch_per_replica
        grpo = self.train.train_policy.type == "grpo"
        if grpo and batch % n:
            below, above = batch // n * n, (batch // n + 1) * n
            choices = f"{below} or {above}" if below else str(above)
            problems.append(
                f"train.train_batch_per_replica = {batch} must be a multiple of "
                f"rollout.n_generation = {n} (each step trains on whole groups of completions "
                f"of one prompt); try {choices}"
            )
        if grpo and n < 2:
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
        parallel = self.policy.parallelism
        if parallel.dp_shard_size != -1 and batch % parallel.ranks_per_replica:
            ranks = parallel.ranks_per_replica
            problems.append(
                f"train.train_batch_per_replica = {batch} must be divisible by the ranks of a "
                f"policy replica (policy.parallelism: dp_replicate_size x dp_shard_size = "
                f"{ranks}), which share each batch equally; try {_common_multiple(batch, n, ranks)}"
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
