"""The GRPO trainer of one policy rank: its share of each batch, micro-batches, the FSDP2 step.

Every rank of the policy job turns a TrainBatch into the same list of rows (one per
completion): groups sorted by prompt id, so that the result does not depend on the order in
which rollouts arrived, and advantages normalised within each group. Each rank trains on its
own contiguous share, `mini_batch` rows per forward/backward, and gradients are accumulated
(synchronised across ranks only on the last micro-batch).

The loss is a token mean over the whole step batch, all ranks together: a micro-batch's loss
is its token sum divided by (global token count / data-parallel size), and FSDP2 averages
gradients over the data-parallel ranks, so N ranks take the same step as one process on the
whole batch would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from gantry.comm.protocol import RolloutGroup, prompt_id_parts
from gantry.config import GantryConfig
from gantry.data.media import has_media
from gantry.data.plugin import prompt_messages
from gantry.models.loading import is_vision_language, media_token_ids
from gantry.run.errors import NonFiniteError
from policy.export import tied_weight_names
from policy.grpo import group_advantages, grpo_loss
from policy.optim import build_optimizer, build_scheduler
from policy.parallel import (
    DistEnv,
    ShardingOptions,
    full_tensor,
    load_sharded_model,
    set_gradient_sync,
)
from policy.step_metrics import PhaseClock, token_entropy
from policy.vision import (
    PromptVision,
    VisionInputs,
    merge_vision,
    missing_kinds,
    token_types,
    vision_fillers,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    """One completion with its prompt, as a training row."""

    token_ids: list[int]  # prompt + completion
    prompt_len: int
    logprobs: list[float]  # behaviour log-probs of the completion tokens
    advantage: float
    vision: VisionInputs = field(default_factory=VisionInputs)  # the prompt's images / videos
    prompt_id: str = ""


def rows_of(groups: list[RolloutGroup]) -> list[Row]:
    """All completions of the batch in a fixed order; advantages normalised within each group."""
    rows = []
    for group in sorted(groups, key=lambda g: g.prompt_id):
        rewards = torch.tensor([s.reward for s in group.samples], dtype=torch.float32)
        advantages = group_advantages(rewards.unsqueeze(0)).squeeze(0).tolist()
        prompt = group.prompt_token_ids
        for sample, advantage in zip(group.samples, advantages, strict=True):
            rows.append(
                Row(
                    prompt + sample.token_ids,
                    len(prompt),
                    sample.logprobs,
                    advantage,
                    prompt_id=group.prompt_id,
                )
            )
    return rows


def share_of(rows: list[Row], rank: int, world_size: int) -> list[Row]:
    """The contiguous share of `rows` that data-parallel rank `rank` trains on."""
    if len(rows) % world_size:
        raise ValueError(
            f"{len(rows)} completions cannot be shared equally by {world_size} policy ranks"
        )
    size = len(rows) // world_size
    return rows[rank * size : (rank + 1) * size]


@dataclass
class PackedBatch:
    """Rows right-padded into tensors; masks are aligned with the next-token predictions.
    `completion_positions` are the positions at which some row predicts a completion token:
    logits are computed there only (prompts, a VLM's patch tokens and padding skip the
    vocabulary projection)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L-1]
    behaviour_logprobs: torch.Tensor  # [B, L-1]
    advantages: torch.Tensor  # [B]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # a VLM's pixel inputs

    def __post_init__(self) -> None:
        self.completion_positions = self.completion_mask.any(dim=0).nonzero().squeeze(1)

    def model_inputs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "logits_to_keep": self.completion_positions,
            **self.vision,
        }


def pack_rows(rows: list[Row], pad_token_id: int, device: torch.device) -> PackedBatch:
    length = max(len(r.token_ids) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    completion_mask = torch.zeros((batch, length - 1), dtype=torch.float32)
    behaviour_logprobs = torch.zeros((batch, length - 1), dtype=torch.float32)
    for i, row in enumerate(rows):
        end = len(row.token_ids)
        input_ids[i, :end] = torch.tensor(row.token_ids)
        attention_mask[i, :end] = 1
        # Token t (t >= prompt_len) is predicted at position t - 1.
        completion_mask[i, row.prompt_len - 1 : end - 1] = 1.0
        behaviour_logprobs[i, row.prompt_len - 1 : end - 1] = torch.tensor(row.logprobs)
    advantages = torch.tensor([r.advantage for r in rows], dtype=torch.float32)
    return PackedBatch(
        *(t.to(device) for t in (input_ids, attention_mask, completion_mask, behaviour_logprobs)),
        advantages.to(device),
        merge_vision([r.vision for r in rows], device),
    )


def token_logprobs(
    model: torch.nn.Module, batch: PackedBatch, temperature: float, banned: Sequence[int] = ()
) -> torch.Tensor:
    """log p(token t | tokens < t) under `model` at the sampler's temperature, at the
    completion tokens: [B, L-1], 0 outside the completions. `banned` tokens (never sampled:
    a VLM's media placeholders) are masked out, as the sampler did."""
    return completion_logprobs(model, batch, temperature, banned)[0]


def completion_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    temperature: float,
    banned: Sequence[int] = (),
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs`, and with `entropy` the entropy of the distribution sampled from (the
    same temperature and banned tokens) at each completion position: [B, L-1], 0 outside the
    completions, without gradient."""
    positions = batch.completion_positions
    logits = model(**batch.model_inputs()).logits.float() / temperature  # [B, K, V]
    if banned:
        logits[..., list(banned)] = float("-inf")
    targets = batch.input_ids[:, 1:][:, positions].unsqueeze(-1)
    every = torch.log_softmax(logits, dim=-1)
    kept = every.gather(-1, targets).squeeze(-1)
    logprobs = kept.new_zeros(batch.completion_mask.shape)
    logprobs[:, positions] = kept
    # Another row's completion position may be this row's prompt (a banned placeholder: -inf).
    outside = batch.completion_mask == 0
    if not entropy:
        return logprobs.masked_fill(outside, 0.0), None
    # Only where this row predicts a completion token: the other rows' positions are wasted.
    mine = batch.completion_mask[:, positions] > 0
    kept_entropy = torch.zeros(mine.shape, device=logits.device)
    kept_entropy[mine] = token_entropy(every.detach()[mine])
    entropies = torch.zeros(batch.completion_mask.shape, device=logits.device)
    entropies[:, positions] = kept_entropy
    return logprobs.masked_fill(outside, 0.0), entropies


def sharding_options(config: GantryConfig) -> ShardingOptions:
    train = config.train
    return ShardingOptions(
        master_dtype=DTYPES[train.master_dtype],
        param_dtype=DTYPES[train.param_dtype],
        reduce_dtype=DTYPES[train.fsdp_reduce_dtype],
        cpu_offload=train.fsdp_offload,
        gradient_checkpointing=config.policy.model_gradient_checkpointing,
        reshard_after_forward=train.fsdp_reshard_after_forward != "never",
    )


# Token means of the step: token-weighted sums accumulated over micro-batches and ranks, in
# this order after the loss's sum. Names as in gantry.comm.metrics.
_MEANS = (
    "kl_ref", "kl_behaviour", "ratio_mean", "clip_fraction", "clip_low_fraction",
    "clip_high_fraction", "entropy", "logprob_gap_mean",
)  # fmt: skip
_SUMS = ("loss", *_MEANS)
# Measured on the policy before the step's first update (see GRPOTrainer.step).
_FIRST_ITERATION = _SUMS.index("logprob_gap_mean")


class Trainer:
    """The sharded model, optimizer and LR schedule of one policy rank, and what every
    algorithm does with them: the optimizer step, metric reductions, the weights to sync."""

    def __init__(
        self, config: GantryConfig, model_path: str, env: DistEnv, mesh, total_steps: int
    ) -> None:
        self.config, self.env = config, env
        torch.manual_seed(config.train.seed)
        self.options = sharding_options(config)
        self.model = load_sharded_model(model_path, mesh, self.options)
        self.optimizer = build_optimizer(self.model.parameters(), config.train)
        optimizer_steps = total_steps * config.train.train_policy.mu_iterations
        self.scheduler = build_scheduler(self.optimizer, config.train, optimizer_steps)
        self.pad_token_id = _text_config(self.model.config).pad_token_id or 0
        self.vision = is_vision_language(self.model.config)
        # Blank media rows keep the ranks' collectives in step (policy.vision); a single rank
        # has none to keep in step with.
        self.fillers = vision_fillers(self.model) if self.vision and env.world_size > 1 else {}

    def close(self) -> None:
        """Stop what the trainer runs besides the model (the SFT encoder processes)."""

    def _add_token_types(self, vision: dict, input_ids: torch.Tensor) -> None:
        """A VLM batch's `mm_token_type_ids` (the M-RoPE positions of its patches)."""
        if self.vision:
            vision["mm_token_type_ids"] = token_types(input_ids, self.model.config)

    def _optimizer_step(self) -> float:
        """Clip, step, clear; a non-finite gradient norm (the same on every rank: it is the
        all-reduced total) clears the gradients and raises before any weight changes."""
        clip = self.config.train.optm_grad_norm_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        norm = float(full_tensor(grad_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"optimizer step {self.scheduler.last_epoch + 1}: the gradient norm is {norm} (a "
                "non-finite loss, reward or advantage); the update was not applied"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.env.world_size == 1:
            return values
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        moved = values.to(self.env.device)
        dist.all_reduce(moved, op=op)
        return moved.cpu()

    def weight_manifest_params(self) -> dict[str, torch.nn.Parameter]:
        """The parameters to sync, under HF names; a tied lm_head is left out (the engine
        ties it)."""
        tied = tied_weight_names(self.model)
        return {name: p for name, p in self.model.named_parameters() if name not in tied}


def _text_config(config):
    """A VLM keeps its language model's settings (pad id, vocabulary) in text_config."""
    return getattr(config, "text_config", None) or config


class GRPOTrainer(Trainer):
    """GRPO on batches of rollout groups, with an optional frozen reference model.

    For a VLM, `samples` (the dataset) gives each prompt's images and videos, which the policy
    encodes again with the processor; the ids must equal those the rollout engine saw."""

    def __init__(
        self,
        config: GantryConfig,
        model_path: str,
        env: DistEnv,
        mesh,
        total_steps: int,
        samples: Sequence = (),
    ) -> None:
        super().__init__(config, model_path, env, mesh, total_steps)
        self.samples = samples
        self.banned = media_token_ids(self.model.config)
        self.prompt_vision = PromptVision(model_path) if self.vision else None
        self.reference = None
        if config.train.train_policy.kl_beta > 0:
            frozen = ShardingOptions(
                master_dtype=self.options.param_dtype, param_dtype=self.options.param_dtype
            )
            self.reference = load_sharded_model(model_path, mesh, frozen)
            self.reference.eval().requires_grad_(False)

    def step(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """One policy step on a batch of groups (a collective); returns global metrics. With
        mu_iterations > 1 the statistics are the last iteration's, but the log-prob gap's (the
        policy before the step's first update)."""
        started = time.perf_counter()
        mine = share_of(rows_of(groups), self.env.rank, self.env.world_size)
        if self.vision:
            self._attach_vision(mine, {g.prompt_id: g for g in groups})
        size = self.config.train.train_policy.mini_batch
        micro = [self._pack(mine[i : i + size]) for i in range(0, len(mine), size)]
        tokens = self._all_reduce(
            torch.tensor([sum(float(b.completion_mask.sum()) for b in micro)])
        )
        global_tokens = max(float(tokens[0]), 1.0)
        clock = PhaseClock(self.env.device)
        with clock.phase("forward"):
            references = [self._reference_logprobs(b) for b in micro]
        first = None
        for _ in range(self.config.train.train_policy.mu_iterations):
            lr = self.scheduler.get_last_lr()[0]
            sums, ratio_max = self._accumulate(micro, references, global_tokens, clock)
            first = sums if first is None else first
            with clock.phase("optimizer"):
                grad_norm = self._optimizer_step()
        sums[_FIRST_ITERATION] = first[_FIRST_ITERATION]
        sums = self._all_reduce(sums) / global_tokens
        metrics = dict(zip(_SUMS, sums.tolist(), strict=True))
        ratio_max = self._all_reduce(torch.tensor([ratio_max]), dist.ReduceOp.MAX)
        metrics.update(
            ratio_max=float(ratio_max[0]), grad_norm=grad_norm, lr=lr, tokens=global_tokens,
            policy_seconds=time.perf_counter() - started,
            policy_forward_s=clock.seconds["forward"], policy_backward_s=clock.seconds["backward"],
            policy_optimizer_s=clock.seconds["optimizer"],
        )  # fmt: skip
        return metrics

    def _attach_vision(self, rows: list[Row], groups: dict[str, RolloutGroup]) -> None:
        """Each row's prompt images / videos, encoded once per prompt."""
        encoded: dict[str, VisionInputs] = {}
        for row in rows:
            if row.prompt_id not in encoded:
                encoded[row.prompt_id] = self._prompt_vision(groups[row.prompt_id])
            row.vision = encoded[row.prompt_id]

    def _prompt_vision(self, group: RolloutGroup) -> VisionInputs:
        _, index = prompt_id_parts(group.prompt_id)
        messages = prompt_messages(self.samples[index], "", index)
        if not has_media(messages):
            return VisionInputs()
        ids, vision = self.prompt_vision.encode(messages)
        if ids != group.prompt_token_ids:
            raise RuntimeError(
                f"prompt {group.prompt_id}: the processor's {len(ids)} ids differ from the "
                f"{len(group.prompt_token_ids)} the rollout engine generated from; policy and "
                "rollout must load the same processor and media settings"
            )
        return vision

    def _pack(self, rows: list[Row]) -> PackedBatch:
        """A micro-batch, with blank media rows where FSDP needs them (policy.vision)."""
        if self.fillers:
            for kind in missing_kinds([r.vision for r in rows]):
                ids, vision = self.fillers[kind]
                rows = rows + [Row(ids, len(ids), [], 0.0, vision)]
        batch = pack_rows(rows, self.pad_token_id, self.env.device)
        self._add_token_types(batch.vision, batch.input_ids)
        return batch

    def _accumulate(
        self, micro: list[PackedBatch], references: list, global_tokens: float, clock: PhaseClock
    ) -> tuple[torch.Tensor, float]:
        """Forward/backward over the micro-batches: token-weighted statistics summed (_SUMS),
        and the largest importance ratio."""
        policy_cfg = self.config.train.train_policy
        temperature = self.config.rollout.sampling_config.temperature
        normalizer = global_tokens / self.env.world_size
        sums, ratio_max = torch.zeros(len(_SUMS), dtype=torch.float64), 0.0
        for i, (batch, ref) in enumerate(zip(micro, references, strict=True)):
            # Reduce gradients across ranks once, after the last micro-batch.
            set_gradient_sync(self.model, i == len(micro) - 1)
            mask = batch.completion_mask
            with clock.phase("forward"):
                logprobs, entropy = completion_logprobs(
                    self.model, batch, temperature, self.banned, entropy=True
                )
                loss, stats = grpo_loss(
                    logprobs, batch.behaviour_logprobs, batch.advantages, mask,
                    epsilon_low=policy_cfg.epsilon_low, epsilon_high=policy_cfg.epsilon_high,
                    kl_beta=policy_cfg.kl_beta, ref_logprobs=ref, normalizer=normalizer,
                )  # fmt: skip
            with clock.phase("backward"):
                loss.backward()
            tokens = float(mask.sum())
            means = {
                **stats, "kl_ref": stats.get("kl", 0.0), "logprob_gap_mean": stats["logprob_gap"],
                "entropy": float((entropy * mask).sum()) / max(tokens, 1.0),
            }  # fmt: skip
            sums += torch.tensor(
                [float(loss.detach()) * normalizer] + [means[k] * tokens for k in _MEANS],
                dtype=torch.float64,
            )
            ratio_max = max(ratio_max, stats["ratio_max"])
        return sums, ratio_max

    def _reference_logprobs(self, batch: PackedBatch) -> torch.Tensor | None:
        if self.reference is None:
            return None
        with torch.no_grad():
            return token_logprobs(
                self.reference, batch, self.config.rollout.sampling_config.temperature, self.banned
            )
