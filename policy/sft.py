"""Supervised fine-tuning on one policy rank: the step on a batch of dataset samples, and the
validation loss.

The controller sends the dataset indices of each step (shuffled per epoch); every rank encodes
and trains on its own contiguous share (`policy.sft_data`), `mini_batch` conversations per
forward/backward. The loss is the cross-entropy of the assistant tokens, a token mean over the
whole step, all ranks together (each micro-batch's token sum is divided by global tokens / data
parallel size, and FSDP2 averages gradients), as in the GRPO trainer.

FSDP2 runs collectives inside every unit's forward, so all ranks must run the same modules the
same number of times: validation shares are padded to the same number of micro-batches, and a
VLM micro-batch lacking images or videos gets a blank one that trains nothing
(`policy.vision`).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from gantry.config import GantryConfig
from policy.parallel import DistEnv
from policy.sft_data import (
    IGNORE,
    ConversationEncoder,
    Example,
    MicroBatch,
    collate,
    with_fillers,
)
from policy.trainer import Trainer, share_of


class SFTTrainer(Trainer):
    def __init__(
        self,
        config: GantryConfig,
        model_path: str,
        env: DistEnv,
        mesh,
        total_steps: int,
        samples,
        val_samples=(),
    ) -> None:
        super().__init__(config, model_path, env, mesh, total_steps)
        self.samples, self.val_samples = samples, val_samples
        self.encoder = ConversationEncoder(
            model_path, config.policy.model_max_length, vision=self.vision
        )

    # ---- training ---------------------------------------------------------------------

    def step(self, indices: list[int]) -> dict[str, float]:
        """One optimizer step on the samples at `indices` (a collective); global metrics."""
        started = time.perf_counter()
        mine = share_of(indices, self.env.rank, self.env.world_size)
        examples = [self.encoder.encode(self.samples[i], i) for i in mine]
        size = self.config.train.train_policy.mini_batch
        micro = [self._collate(examples[i : i + size]) for i in range(0, len(examples), size)]
        counts = self._all_reduce(
            torch.tensor(
                [sum(b.assistant_tokens for b in micro), sum(b.tokens for b in micro)],
                dtype=torch.float64,
            )
        )
        global_tokens, all_tokens = max(float(counts[0]), 1.0), float(counts[1])
        normalizer = global_tokens / self.env.world_size
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for i, batch in enumerate(micro):
            self.model.set_requires_gradient_sync(i == len(micro) - 1)
            loss = self._loss_sum(batch) / normalizer
            loss.backward()
            loss_sum += float(loss.detach()) * normalizer
        grad_norm = self._optimizer_step()
        loss_sum = self._all_reduce(loss_sum)
        seconds = time.perf_counter() - started
        return {
            "loss": float(loss_sum[0]) / global_tokens,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": all_tokens,
            "assistant_tokens": global_tokens,
            "tokens_per_s": all_tokens / max(seconds, 1e-9),
            "policy_seconds": seconds,
        }

    def _loss_sum(self, batch: MicroBatch) -> torch.Tensor:
        """Summed cross-entropy of the batch's assistant tokens (float32 logits)."""
        logits = self.model(**batch.model_inputs()).logits[:, :-1].float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            batch.targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )

    def _collate(self, examples: list[Example]) -> MicroBatch:
        examples = with_fillers(examples, self.fillers)
        batch = collate(examples, self.pad_token_id, self.env.device)
        self._add_token_types(batch.vision, batch.input_ids)
        return batch

    # ---- validation -------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Token-mean loss of the assistant tokens of every validation sample (a collective)."""
        started = time.perf_counter()
        rank, world = self.env.rank, self.env.world_size
        mine = list(range(rank, len(self.val_samples), world))
        size = self.config.validation.batch_size
        rounds = math.ceil(math.ceil(len(self.val_samples) / world) / size)
        sums = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad():
            for r in range(rounds):
                chunk = mine[r * size : (r + 1) * size]
                # A rank out of samples still runs a forward (weight 0): FSDP's collectives.
                examples = [self._val_example(i) for i in chunk] or [self._val_example(0)]
                batch = self._collate(examples)
                loss = self._loss_sum(batch)
                if chunk:
                    sums += torch.tensor([float(loss), batch.assistant_tokens], dtype=torch.float64)
        self.model.train()
        sums = self._all_reduce(sums)
        return {
            "val_loss": float(sums[0]) / max(float(sums[1]), 1.0),
            "val_tokens": float(sums[1]),
            "val_samples": float(len(self.val_samples)),
            "val_seconds": time.perf_counter() - started,
        }

    def _val_example(self, index: int) -> Example:
        return self.encoder.encode(self.val_samples[index], index)
