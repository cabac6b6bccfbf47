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
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gantry.config import GantryConfig
from policy.parallel import DistEnv, set_gradient_sync
from policy.sft_data import IGNORE, MicroBatch
from policy.sft_prefetch import EncoderSpec, ShareEncoder, StepEncoder
from policy.step_metrics import padding_counts
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
        spec = EncoderSpec(
            model_path,
            config.policy.model_max_length,
            self.vision,
            config.train.train_policy.mini_batch,
            self.pad_token_id,
            self.fillers,
        )
        workers = config.train.train_policy.dataloader_num_workers
        self.steps = StepEncoder(spec, samples, workers)
        self.val_steps = ShareEncoder(spec, val_samples, self.steps.inline.encoder)

    def close(self) -> None:
        self.steps.close()

    # ---- training ---------------------------------------------------------------------

    def step(self, indices: list[int], next_indices: Sequence[int] = ()) -> dict[str, float]:
        """One optimizer step on the samples at `indices` (a collective); global metrics.
        `next_indices` (the following step's) are encoded in the background meanwhile."""
        started = time.perf_counter()
        micro, truncated = self.steps.take(self._share(indices))
        self.steps.prepare(self._share(next_indices) if next_indices else ())
        micro = [self._on_device(batch) for batch in micro]
        counts = self._all_reduce(
            torch.tensor(
                [
                    sum(b.assistant_tokens for b in micro),
                    sum(b.tokens for b in micro),
                    truncated,
                    *padding_counts([b.attention_mask for b in micro]),
                ],
                dtype=torch.float64,
            )
        )
        global_tokens, all_tokens = max(float(counts[0]), 1.0), float(counts[1])
        normalizer = global_tokens / self.env.world_size
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for i, batch in enumerate(micro):
            set_gradient_sync(self.model, i == len(micro) - 1)
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
            "truncated_samples": float(counts[2]),
            "padding_fraction": float(counts[3]) / max(float(counts[4]), 1.0),
        }

    def _loss_sum(self, batch: MicroBatch) -> torch.Tensor:
        """Summed cross-entropy of the batch's assistant tokens (float32 logits, computed at
        the batch's label positions only)."""
        logits = self.model(**batch.model_inputs()).logits.float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            batch.kept_targets().reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )

    def _share(self, indices: Sequence[int]) -> list[int]:
        return share_of(list(indices), self.env.rank, self.env.world_size)

    def _on_device(self, batch: MicroBatch) -> MicroBatch:
        batch = batch.to(self.env.device)
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
                batch = self._on_device(self.val_steps.micro_batches([chunk or [0]])[0][0])
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
