"""The `[policy]` and `[rollout]` sections: the trained model, how trainers and generators are
replicated and sharded, and how the generators sample. cosmos-rl's names; every field documented.

Part of the schema that `gantry.config.schema.GantryConfig` assembles. Imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from gantry.config.cluster import _MODEL_CONFIG
from gantry.config.fields import Dtype, StrictFloat
from gantry.config.lora import LoraConfig


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
    lora: LoraConfig | None = Field(
        default=None,
        description="Train LoRA adapters (peft) instead of all the weights; unset: full "
        "training. See docs/lora.md.",
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
    reward_timeout: StrictFloat = Field(
        default=120.0,
        ge=0,
        description="Seconds one reward function call may take. Past it the rollout replica "
        "reports the function and the sample and stops, handled like a dead replica (its prompts "
        "go to the others); 0: no limit.",
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
