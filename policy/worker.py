"""The policy worker loop of one rank: train on the batches the controller sends, sync weights,
save checkpoints, export and upload.

Every rank of the policy job (all replicas) reads the same command stream in order and runs
each command together with the others: TrainBatch, SyncWeights, Checkpoint and Export are
collectives over the job's mesh. Rank 0 speaks for the job: it publishes the weight manifest,
reports StepDone / CheckpointSaved / ExportDone and runs the uploads in the background; the
ranks of the first replica send the weights to the rollout replicas, each its own shards. The local
rank 0 of each replica registers it and keeps its heartbeat.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist

from gantry.comm import sync_groups
from gantry.comm.protocol import (
    Checkpoint,
    CheckpointSaved,
    Export,
    ExportDone,
    GRPOStepMetrics,
    Register,
    SFTBatch,
    SFTStepMetrics,
    StepDone,
    Stop,
    SyncWeights,
    TrainBatch,
    UploadDone,
    Validate,
    ValidationDone,
    ValidationMetrics,
)
from gantry.comm.sync_status import SyncCheckIns
from gantry.comm.transport import ControlPlane, Latencies
from gantry.comm.weights import SyncCancelled
from gantry.config import GantryConfig
from gantry.data.plugin import load_dataset_script
from gantry.launch.placement import rollout_dtype
from gantry.models.loading import is_vision_language
from gantry.run.activity import Activity
from gantry.run.checkpoints import prune_step_dirs, step_of
from gantry.run.deadline import Deadlines, Units, Watchdog, exit_on_thread_error
from gantry.run.runtime import Heartbeat, RunInfo, host_name, planned_steps, report_failure
from policy.checkpoint import PolicyCheckpointer
from policy.export import export_hf
from policy.parallel import ParallelDims, build_mesh, init_distributed
from policy.sft import SFTTrainer
from policy.step_metrics import idle_fraction, sync_metrics
from policy.trainer import GRPOTrainer
from policy.upload import Uploader
from policy.weight_sync import PolicySender

log = logging.getLogger("gantry.policy")
CALLED_OFF_GRACE_S = 30.0  # after a failed transfer, how long to wait to hear why
FINAL_UPLOAD_TIMEOUT_S = 3600.0


def parallel_dims(config: GantryConfig) -> ParallelDims:
    parallel = config.policy.parallelism
    return ParallelDims(
        dp_replicate=parallel.n_init_replicas * parallel.dp_replicate_size,
        dp_shard=parallel.dp_shard_size,
    )


class PolicyWorker:
    def __init__(self, config: GantryConfig, info: RunInfo, replica: str) -> None:
        self.config, self.info, self.replica = config, info, replica
        self.keys = info.keys
        self.env = init_distributed()
        self.is_main = self.env.is_main
        mesh = build_mesh(parallel_dims(config), self.env.device)
        self.plane = ControlPlane(info.redis_url)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2 // local_world))
        total_steps = planned_steps(config, info.dataset_size)
        self.weights: PolicySender | None = None
        self.sync_error: Exception | None = None
        self.syncs_said = 0
        self.last_sync = None  # the SendStats of the latest sync this rank sent (metrics)
        self.latencies = Latencies()  # each command's, from its send to its handling
        if config.train.train_policy.type == "sft":
            self.trainer = self._sft_trainer(mesh, total_steps)
        else:
            self.trainer = GRPOTrainer(
                config, info.model_path, self.env, mesh, total_steps, self._vlm_samples()
            )
            dtype = rollout_dtype(config.rollout.dtype, info.model_path, torch.cuda.is_available())
            self.weights = PolicySender(
                self.trainer.weight_manifest_params(), mesh, dtype=dtype, is_store_host=self.is_main
            )
        self.checkpointer = PolicyCheckpointer(async_mode=config.train.ckpt.save_mode == "async")
        self.uploader = self._make_uploader() if self.is_main else None
        self.save_started: dict[int, float] = {}
        # What this rank does now (published with the heartbeat; idle time for the metrics).
        self.activity = Activity("policy", replica, rank=self.env.rank, host=host_name())
        # Each command's work has a deadline (gantry.run.deadline): a step, sync, save or
        # export that hangs (a peer's collective, a stuck file system) ends this rank, named,
        # and the run starts again; so does an error that ends any thread of this process.
        self.units = Units(
            self.activity,
            Watchdog(on_expiry=lambda text: self._fail(f"stuck: {text}")),
            Deadlines.from_config(config.fault_tolerance),
        )
        if info.resume_from:
            self._resume(Path(info.resume_from))

    def _fail(self, text: str) -> None:
        report_failure("policy", self.replica, self.info, text)

    def _vlm_samples(self):
        """A VLM's GRPO prompts carry images the policy loads from the dataset itself."""
        from transformers import AutoConfig

        if not is_vision_language(AutoConfig.from_pretrained(self.info.model_path)):
            return ()
        script = load_dataset_script(
            self.info.dataset_script,
            config=self.config,
            model_path=self.info.model_path,
            config_source=self.info.config_source or None,
        )
        return script.load_samples(self.config.custom)

    def _sft_trainer(self, mesh, total_steps: int) -> SFTTrainer:
        script = load_dataset_script(
            self.info.dataset_script,
            need_rewards=False,
            config=self.config,
            model_path=self.info.model_path,
            config_source=self.info.config_source or None,
        )
        custom = self.config.custom
        samples = script.load_samples(custom)
        val = script.load_val_samples(custom) if self.config.validation.enable else ()
        return SFTTrainer(
            self.config, self.info.model_path, self.env, mesh, total_steps, samples, val
        )

    def _make_uploader(self) -> Uploader | None:
        ckpt = self.config.train.ckpt
        return Uploader.from_settings(
            hf_repo=ckpt.hf_repo_name if ckpt.upload_hf else "",
            s3_mode=ckpt.upload_s3 or "",
            s3_bucket=ckpt.s3_bucket,
            s3_prefix=ckpt.s3_prefix,
            run_id=self.info.run_id,
            on_result=self._report_upload,
        )

    def _resume(self, checkpoint: Path) -> None:
        step, _extra = self.checkpointer.load(
            checkpoint / "policy",
            model=self.trainer.model,
            optimizer=self.trainer.optimizer,
            scheduler=self.trainer.scheduler,
        )
        log.info("resumed from %s at step %d", checkpoint, step)

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        self.thread_errors_end_us = exit_on_thread_error(self._fail)
        if self.weights is not None and self.is_main:
            self.plane.redis.set(self.keys.manifest, self.weights.manifest.to_json())
        if self.weights is not None:  # sync check-ins for `python -m gantry status`
            sync_groups.add_check_in_listener(SyncCheckIns(self.plane.redis, self.keys))
        heartbeat = None
        if self.env.local_rank == 0:
            heartbeat = Heartbeat(
                self.plane, self.keys.heartbeat("policy", self.replica), self.activity
            ).start()
            self.plane.send(
                self.keys.events,
                Register(role="policy", replica=self.replica, pid=os.getpid(), host=host_name()),
            )
        n_params = sum(p.numel() for p in self.trainer.model.parameters())
        log.info(
            "policy ready (%s): %d parameters, %d ranks%s",
            self.config.train.train_policy.type, n_params, self.env.world_size,
            f" ({self.weights.manifest.senders} send weights, in "
            f"{self.weights.manifest.entries[0].dtype})" if self.weights is not None else "",
        )  # fmt: skip
        # The first step's idle fraction counts from here, not from the model's loading.
        self.activity.set("idle", "waiting for a command")
        self.activity.take_totals()
        try:
            self._serve()
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            self.thread_errors_end_us()  # the orderly end: shutting down is not a failure
            self.trainer.close()
        self.checkpointer.close()
        dist.destroy_process_group()

    def _serve(self) -> None:
        # The read wakes as soon as a command lands; its block time is the safety net that
        # raises a failed background sync's error while no command comes (`_check_sync`).
        while True:
            deliveries = self.plane.read_commands(self.keys.policy_commands, block_ms=1000)
            # A background sync's error is raised here too, not only after the next command:
            # an idle policy (waiting for rollouts that the failed sync holds up) would
            # otherwise keep it stored while the run hangs.
            self._check_sync()
            for delivery in deliveries:
                command = delivery.message
                self.latencies.handled(delivery.entry_id)
                if isinstance(command, Stop):
                    log.info("stopping: %s", command.reason)
                    self.activity.set("stopping", command.reason)
                    self._check_sync(wait=True)
                    self._finish_checkpoints()
                    return
                self._handle(command)
                self._check_sync()
                # A collective: after each command, never in the idle wait, whose number of
                # turns differs between ranks.
                self._report_checkpoints()

    def _handle(self, command) -> None:
        # Each command's work is an activity state (heartbeat, idle fraction); the wait for
        # the next command is "idle".
        unit = self.units.run
        if isinstance(command, TrainBatch | SFTBatch):
            with unit("policy step", "training", f"step {command.step}", work=_work(command)):
                metrics = self._train(command)
            latencies = self.latencies.take()  # every rank: none keeps a growing list
            if self.is_main:
                done = StepDone(step=command.step, metrics=metrics, command_latency_ms=latencies)
                self.plane.send(self.keys.events, done)
        elif isinstance(command, Validate):
            with unit("validation", "validating", f"after step {command.step}"):
                validation = ValidationMetrics(**self.trainer.validate())
            if self.is_main:
                event = ValidationDone(step=command.step, metrics=validation)
                self.plane.send(self.keys.events, event)
        elif isinstance(command, SyncWeights):
            detail = f"weights v{command.version}"
            if self.config.rollout.weight_sync_in_background:
                # Here only the copy of the shards: the send overlaps training, within a
                # deadline of its own (`_send_weights`).
                with self.activity.doing("syncing", detail):
                    self._send_weights(command)
            else:  # the sync's own timeout (its check-in) plus the transfer's deadline
                with unit("weight sync", "syncing", detail, extra_s=command.plan.timeout_s):
                    self._send_weights(command)
        elif isinstance(command, Checkpoint):
            with unit("checkpoint", "checkpointing", f"step {command.step}"):
                self._save_checkpoint(command)
        elif isinstance(command, Export):
            self._export(command)
        else:
            raise TypeError(f"policy got an unexpected command: {command!r}")

    def _train(self, command: TrainBatch | SFTBatch) -> GRPOStepMetrics | SFTStepMetrics:
        """The step, and the metrics the worker adds to the trainer's. The trainers' metric
        dicts become typed messages here: a missing or an extra name fails the step rather
        than reaching metrics.jsonl."""
        if isinstance(command, TrainBatch):
            metrics = self.trainer.step(command.groups)
            metrics.update(sync_metrics(self.last_sync))
        else:
            metrics = self.trainer.step(command.indices, command.next_indices)
        # Since the previous step's end (this step included), in "training": now.
        metrics["policy_idle_fraction"] = idle_fraction(self.activity.take_totals())
        kind = GRPOStepMetrics if isinstance(command, TrainBatch) else SFTStepMetrics
        return kind(**metrics)

    # ---- weights, checkpoints, exports -------------------------------------------------

    def _send_weights(self, command: SyncWeights) -> None:
        called_off_key = self.keys.sync_called_off(command.plan.group, command.version)

        def called_off() -> bool:
            return bool(self.plane.redis.exists(called_off_key))

        if self.config.rollout.weight_sync_in_background:
            self.weights.wait()  # the previous one's deadline ends with it
            limit = self._background_deadline(command)
            started = time.monotonic()

            def done(stats, error: Exception | None) -> None:
                try:
                    self._sent(command, stats, error)
                    if error is None:
                        self.units.deadlines.record("weight sync", time.monotonic() - started)
                finally:
                    limit.close()

            self.weights.send_in_background(command.plan, command.version, called_off, done)
            return
        # A failed transfer raises SyncCancelled or torch.distributed's errors (RuntimeError),
        # a store that cannot be reached OSError / TimeoutError: reported below, and raised
        # unless the sync was called off. Anything else is a bug and propagates as is.
        try:
            stats = self.weights.send(command.plan, command.version, called_off)
        except (RuntimeError, OSError) as exc:
            self._sent(command, None, exc)
            self._check_sync()
            return
        self._sent(command, stats, None)

    def _background_deadline(self, command: SyncWeights) -> ExitStack:
        """The deadline of a sync sent from the sending thread (only senders have one: the
        others' `done` is never called), closed when that thread reports its end."""
        limit = ExitStack()
        if self.weights.is_sender:
            seconds, why = self.units.deadlines.seconds_for("weight sync")
            timeout = command.plan.timeout_s
            limit.enter_context(
                self.units.watchdog.limit(
                    seconds + timeout if seconds else 0.0,
                    lambda: f"weight sync v{command.version} (sent in the background)",
                    f"{why} + rollout.weight_sync_timeout {timeout:g} s",
                )
            )
        return limit

    def _sent(self, command: SyncWeights, stats, error: Exception | None) -> None:
        """The end of a sync (from the sending thread when in the background)."""
        if isinstance(error, SyncCancelled):  # a rollout replica died: the controller re-plans
            log.warning("%s", error)
        elif error is not None and self._called_off_soon(command):
            # A member died during the transfer itself: the controller calls the sync off once
            # it hears (from that replica's launcher, or its heartbeat). The receivers still
            # waiting in the broken broadcast are released through the store, and the
            # controller's next sync sends every weight again.
            self.weights.call_off(command.plan, command.version)
            log.warning(
                "weight sync v%d broke off, a member left the run: %s", command.version, error
            )
        elif error is not None:
            self.sync_error = error  # raised by the training thread at its next command
        elif stats is not None:
            self.last_sync = stats  # the next step's metrics report it
            if self.is_main:
                shown = sync_metrics(stats)
                # The first sync is said; the others are in the step metrics (weight_sync_*)
                # rather than one console line per step.
                level = logging.DEBUG if self.syncs_said else logging.INFO
                self.syncs_said += 1
                log.log(
                    level,
                    "sent weights v%d to %d rollout ranks: %.1f MB in %.3fs (%.2f GB/s from "
                    "this rank, %.0f%% of a plain broadcast), after %.3fs waiting for them",
                    command.version, command.plan.receiver_ranks, stats.bytes / 1e6,
                    stats.send_s, shown["weight_sync_gbps"],
                    100 * shown["weight_sync_efficiency"], stats.wait_s,
                )  # fmt: skip

    def _called_off_soon(self, command: SyncWeights) -> bool:
        key = self.keys.sync_called_off(command.plan.group, command.version)
        deadline = time.monotonic() + CALLED_OFF_GRACE_S
        while time.monotonic() < deadline:
            if self.plane.redis.exists(key):
                return True
            time.sleep(0.2)
        return False

    def _check_sync(self, wait: bool = False) -> None:
        # A background sync that ended raises here what its report itself raised (the
        # transfer's own error is `sync_error`): no stored error waits for the next sync.
        sending = getattr(self.weights, "sending", None)
        if self.weights is not None and (wait or (sending is not None and sending.done())):
            self.weights.wait()
        if self.sync_error is not None:
            error, self.sync_error = self.sync_error, None
            raise RuntimeError(f"weight sync failed: {error}") from error

    def _save_checkpoint(self, command: Checkpoint) -> None:
        trainer = self.trainer
        self.save_started[command.step] = time.perf_counter()
        self.checkpointer.save(
            Path(command.path) / "policy",
            model=trainer.model,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
            step=command.step,
            extra={"step": command.step},
        )

    def _report_checkpoints(self) -> None:
        """Tell the controller about every save now on disk on all ranks (a collective)."""
        self._announce(self.checkpointer.poll())

    def _finish_checkpoints(self) -> None:
        """Wait for the saves in flight (async: their writes), within the deadline of a write."""
        seconds, why = self.units.deadlines.seconds_for("checkpoint write")
        what = "waiting for the checkpoint writes in flight"
        with self.units.watchdog.limit(seconds, lambda: what, why):
            self._announce(self.checkpointer.wait())

    def _announce(self, saved_paths: list[Path]) -> None:
        for saved in saved_paths:  # each is a checkpoint's policy/ directory
            step = step_of(saved.parent)
            seconds = time.perf_counter() - self.save_started.pop(step)
            self.units.deadlines.record("checkpoint write", seconds)
            if self.is_main:
                event = CheckpointSaved(step=step, path=str(saved.parent), seconds=seconds)
                self.plane.send(self.keys.events, event)

    def _export(self, command: Export) -> None:
        if command.final:
            # The last checkpoint is reported before the run's end is: the controller marks
            # it complete before it stops the workers.
            with self.activity.doing("checkpointing", "the last writes", then="exporting"):
                self._finish_checkpoints()
        with self.units.run("export", "exporting", f"step {command.step}", then="exporting"):
            path = export_hf(
                self.trainer.model, self.info.model_path, command.path,
                lora_adapter=self.config.train.ckpt.export_lora_adapter,
            )  # fmt: skip
        with self.activity.doing("exporting", f"step {command.step}: pruning, uploads"):
            self._after_export(command, path)

    def _after_export(self, command: Export, path: Path) -> None:
        """Prune old exports, upload (the final one: wait for the uploads, which have a
        timeout of their own), and say the export is done."""
        if not self.is_main:
            return
        keep = self.config.train.ckpt.max_keep
        in_use = self.uploader.busy_paths() if self.uploader is not None else set()
        prune_step_dirs(path.parent, keep, complete_only=False, keep_paths=in_use)
        if self.uploader is not None:
            self.uploader.submit(path, name=path.name, final=command.final)
            if command.final:
                self.uploader.close(FINAL_UPLOAD_TIMEOUT_S)
        self.plane.send(
            self.keys.events, ExportDone(step=command.step, path=str(path), final=command.final)
        )

    def _report_upload(self, result) -> None:
        self.plane.send(
            self.keys.events,
            UploadDone(
                name=result.name,
                destination=result.destination,
                ok=result.ok,
                error=result.error or "",
            ),
        )


def _work(command: TrainBatch | SFTBatch) -> float:
    """A step's size for its deadline: a GRPO batch's tokens (prompts and completions, which
    grow over a run), an SFT step as one unit (batches of the same dataset's samples)."""
    if isinstance(command, SFTBatch):
        return 1.0
    return float(
        sum(len(g.prompt_token_ids) + len(s.token_ids) for g in command.groups for s in g.samples)
    )
