"""The `[train]` section and its sub-sections `[train.train_policy]` (the algorithm and its loss)
and `[train.ckpt]` (checkpoints, exports, uploads). cosmos-rl's names; every field documented.

Part of the schema that `gantry.config.schema.GantryConfig` assembles. Imports no torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from gantry.config.cluster import _MODEL_CONFIG
from gantry.config.fields import Dtype, StrictFloat
from gantry.config.rewards import OverlongRewardConfig, RewardServerConfig

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
    loss_type: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = Field(
        default="token-mean",
        description="How per-token losses are reduced, over the whole step (all micro-batches "
        "and ranks): 'token-mean' averages over all completion tokens; 'seq-mean-token-sum' "
        "sums each completion's tokens and averages over completions; 'seq-mean-token-mean' "
        "averages each completion's tokens, then over completions (docs/algorithms.md).",
    )
    # ---- the loss family (policy/grpo.py, policy/losses.py; docs/algorithms.md)
    unbiased_loss_max_tokens: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="Dr.GRPO: with loss_type = 'seq-mean-token-mean', divide each completion's "
        "token sum by this constant instead of its length (unset: its length).",
    )
    unbiased_advantage: bool = Field(
        default=False,
        description="Dr.GRPO: advantages are r - mean(group), not divided by a std.",
    )
    scale_rewards: Literal["group", "batch"] = Field(
        default="group",
        description="What std the advantages r - mean(group) are divided by (unless "
        "unbiased_advantage): the group's ('group', GRPO) or that of all the step's rewards "
        "('batch'). TRL's scale_rewards; cosmos-rl has no such key.",
    )
    lower_bound_ratio: float = Field(
        default=3.0,
        gt=1,
        description="Dual-clip PPO (Ye et al. 2020): with a negative advantage A the per-token "
        "loss is at most -lower_bound_ratio x A. Not applied with variant = 'gspo' or aipo_rho "
        "(as in cosmos-rl).",
    )
    aipo_rho: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="AIPO (arXiv 2505.24034): the per-token loss is -min(ratio, aipo_rho) x A "
        "instead of PPO's clipped minimum (suggested 2-10; unset: PPO clipping).",
    )
    positive_nll_coef: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description="VAPO's positive-example LM loss: add this times the mean negative "
        "log-likelihood of the tokens of completions whose reward is > 0 (unset or 0: off).",
    )
    entropy_coeff: float = Field(
        default=0.0,
        ge=0,
        description="Entropy bonus: subtract entropy_coeff x the policy's token entropy "
        "(aggregated as loss_type) from the loss, with its gradient (as verl; cosmos-rl adds "
        "it without gradient, which leaves the update unchanged).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        default="k3",
        description="Estimator of KL(pi || pi_ref) per token, delta = log pi_ref - log pi: "
        "'k1' = -delta, 'k2' = delta^2 / 2, 'k3' = exp(delta) - delta - 1 (verl's "
        "kl_loss_type; cosmos-rl always uses k3).",
    )
    unbiased_kl_estimate: bool = Field(
        default=False,
        description="DeepSeek-V3.2: multiply each token's KL estimate by pi / pi_old (the "
        "importance ratio), for an unbiased estimate from off-policy samples.",
    )
    use_kl_in_reward: bool = Field(
        default=False,
        description="Put the KL penalty in the reward instead of the loss: each completion's "
        "reward loses kl_beta x the sum over its tokens of the KL estimate (behaviour vs "
        "reference log-probs) before advantages are computed (verl's use_kl_in_reward).",
    )
    use_decoupled_loss: bool = Field(
        default=False,
        description="Decoupled PPO (AReaL): the ratio is taken against the policy's own "
        "log-probs at the step's start (the proximal policy), and each token's loss is weighted "
        "by pi_prox / pi_behaviour, the rollout engine's log-probs (see behav_imp_weight_*).",
    )
    behav_imp_weight_cap: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="Decoupled loss: the largest behaviour importance weight; above it a weight "
        "is masked (0) or truncated to it, per behav_imp_weight_mode (unset: no cap).",
    )
    behav_imp_weight_floor: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="Decoupled loss, mask mode: weights below it are masked too (ICE-POP's "
        "two-sided mask). Gantry's name; cosmos-rl has no such key.",
    )
    behav_imp_weight_mode: Literal["mask", "truncate"] = Field(
        default="mask",
        description="What behav_imp_weight_cap does: 'mask' (cosmos-rl, AReaL: weight 0) or "
        "'truncate' (TIS: min(weight, cap)). Gantry's name, after verl/ms-swift's rollout "
        "importance sampling modes.",
    )
    behav_imp_weight_level: Literal["token", "sequence"] = Field(
        default="token",
        description="The behaviour weight per token, or per completion: the geometric mean "
        "exp(mean over tokens of (log pi_prox - log pi_behaviour)), capped as a whole.",
    )
    off_policy_masking_delta: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description="DeepSeek-V3.2 off-policy sequence masking: a completion with a negative "
        "advantage whose mean (log pi_behaviour - log pi) exceeds this is left out of the loss.",
    )
    # ---- DAPO and rewards (gantry.config.rewards)
    variant: Literal["grpo", "dapo", "gspo"] = Field(
        default="grpo",
        description="'gspo': GSPO's sequence-level ratio and clipping (docs/algorithms.md; "
        "epsilon_low/high default to the paper's 3e-4/4e-4). 'dapo': DAPO's dynamic sampling, groups whose completions all got the same "
        "reward are dropped by the controller and replaced by new prompts until the step's batch "
        "is full (bounded by max_retry_for_on_policy); 'grpo': every group trains.",
    )
    max_retry_for_on_policy: int = Field(
        default=-1,
        description="DAPO: a step may draw at most this many batches' worth of prompts "
        "(max_retry_for_on_policy x the step's groups) to fill its batch, else the run stops "
        "naming it; <= 0: no bound (cosmos-rl's default -1).",
    )
    overlong_reward: OverlongRewardConfig = Field(
        default_factory=OverlongRewardConfig, description="DAPO's soft overlong penalty."
    )
    reward_function: str | list[str] | dict[str, float] | None = Field(
        default=None,
        description="Weights of the reward functions by name (a name, a list: weight 1 each, or "
        "{name = weight}); the reward is the weighted sum. Names are the script's reward "
        "functions, 'overlong' and the reward_server's name. Unset: every reward function of the "
        "script, weight 1.",
    )
    reward_server: RewardServerConfig = Field(
        default_factory=RewardServerConfig,
        description="A reward computed by the user's own HTTP scorer (off while url is empty).",
    )

    @model_validator(mode="after")
    def _loss_options_agree(self) -> TrainPolicyConfig:
        if self.variant == "gspo":
            # GSPO's ratio is a per-token geometric mean, much closer to 1 than a token's: its
            # paper clips at 3e-4 / 4e-4 (cosmos-rl keeps PPO's 0.2, which never clips it).
            if "epsilon_low" not in self.model_fields_set:
                self.epsilon_low = 3e-4
            if "epsilon_high" not in self.model_fields_set:
                self.epsilon_high = 4e-4
        problems = []
        if self.unbiased_loss_max_tokens and self.loss_type != "seq-mean-token-mean":
            problems.append(f"unbiased_loss_max_tokens needs loss_type = "
                            f"'seq-mean-token-mean' (Dr.GRPO), got {self.loss_type!r}")  # fmt: skip
        if self.unbiased_advantage and self.scale_rewards == "batch":
            problems.append("unbiased_advantage = true divides by no std: remove "
                            "scale_rewards = 'batch'")  # fmt: skip
        defaults = {"behav_imp_weight_cap": None, "behav_imp_weight_floor": None,
                    "behav_imp_weight_mode": "mask", "behav_imp_weight_level": "token"}  # fmt: skip
        stray = [k for k, v in defaults.items() if getattr(self, k) != v]
        if stray and not self.use_decoupled_loss:
            problems.append(f"{stray[0]} needs use_decoupled_loss = true")
        if self.behav_imp_weight_floor is not None and self.behav_imp_weight_mode != "mask":
            problems.append("behav_imp_weight_floor applies to behav_imp_weight_mode = "
                            "'mask' only: remove it")  # fmt: skip
        cap, floor = self.behav_imp_weight_cap, self.behav_imp_weight_floor
        if cap is not None and floor is not None and floor >= cap:
            problems.append(f"behav_imp_weight_floor ({floor}) must be below "
                            f"behav_imp_weight_cap ({cap})")  # fmt: skip
        if problems:
            raise ValueError("\n".join(problems))
        return self


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
    export_lora_adapter: bool = Field(
        default=False,
        description="With [policy.lora]: export the adapter alone (adapter_model.safetensors "
        "and adapter_config.json, for peft's PeftModel.from_pretrained on the base model) "
        "instead of the merged model.",
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
