"""The SFT plan of the controller: dataset order, steps, validation, what an SFT step records.

No rollout replicas: each step is `train_batch_per_replica x policy replicas` dataset indices
from the seeded per-epoch order (`PromptQueue`), sent as one `SFTBatch`; the policy ranks encode
and train on their shares. With `[validation] enable`, the policy computes the validation loss
every `freq` steps and after the last one (and before the first with `val_before_train`).
Checkpoints, exports, uploads and resume are the controller's, as for GRPO.
"""

from __future__ import annotations

import logging
import statistics
import time

from controller.plan import GROUP, Run, RunFailed
from controller.state import ControllerState, DatasetBatch
from gantry.comm.protocol import SFTBatch, SFTStepMetrics, StepDone, Validate, ValidationDone
from gantry.comm.transport import Delivery

log = logging.getLogger("gantry.controller")


class SFTPlan:
    def __init__(self, run: Run) -> None:
        self.run = run

    def describe(self) -> str:
        run = self.run
        shuffle = "shuffled" if run.queue.shuffle else "in order"
        return (
            f"SFT, {run.total_steps} steps of {run.groups_per_step} samples "
            f"({run.info.dataset_size} samples x {run.config.train.epoch} epoch(s), {shuffle})"
        )

    def missing_workers(self) -> list[tuple[str, str]]:
        """The policy reads the dataset itself: it is the only worker."""
        return []

    def rollout_replicas(self) -> list[str]:
        """An SFT run starts none."""
        return []

    def worker_lost(self, role: str, replica: str, why: str) -> None:
        """An SFT run has no worker besides the policy to do without."""
        raise RunFailed(f"{role} replica {replica} {why}")

    # ---- each pass ------------------------------------------------------------------------

    def advance(self) -> None:
        """The next step's dataset indices once the policy is idle (the policy reads the
        samples itself: nothing else to hand out)."""
        run, state = self.run, self.run.state
        if not run.policy_idle():
            return
        tasks = [run.queue.next() for _ in range(run.groups_per_step)]
        if any(task is None for task in tasks):  # planned_steps counts full batches only
            raise RuntimeError("the dataset order ran out before the planned steps")
        validation = run.config.validation
        if state.steps_sent == 0 and validation.enable and validation.val_before_train:
            # Sent with the first batch, in the same pass: exactly once, even across restarts.
            run.out.send(run.keys.policy_commands, Validate(step=0))
        state.steps_sent += 1
        last = state.steps_sent >= run.total_steps
        following = [] if last else run.queue.peek(run.groups_per_step)
        batch = SFTBatch(
            step=state.steps_sent, indices=[t.index for t in tasks], next_indices=following
        )
        run.out.send(run.keys.policy_commands, batch)
        state.in_flight = DatasetBatch(sent=time.monotonic(), epoch=tasks[-1].epoch)

    def handle(self, delivery: Delivery) -> bool:
        if not isinstance(delivery.message, ValidationDone):
            return False
        self.run.out.ack(delivery.stream, GROUP, [delivery.entry_id])
        self._on_validation(delivery.message)
        return True

    def _on_validation(self, done: ValidationDone) -> None:
        metrics = done.metrics
        record = {"step": done.step, **metrics.model_dump()}
        self.run.remember("validations", record)
        self.run.out.append("metrics", {"validation": True, **record})
        log.info(
            "validation after step %d | loss %.4f | %d tokens of %d samples in %.1fs",
            done.step, metrics.val_loss, metrics.val_tokens, metrics.val_samples,
            metrics.val_seconds,
        )  # fmt: skip

    # ---- steps ----------------------------------------------------------------------------

    def weights_ready(self, step: int, final: bool) -> None:
        """Measure the validation loss on them when it is due (ordered before the export: a
        final export ends the run)."""
        validation = self.run.config.validation
        if validation.enable and (final or step % validation.freq == 0):
            self.run.out.send(self.run.keys.policy_commands, Validate(step=step))

    def record(self, done: StepDone, batch: DatasetBatch) -> None:
        run, state, metrics = self.run, self.run.state, done.metrics
        if not isinstance(metrics, SFTStepMetrics):
            raise RunFailed(f"an SFT run got step metrics of another kind: {metrics!r}")
        record = {
            "step": done.step,
            "epoch": batch.epoch,
            "elapsed_s": time.monotonic() - state.started_at,
            **metrics.model_dump(),
        }
        run.remember("rewards", metrics.loss)  # what a resumed run carries on
        run.remember("tokens_per_s", metrics.tokens_per_s)
        truncated = int(metrics.truncated_samples)
        if truncated and not state.truncated_samples:
            log.warning(
                "step %d: %d conversation(s) longer than policy.model_max_length = %d were cut; "
                "their tail is not trained (raise it to keep them whole; result.json counts "
                "them all)",
                done.step, truncated, run.config.policy.model_max_length,
            )  # fmt: skip
        state.truncated_samples += truncated
        run.out.append("metrics", record)
        if run.logs_step(done.step):
            log.info(
                "step %d/%d | epoch %d | loss %.4f | %.0f tokens/s | lr %.2e | grad norm %.3f",
                done.step, run.total_steps, batch.epoch + 1, metrics.loss,
                metrics.tokens_per_s, metrics.lr, metrics.grad_norm,
            )  # fmt: skip

    # ---- state ----------------------------------------------------------------------------

    def untrained(self) -> list[str]:
        """None: a batch is taken from the queue as it is sent, and trained before the
        checkpoint of its step is ordered."""
        return []

    def capture(self, state: ControllerState) -> None:
        """The plan keeps all it has in `state` itself (its counters and lists)."""

    def restore(self, state: ControllerState, pending: list[Delivery]) -> list[Delivery]:
        """Nothing is held back from the pending deliveries: every one is handled again."""
        return pending

    def result(self) -> dict:
        state = self.run.state
        losses = state.rewards  # restored ones included after a resume
        head, tail = losses[:10], losses[-10:]
        result = {
            "type": "sft",
            "steps": len(losses),
            "loss_first_10": statistics.fmean(head) if head else None,
            "loss_last_10": statistics.fmean(tail) if tail else None,
            "tokens_per_s": statistics.fmean(state.tokens_per_s) if state.tokens_per_s else 0.0,
            "val_loss": state.validations[-1]["val_loss"] if state.validations else None,
            "truncated_samples": state.truncated_samples,
            "validations": state.validations,
            "final_export": state.final_export,
            "resumed_from": self.run.info.resume_from or None,
            "controller_restarts": state.controller_restarts,
            "uploads": state.uploads,
            "seconds": time.monotonic() - state.started_at,
        }
        log.info(
            "done: %d steps, loss %.4f (first 10) -> %.4f (last 10); export: %s",
            len(losses), statistics.fmean(head) if head else 0.0,
            statistics.fmean(tail) if tail else 0.0, state.final_export,
        )  # fmt: skip
        return result
