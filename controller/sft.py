"""The controller of an SFT run: dataset order, steps, validation, the same checkpoints and exports.

No rollout replicas: each step is `train_batch_per_replica x policy replicas` dataset indices
from the seeded per-epoch order (`PromptQueue`), sent as one `SFTBatch`; the policy ranks encode
and train on their shares. With `[validation] enable`, the policy computes the validation loss
every `freq` steps and after the last one (and before the first with `val_before_train`).
Checkpoints, exports, uploads and resume are the GRPO controller's.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from controller import journal
from controller.controller import GROUP, Controller
from gantry.comm.protocol import SFTBatch, StepDone, Validate, ValidationDone
from gantry.config import GantryConfig
from gantry.run.runtime import RunInfo

log = logging.getLogger("gantry.controller")


class SFTController(Controller):
    def __init__(self, config: GantryConfig, info: RunInfo) -> None:
        super().__init__(config, info)
        self.n_rollout_replicas = 0
        self.tokens_per_s: list[float] = []
        self.validations: list[dict] = []
        self.truncated_samples = 0

    # ---- what differs from GRPO ---------------------------------------------------------

    def _plan(self) -> str:
        shuffle = "shuffled" if self.queue.shuffle else "in order"
        return (
            f"SFT, {self.total_steps} steps of {self.groups_per_step} samples "
            f"({self.info.dataset_size} samples x {self.config.train.epoch} epoch(s), {shuffle})"
        )

    def _wait_for_workers(self) -> None:
        super()._wait_for_workers()
        validation = self.config.validation
        if validation.enable and validation.val_before_train and self.version == 0:
            self.out.send(self.keys.policy_commands, Validate(step=0))

    def _dispatch(self) -> None:
        """Nothing to hand out: the policy reads the dataset itself."""

    def _catch_up_joiners(self) -> None:
        """No rollout replicas."""

    def _order_sync(self, version: int, replicas: list[str]) -> None:
        """No rollout replicas to send weights to."""

    def _maybe_send_batch(self) -> None:
        if self.pending_batch is not None or self.steps_sent >= self.total_steps:
            return
        tasks = [self.queue.next() for _ in range(self.groups_per_step)]
        if any(task is None for task in tasks):  # planned_steps counts full batches only
            raise RuntimeError("the dataset order ran out before the planned steps")
        self.steps_sent += 1
        last = self.steps_sent >= self.total_steps
        following = [] if last else self.queue.peek(self.groups_per_step)
        batch = SFTBatch(
            step=self.steps_sent, indices=[t.index for t in tasks], next_indices=following
        )
        self.out.send(self.keys.policy_commands, batch)
        self.pending_batch = {"sent": time.monotonic(), "epoch": tasks[-1].epoch}

    def _on_step_done(self, done: StepDone) -> None:
        validation = self.config.validation
        final = done.step >= self.total_steps
        if validation.enable and (final or done.step % validation.freq == 0):
            # Before the checkpoint and export orders the parent sends: same weights.
            self.out.send(self.keys.policy_commands, Validate(step=done.step))
        super()._on_step_done(done)

    def _state(self, step: int) -> dict:
        return {**super()._state(step), "truncated_samples": self.truncated_samples}

    def _restore(self, checkpoint: Path) -> None:
        super()._restore(checkpoint)
        state = json.loads((checkpoint / "controller.json").read_text())
        self.truncated_samples = state.get("truncated_samples", 0)  # absent before it existed

    def _snapshot(self) -> dict:
        return {**super()._snapshot(), "truncated_samples": self.truncated_samples}

    def _recover(self, state: dict) -> None:
        self.truncated_samples = state["truncated_samples"]
        self.tokens_per_s = journal.load_list(self.plane, self.keys, "tokens_per_s")
        self.validations = journal.load_list(self.plane, self.keys, "validations")
        super()._recover(state)

    def _handle(self, delivery) -> None:
        if isinstance(delivery.message, ValidationDone):
            self.out.ack(delivery.stream, GROUP, [delivery.entry_id])
            self._on_validation(delivery.message)
            return
        super()._handle(delivery)

    def _on_validation(self, done: ValidationDone) -> None:
        record = {"step": done.step, **done.metrics}
        self._remember("validations", self.validations, record)
        self.out.append("metrics", {"validation": True, **record})
        log.info(
            "validation after step %d | loss %.4f | %d tokens of %d samples in %.1fs",
            done.step, done.metrics["val_loss"], done.metrics["val_tokens"],
            done.metrics["val_samples"], done.metrics["val_seconds"],
        )  # fmt: skip

    # ---- records ------------------------------------------------------------------------

    def _record(self, done: StepDone, batch: dict) -> None:
        metrics = done.metrics
        record = {
            "step": done.step,
            "epoch": batch["epoch"],
            "elapsed_s": time.monotonic() - self._started,
            **metrics,
        }
        self._remember("rewards", self.rewards, metrics["loss"])  # what a resumed run carries on
        self._remember("tokens_per_s", self.tokens_per_s, metrics["tokens_per_s"])
        truncated = int(metrics.get("truncated_samples", 0))
        if truncated and not self.truncated_samples:
            log.warning(
                "step %d: %d conversation(s) longer than policy.model_max_length = %d were cut; "
                "their tail is not trained (raise it to keep them whole; result.json counts "
                "them all)",
                done.step, truncated, self.config.policy.model_max_length,
            )  # fmt: skip
        self.truncated_samples += truncated
        self.out.append("metrics", record)
        if done.step % self.config.logging.log_interval == 0 or done.step == self.total_steps:
            log.info(
                "step %d/%d | epoch %d | loss %.4f | %.0f tokens/s | lr %.2e | grad norm %.3f",
                done.step, self.total_steps, batch["epoch"] + 1, metrics["loss"],
                metrics["tokens_per_s"], metrics["lr"], metrics["grad_norm"],
            )  # fmt: skip

    def _write_result(self) -> None:
        losses = self.rewards  # restored ones included after a resume
        head, tail = losses[:10], losses[-10:]
        last_val = self.validations[-1]["val_loss"] if self.validations else None
        self._write_result_json(
            {
                "type": "sft",
                "steps": len(losses),
                "loss_first_10": statistics.fmean(head) if head else None,
                "loss_last_10": statistics.fmean(tail) if tail else None,
                "tokens_per_s": statistics.fmean(self.tokens_per_s) if self.tokens_per_s else 0.0,
                "val_loss": last_val,
                "truncated_samples": self.truncated_samples,
                "validations": self.validations,
                "final_export": self.final_export,
                "resumed_from": self.info.resume_from or None,
                "controller_restarts": self.controller_restarts,
                "uploads": self.uploads,
                "seconds": time.monotonic() - self._started,
            }
        )
        log.info(
            "done: %d steps, loss %.4f (first 10) -> %.4f (last 10); export: %s",
            len(losses), statistics.fmean(head) if head else 0.0,
            statistics.fmean(tail) if tail else 0.0, self.final_export,
        )  # fmt: skip
