"""The GRPO trainer of one policy process: batch assembly, the optimisation step, weights.

One unsharded process for now; the model, optimizer and step are kept behind this class so
that FSDP2 sharding slots in without touching the worker loop.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from gantry.config import GantryConfig
from gantry.protocol import RolloutGroup
from policy.grpo import group_advantages, grpo_loss


@dataclass
class PackedBatch:
    """Prompt + completion token rows, right-padded; mask marks the completion tokens."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L-1], aligned with the next-token predictions
    behaviour_logprobs: torch.Tensor  # [B, L-1]
    advantages: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B]


def pack_groups(groups: list[RolloutGroup], pad_token_id: int) -> PackedBatch:
    """Flatten groups into rows; advantages are normalised within each group."""
    rows, behaviour, starts, rewards, advantages = [], [], [], [], []
    for group in groups:
        group_rewards = torch.tensor([s.reward for s in group.samples], dtype=torch.float32)
        advantages.append(group_advantages(group_rewards.unsqueeze(0)).squeeze(0))
        rewards.append(group_rewards)
        for sample in group.samples:
            rows.append(group.prompt_token_ids + sample.token_ids)
            behaviour.append(sample.logprobs)
            starts.append(len(group.prompt_token_ids))
    length = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    completion_mask = torch.zeros((batch, length - 1), dtype=torch.float32)
    behaviour_logprobs = torch.zeros((batch, length - 1), dtype=torch.float32)
    for i, (row, logps, start) in enumerate(zip(rows, behaviour, starts, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        # Token t (t >= start) is predicted at position t - 1.
        completion_mask[i, start - 1 : len(row) - 1] = 1.0
        behaviour_logprobs[i, start - 1 : len(row) - 1] = torch.tensor(logps)
    return PackedBatch(
        input_ids,
        attention_mask,
        completion_mask,
        behaviour_logprobs,
        torch.cat(advantages),
        torch.cat(rewards),
    )


def token_logprobs(model: torch.nn.Module, batch: PackedBatch, temperature: float) -> torch.Tensor:
    """log p(token t | tokens < t) under `model` at the sampler's temperature: [B, L-1]."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].float() / temperature
    targets = batch.input_ids[:, 1:].unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)


class GRPOTrainer:
    def __init__(self, config: GantryConfig, model_path: str) -> None:
        self.config = config
        torch.manual_seed(config.train.seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.train()
        self.reference = None
        if config.train.train_policy.kl_beta > 0:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        train = config.train
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=train.optm_lr,
            betas=tuple(train.optm_betas),
            weight_decay=train.optm_weight_decay,
        )
        self.pad_token_id = self.model.config.pad_token_id or 0
        self.step_count = 0

    def step(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """One policy step on a batch of groups; returns metrics for the console."""
        started = time.perf_counter()
        policy_cfg = self.config.train.train_policy
        temperature = self.config.rollout.sampling_config.temperature
        batch = pack_groups(groups, self.pad_token_id)
        ref_logprobs = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logprobs = token_logprobs(self.reference, batch, temperature)
        for _ in range(policy_cfg.mu_iterations):
            logprobs = token_logprobs(self.model, batch, temperature)
            loss, stats = grpo_loss(
                logprobs,
                batch.behaviour_logprobs,
                batch.advantages,
                batch.completion_mask,
                epsilon_low=policy_cfg.epsilon_low,
                epsilon_high=policy_cfg.epsilon_high,
                kl_beta=policy_cfg.kl_beta,
                ref_logprobs=ref_logprobs,
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.config.train.optm_grad_norm_clip
            )
            self.optimizer.step()
        self.step_count += 1
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "kl_ref": stats.get("kl", 0.0),
            "kl_behaviour": stats["kl_behaviour"],
            "ratio_mean": stats["ratio_mean"],
            "clip_fraction": stats["clip_fraction"],
            "tokens": float(batch.completion_mask.sum()),
            "policy_seconds": time.perf_counter() - started,
        }

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The weights to sync, under HF names; a tied lm_head is left out (the engine ties it)."""
        state = dict(self.model.named_parameters())
        if self.model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return {name: p.detach() for name, p in state.items()}
