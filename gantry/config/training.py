"""The `[train]` section and its sub-sections `[train.train_policy]` (the algorithm and its loss)
and `[train.ckpt]` (checkpoints, exports, uploads). cosmos-rl's names; every field documented.

Part of the schema that `gantry.config.schema.GantryConfig` assembles. Imports no torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from gantry.config.cluster import _MODEL_CONFIG
from gantry.config.fields import Dtype, StrictFloat

# ------------------------------------------------------------------------------------ [train]


class TrainPolicyConfig(BaseModel):
    """[train.train_policy]: the training algorithm and its loss."""

    model_config = _MODEL_CONFIG

    type: Literal["grpo", "sft"] = Field(
        default="grpo",
        description="Algorithm: 'grpo' (reinforcement learning from reward functions: policy and "
        "rollout replicas) or 'sft' (supervised fine-tuning on the dataset's conversations, loss "
        "on the assistant turns: policy replicas only).",
    )
    dataloader_shuffle: bool = Field(
        default=True,
        description="Visit the dataset in a new order each epoch, seeded by train.seed (false: "
        "in file order).",
    )
    dataloader_num_workers: int = Field(
        default=1,
        ge=0,
        description="SFT: processes per policy rank that encode the next step's conversations "
        "(chat template, tokenizer, images) while the current step trains; 0 encodes in the "
        "training process.",
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
    mini_batch: int = Field(
        default=2,
        gt=0,
        description="Completions in one forward/backward pass on a rank; gradients are "
        "accumulated over the rank's share of the batch, then one optimizer step is taken.",
    )
    loss_type: Literal["token-mean"] = Field(
        default="token-mean",
        description="How per-token losses are reduced: 'token-mean' averages over all response "
        "tokens of the batch.",
    )


class CkptConfig(BaseModel):
    """[train.ckpt]: resumable checkpoints, exported weights and their upload."""

    model_config = _MODEL_CONFIG

    enable_checkpoint: bool = Field(
        default=False,
        description="Save a resumable checkpoint (model, optimizer, scheduler, RNG, data "
        "position) every save_freq steps and at the end; if false, only the final weights are "
        "exported.",
    )
    save_freq: int = Field(
        default=20, gt=0, description="Save a checkpoint every save_freq policy steps."
    )
    save_mode: Literal["async", "sync"] = Field(
        default="async",
        description="'async': the checkpoint is written while training goes on; 'sync': "
        "training waits for the write.",
    )
    export_safetensors: bool = Field(
        default=True,
        description="Export the weights as Hugging Face safetensors (with config and tokenizer) "
        "at each checkpoint, not only at the end.",
    )
    max_keep: int = Field(
        default=5,
        description="Number of most recent checkpoints (and step exports) kept on disk; -1 "
        "keeps them all.",
    )
    upload_hf: bool = Field(
        default=False,
        description="Upload the exports to the Hugging Face Hub repo hf_repo_name (token from "
        "HF_TOKEN; HF_ENDPOINT selects another endpoint).",
    )
    hf_repo_name: str = Field(
        default="", description="Hub repo id the exports are uploaded to, e.g. 'me/my-model'."
    )
    upload_s3: Literal[False, "final", "all"] = Field(
        default=False,
        description="Upload exports to S3: 'final' (the final export only), 'all' (every "
        "export), or false. Credentials and AWS_ENDPOINT_URL come from the environment.",
    )
    s3_bucket: str = Field(default="", description="S3 bucket the exports are uploaded to.")
    s3_prefix: str = Field(
        default="", description="Key prefix under which the exports are uploaded."
    )

    @field_validator("max_keep")
    @classmethod
    def _positive_or_all(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"must be >= 1, or -1 to keep all checkpoints, got {value}")
        return value

    @model_validator(mode="after")
    def _upload_targets_named(self) -> CkptConfig:
        problems = []
        if self.upload_hf and not self.hf_repo_name:
            problems.append("train.ckpt.upload_hf = true needs train.ckpt.hf_repo_name")
        if self.upload_s3 and not self.s3_bucket:
            problems.append(f"train.ckpt.upload_s3 = {self.upload_s3!r} needs train.ckpt.s3_bucket")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class TrainConfig(BaseModel):
    """[train]: the optimisation loop."""

    model_config = _MODEL_CONFIG

    epoch: int = Field(default=1, gt=0, description="Passes over the dataset's prompts.")
    output_dir: str = Field(
        default="./outputs",
        min_length=1,
        description="Directory under which each run gets a timestamped run directory.",
    )
    optm_name: Literal["AdamW", "Adam"] = Field(
        default="AdamW", description="Optimizer: 'AdamW' (decoupled weight decay) or 'Adam'."
    )
    optm_impl: Literal["fused", "foreach", "for-loop"] = Field(
        default="foreach",
        description="Optimizer kernel: 'fused' (one kernel per step), 'foreach' (batched over "
        "parameters) or 'for-loop' (one parameter at a time, least memory).",
    )
    optm_lr: float = Field(
        default=1e-6, gt=0, description="Peak learning rate (after warm-up, before decay)."
    )
    optm_warmup_steps: int | float = Field(
        default=0,
        description="Steps of linear warm-up from 0 to optm_lr: an integer >= 0, or a float in "
        "(0, 1], the fraction of the run's steps.",
    )
    optm_decay_type: Literal["constant", "linear", "cosine"] | None = Field(
        default=None,
        description="Learning-rate decay after warm-up, down to optm_lr x optm_min_lr_factor at "
        "the last step: 'linear', 'cosine', or 'constant' / unset (no decay).",
    )
    optm_min_lr_factor: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="The decayed learning rate at the last step, as a fraction of optm_lr.",
    )
    optm_weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    optm_betas: tuple[StrictFloat, StrictFloat] = Field(
        default=(0.9, 0.999),
        # strict=False for the tuple itself only: TOML has no tuples, so it arrives as a list.
        strict=False,
        description="AdamW (beta1, beta2), each in [0, 1).",
    )
    epsilon: float = Field(
        default=1e-8,
        gt=0,
        description="The optimizer's eps (AdamW/Adam denominator term). cosmos-rl's current "
        "release passes train.epsilon (its default 1e-6); the release the Cosmos-Reason1 guides "
        "pin ignored it and used torch's 1e-8, Gantry's default.",
    )
    optm_grad_norm_clip: float = Field(
        default=1.0, description="Gradients are clipped to this global L2 norm (> 0)."
    )
    train_batch_per_replica: int = Field(
        default=32,
        gt=0,
        description="Completions each policy replica trains on per step (a step trains on "
        "n_init_replicas times as many); a multiple of rollout.n_generation, so that a step "
        "trains on whole groups, and of the replica's ranks, which share it equally.",
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
    master_dtype: Dtype = Field(
        default="float32",
        description="Dtype of the sharded parameters the optimizer updates (and of exports).",
    )
    param_dtype: Dtype = Field(
        default="bfloat16",
        description="Dtype of the forward and backward computation (FSDP2 mixed precision); "
        "float32 on CPUs without bfloat16 units, where bfloat16 is slower.",
    )
    fsdp_reduce_dtype: Dtype = Field(
        default="float32", description="Dtype in which gradients are reduced across ranks."
    )
    fsdp_offload: bool = Field(
        default=False,
        description="Keep the sharded parameters, gradients and optimizer state in CPU memory "
        "(FSDP2 CPU offload): less GPU memory, slower steps.",
    )
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = Field(
        default="default",
        description="Free the gathered parameters after each block's forward ('default', "
        "'always') or keep them for the backward ('never': more memory, less communication).",
    )
    resume: bool | str = Field(
        default=False,
        description="true: resume from the latest complete checkpoint of any run under "
        "output_dir (or start afresh if there is none); a path: resume from that checkpoint "
        "(checkpoints/step_N) or from the latest complete one of that run directory.",
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

    @field_validator("optm_warmup_steps")
    @classmethod
    def _warmup_count_or_fraction(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(
                f"a float is a fraction of the run's steps and must be in (0, 1], got {value}; "
                "give an integer for a number of steps"
            )
        if isinstance(value, int) and value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value

    @field_validator("optm_betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value
