"""The run configuration's schema: one pydantic model per section, every field documented.

Section and key names follow cosmos-rl's schema so that cosmos-rl configs load unchanged;
`[redis]` is Gantry's own. Validators check and never rewrite a value; a cross-section rule
lives in `GantryConfig._sections_agree`. Loading, overrides and error messages are in
`gantry.config.loader`; the cosmos-rl keys Gantry accepts without acting on them are in
`gantry.config.cosmos_keys`. Imports no torch.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Strict, field_validator, model_validator

from gantry.config.cluster import _MODEL_CONFIG, FaultToleranceConfig, RedisConfig, SlurmConfig

StrictFloat = Annotated[float, Strict()]
Dtype = Literal["float32", "bfloat16", "float16"]


def _common_multiple(near: int, *factors: int) -> int:
    """The multiple of every factor closest above `near` (a suggestion for an error message)."""
    step = math.lcm(*factors)
    return max(step, -(-near // step) * step)


def _only_one(value: int, what: str) -> int:
    if value != 1:
        raise ValueError(f"got {value}, but only 1 is supported in this version ({what})")
    return value


# ----------------------------------------------------------------------------------- [policy]


class PolicyParallelism(BaseModel):
    """[policy.parallelism]: how the trainer is replicated and sharded.

    The policy job has n_init_replicas x dp_replicate_size x dp_shard_size ranks. The model is
    sharded with FSDP2 over dp_shard_size ranks and replicated over the others (HSDP); every
    rank trains on its own share of each batch.
    """

    model_config = _MODEL_CONFIG

    n_init_replicas: int = Field(
        default=1,
        ge=1,
        description="Number of policy replicas (trainers) started with the run; each is one "
        "torchrun group of dp_replicate_size x dp_shard_size ranks, and all of them train as "
        "one data-parallel job, each on its own share of the rollouts.",
    )
    dp_shard_size: int = Field(
        default=1,
        description="Ranks the model, its gradients and optimizer state are sharded over "
        "(FSDP2) inside a replica; -1: all the devices of the node not used by rollout replicas "
        "(on a CPU machine: 1).",
    )
    dp_replicate_size: int = Field(
        default=1,
        ge=1,
        description="Copies of the sharded model inside a replica (HSDP: gradients are "
        "all-reduced across copies).",
    )
    tp_size: int = Field(
        default=1, ge=1, description="Tensor parallelism of the trainer. Only 1 in this version."
    )
    cp_size: int = Field(
        default=1, ge=1, description="Context parallelism of the trainer. Only 1 in this version."
    )
    pp_size: int = Field(
        default=1, ge=1, description="Pipeline parallelism of the trainer. Only 1 in this version."
    )

    @field_validator("dp_shard_size")
    @classmethod
    def _positive_or_auto(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"must be >= 1, or -1 to use the node's free devices, got {value}")
        return value

    @field_validator("tp_size", "cp_size", "pp_size")
    @classmethod
    def _not_yet(cls, value: int) -> int:
        return _only_one(value, "shard the model with dp_shard_size instead")

    @property
    def ranks_per_replica(self) -> int:
        """Ranks of one replica; only defined once dp_shard_size is not -1 (auto)."""
        if self.dp_shard_size < 1:
            raise ValueError("dp_shard_size = -1 is resolved by the launcher first")
        return self.dp_replicate_size * self.dp_shard_size


class PolicyConfig(BaseModel):
    """[policy]: the model being trained."""

    model_config = _MODEL_CONFIG

    model_name_or_path: str = Field(
        default="gantry:tiny-qwen2",
        min_length=1,
        description="The model to train: a Hugging Face repo id or a local directory. A name "
        "starting with 'gantry:' is a built-in model that the launcher builds locally "
        "('gantry:tiny-qwen2', a few-MB Qwen2, and 'gantry:tiny-qwen2.5-vl', a few-MB "
        "Qwen2.5-VL with its processor, for CPU runs and tests).",
    )
    model_max_length: int = Field(
        default=4096,
        gt=0,
        description="Maximum number of tokens of a prompt and its response together.",
    )
    model_gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute each transformer block's activations in the backward pass "
        "instead of keeping them: less memory, about a third more compute.",
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
        description="Number of rollout replicas (generators) started with the run; more can "
        "join a running run (`python -m rollout --run-dir RUN --replica N`).",
    )
    tp_size: int = Field(
        default=1,
        ge=1,
        description="Tensor-parallel size of each rollout replica (vLLM): its number of GPUs, "
        "or of worker processes on vLLM's CPU build.",
    )


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
        default=8,
        gt=0,
        description="Prompts handed to the engine in one generate call. The controller keeps "
        "up to twice as many queued at each replica, so the next call is ready when one ends.",
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
    dtype: Literal["auto"] | Dtype = Field(
        default="auto",
        description="Dtype the rollout engine computes in, and in which weights are sent to it. "
        "'auto': float32 on CPU; on GPU the model's dtype, bfloat16 for a float32 model.",
    )
    weight_sync_in_background: bool = Field(
        default=True,
        description="The policy copies its weight shards (in the transfer dtype: one more copy "
        "of its shards in memory) when a sync is ordered and sends them from a thread while "
        "it trains the next step, instead of waiting for every rollout replica to finish its "
        "generate call; false: it waits (no extra memory).",
    )
    weight_sync_timeout: StrictFloat = Field(
        default=600.0,
        gt=0,
        description="Seconds a weight sync waits for all its members (policy senders, every "
        "rollout rank) before failing with the names of those missing.",
    )
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
