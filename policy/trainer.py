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
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from gantry.comm.protocol import RolloutGroup, prompt_id_parts
from gantry.config import GantryConfig
from gantry.data.media import has_media
from gantry.data.plugin import prompt_messages
from gantry.models.loading import is_vision_language, media_token_ids
from gantry.run.errors import NonFiniteError
from policy.export import tied_weight_names
from policy.grpo import LossSettings, grpo_loss
from policy.grpo_batch import (
    advantages_for,
    gather_rows,
    kl_sums,
    local_units,
    shared_prefix_ignores,
)
from policy.lora import base_of, is_lora, merged_parameters
from policy.optim import build_optimizer, build_scheduler
from policy.parallel import (
    DistEnv,
    ShardingOptions,
    full_tensor,
    load_sharded_model,
    set_gradient_sync,
)
from policy.step_metrics import PhaseClock, differentiable_entropy
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
    reward: float = 0.0
    ignore_prefix: int = 0  # leading completion tokens the loss leaves out (shared prefix)


def rows_of(
    groups: list[RolloutGroup],
    scale: str = "group",
    min_prefix: int | None = None,
    end_ids: frozenset[int] = frozenset(),
) -> list[Row]:
    """All completions of the batch in a fixed order, with their advantages: r - mean(group),
    divided by the group's std ("group"), the batch's ("batch") or nothing ("none"), and the
    shared prefixes the loss leaves out (min_filter_prefix_tokens = `min_prefix`)."""
    ordered = sorted(groups, key=lambda g: g.prompt_id)
    rewards = [s.reward for g in ordered for s in g.samples]
    advantages = iter(advantages_for(rewards, [len(g.samples) for g in ordered], scale))
    rows = []
    for group in ordered:
        prompt = group.prompt_token_ids
        ignores = shared_prefix_ignores(
            [s.token_ids for s in group.samples], [s.reward for s in group.samples],
            min_prefix, end_ids,
        )  # fmt: skip
        for sample, ignore in zip(group.samples, ignores, strict=True):
            rows.append(
                Row(
                    prompt + sample.token_ids, len(prompt), sample.logprobs, next(advantages),
                    prompt_id=group.prompt_id, reward=sample.reward, ignore_prefix=ignore,
                )
            )  # fmt: skip
    return rows


def advantage_scale(train_policy) -> str:
    """The advantage normalisation the config asks for (unbiased_advantage: none)."""
    return "none" if train_policy.unbiased_advantage else train_policy.scale_rewards


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
    rewards: torch.Tensor | None = None  # [B]

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
        completion_mask[i, row.prompt_len - 1 + row.ignore_prefix : end - 1] = 1.0
        behaviour_logprobs[i, row.prompt_len - 1 : end - 1] = torch.tensor(row.logprobs)
    advantages = torch.tensor([r.advantage for r in rows], dtype=torch.float32)
    return PackedBatch(
        *(t.to(device) for t in (input_ids, attention_mask, completion_mask, behaviour_logprobs)),
        advantages.to(device),
        merge_vision([r.vision for r in rows], device),
        torch.tensor([r.reward for r in rows], dtype=torch.float32, device=device),
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
    completions, with gradient (the entropy bonus; computed in chunks, see
    policy.step_metrics.differentiable_entropy)."""
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
    # At every kept position of every row (a boolean selection would copy [N, V]); the other
    # rows' positions are masked out.
    entropies = logprobs.new_zeros(batch.completion_mask.shape)
    entropies[:, positions] = differentiable_entropy(every)
    return logprobs.masked_fill(outside, 0.0), entropies.masked_fill(outside, 0.0)


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
    "clip_high_fraction", "entropy", "logprob_gap_mean", "dual_clip_fraction",
    "behav_imp_weight_mean", "behav_imp_weight_capped_fraction",
)  # fmt: skip
_SUMS = ("loss", *_MEANS)
_MAXIMA = ("ratio_max", "behav_imp_weight_max")  # reduced by max over micro-batches and ranks
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
        self.model = load_sharded_model(model_path, mesh, self.options, config.policy.lora)
        # With LoRA only the adapters train: the optimizer holds only them.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(trainable, config.train)
        optimizer_steps = total_steps * config.train.train_policy.mu_iterations
        self.scheduler = build_scheduler(self.optimizer, config.train, optimizer_steps)
        self.pad_token_id = _text_config(self.model.config).pad_token_id or 0
        eos = _text_config(self.model.config).eos_token_id
        self.end_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.vision = is_vision_language(self.model.config)
        # Blank media rows keep the ranks' collectives in step (policy.vision); a single rank
        # has none to keep in step with.
        many = self.vision and env.world_size > 1
        self.fillers = vision_fillers(base_of(self.model)) if many else {}

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

    def weight_manifest_params(self):
        """The parameters to sync, under HF names; a tied lm_head is left out (the engine
        ties it). With LoRA, a function that merges them (policy.weight_sync.PolicySender)."""
        tied = tied_weight_names(self.model)
        if is_lora(self.model):  # merged at each sync (a collective): see PolicySender
            return lambda: merged_parameters(self.model, tied)
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
        self.settings = LossSettings.of(config.train.train_policy)

    def step(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """One policy step on a batch of groups (a collective); returns global metrics. With
        mu_iterations > 1 the statistics are the last iteration's, but the log-prob gap's (the
        policy before the step's first update)."""
        started = time.perf_counter()
        policy_cfg = self.config.train.train_policy
        rows = rows_of(
            groups, advantage_scale(policy_cfg), policy_cfg.min_filter_prefix_tokens, self.end_ids
        )
        mine = share_of(rows, self.env.rank, self.env.world_size)
        if self.vision:
            self._attach_vision(mine, {g.prompt_id: g for g in groups})
        size = policy_cfg.mini_batch
        micro = [self._pack(mine[i : i + size]) for i in range(0, len(mine), size)]
        masks = [b.completion_mask for b in micro]
        totals = self._all_reduce(
            local_units(masks, [b.rewards for b in micro], policy_cfg.loss_type)
        ).tolist()
        global_tokens = max(totals[0], 1.0)
        # Each rank's share of the global denominators: FSDP averages gradients over ranks.
        scale = [max(total, 1.0) / self.env.world_size for total in totals]
        clock = PhaseClock(self.env.device)
        with clock.phase("forward"):
            references = [self._reference_logprobs(b) for b in micro]
            if self.settings.use_kl_in_reward and self.reference is not None:
                self._kl_into_advantages(groups, rows, len(mine), micro, references)
        proximal: list = [None] * len(micro)  # decoupled PPO: log-probs before the update
        first = None
        for _ in range(policy_cfg.mu_iterations):
            lr = self.scheduler.get_last_lr()[0]
            sums, maxima = self._accumulate(micro, references, proximal, scale, clock)
            first = sums if first is None else first
            with clock.phase("optimizer"):
                grad_norm = self._optimizer_step()
        sums[_FIRST_ITERATION] = first[_FIRST_ITERATION]
        sums = self._all_reduce(sums) / global_tokens
        metrics = dict(zip(_SUMS, sums.tolist(), strict=True))
        maxima = self._all_reduce(maxima, dist.ReduceOp.MAX)
        metrics.update(dict(zip(_MAXIMA, maxima.tolist(), strict=True)))
        metrics.update(
            grad_norm=grad_norm, lr=lr, tokens=global_tokens,
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
        self,
        micro: list[PackedBatch],
        references: list,
        proximal: list,
        scale: list[float],
        clock: PhaseClock,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the micro-batches: token-weighted statistics summed (_SUMS),
        and their maxima (_MAXIMA). `scale`: this rank's share of the step's tokens, loss units
        and positive-sample tokens. Decoupled PPO's proximal log-probs are the first pass's:
        the weights do not change during a pass (one optimizer step after it), so they are the
        policy's at the step's start without an extra forward."""
        temperature = self.config.rollout.sampling_config.temperature
        decoupled = self.config.train.train_policy.use_decoupled_loss
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        maxima = torch.zeros(len(_MAXIMA), dtype=torch.float64)
        for i, (batch, ref) in enumerate(zip(micro, references, strict=True)):
            # Reduce gradients across ranks once, after the last micro-batch.
            set_gradient_sync(self.model, i == len(micro) - 1)
            mask = batch.completion_mask
            with clock.phase("forward"):
                logprobs, entropy = completion_logprobs(
                    self.model, batch, temperature, self.banned, entropy=True
                )
                if decoupled and proximal[i] is None:
                    proximal[i] = logprobs.detach()
                loss, stats = grpo_loss(
                    logprobs, proximal[i] if decoupled else batch.behaviour_logprobs,
                    batch.advantages, mask, ref_logprobs=ref,
                    behaviour_logprobs=batch.behaviour_logprobs if decoupled else None,
                    entropy=entropy, positive=batch.rewards > 0, normalizer=scale[1],
                    positive_normalizer=scale[2], **asdict(self.settings),
                )  # fmt: skip
            with clock.phase("backward"):
                loss.backward()
            tokens = float(mask.sum())
            means = {
                **stats, "kl_ref": stats.get("kl", 0.0), "logprob_gap_mean": stats["logprob_gap"],
                "entropy": float((entropy.detach() * mask).sum()) / max(tokens, 1.0),
            }  # fmt: skip
            sums += torch.tensor(
                [float(loss.detach()) * scale[0]] + [means.get(k, 0.0) * tokens for k in _MEANS],
                dtype=torch.float64,
            )
            here = torch.tensor([stats.get(k, 0.0) for k in _MAXIMA], dtype=torch.float64)
            maxima = torch.maximum(maxima, here)
        return sums, maxima

    def _kl_into_advantages(
        self, groups: list[RolloutGroup], rows: list[Row], share: int, micro: list, references
    ) -> None:
        """use_kl_in_reward: each completion's reward loses kl_beta x its KL sum (behaviour vs
        reference log-probs), and the advantages of this rank's micro-batches are recomputed
        from the adjusted rewards of all rows (summed over ranks: each has its share's)."""
        estimator, size = self.settings.kl_estimator, self.config.train.train_policy.mini_batch
        mine = []
        for index, (batch, ref) in enumerate(zip(micro, references, strict=True)):
            real = min(size, share - index * size)  # blank media rows come after the real ones
            sums = kl_sums(batch.behaviour_logprobs, ref, batch.completion_mask, estimator)
            mine.append(sums[:real].cpu())
        every = gather_rows(torch.cat(mine), self.env.rank * share, len(rows), self._all_reduce)
        beta = self.settings.kl_beta
        rewards = [row.reward - beta * float(kl) for row, kl in zip(rows, every, strict=True)]
        sizes = [len(g.samples) for g in sorted(groups, key=lambda g: g.prompt_id)]
        scale = advantage_scale(self.config.train.train_policy)
        advantages = advantages_for(rewards, sizes, scale)[self.env.rank * share :]
        for index, batch in enumerate(micro):
            part = advantages[index * size : min((index + 1) * size, share)]
            batch.advantages[: len(part)] = torch.tensor(part, device=batch.advantages.device)

    def _reference_logprobs(self, batch: PackedBatch) -> torch.Tensor | None:
        if self.reference is None:
            return None
        with torch.no_grad():
            return token_logprobs(
                self.reference, batch, self.config.rollout.sampling_config.temperature, self.banned
            )
