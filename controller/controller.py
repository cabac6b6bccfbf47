"""The controller process: workers, the journal, versions, checkpoint and export orders.

It is the only writer of run state. Each pass of its loop: handle what came back (results,
worker events), check heartbeats, let the plan of the run's algorithm (controller.grpo,
controller.sft) hand out work and send a batch when the policy is idle, and commit the pass's
writes with the state they lead to (controller.journal); then block on the results and events
streams together until the next message lands (no polling: the block time is a safety net for
the heartbeat checks, and every write of a pass is committed before the wait). It never imports torch. The
trackers of `[logging] logger` (wandb, TensorBoard) run in a thread of it that follows the
files the journal mirrors (controller.trackers).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from controller import journal, trackers
from controller.grpo import GRPOPlan
from controller.plan import GROUP, Plan, Run, RunFailed
from controller.scheduler import PromptQueue
from controller.sft import SFTPlan
from controller.state import JOURNALED, ControllerState, carried, state_from_json, state_to_json
from gantry.comm.protocol import (
    Checkpoint,
    CheckpointSaved,
    Export,
    ExportDone,
    Register,
    StepDone,
    Stop,
    UploadDone,
    WorkerFailed,
)
from gantry.comm.transport import ControlPlane, Delivery
from gantry.config import GantryConfig
from gantry.run import checkpoints
from gantry.run.deadline import lapsed_or_overdue
from gantry.run.runtime import HEARTBEAT_TTL_S, RunInfo, groups_per_step, planned_steps

__all__ = ["GROUP", "Controller", "RunFailed"]
log = logging.getLogger("gantry.controller")
WORKER_START_TIMEOUT_S = 900.0
HEARTBEAT_CHECK_S = 5.0
# Messages wake the loop as they land; this only bounds the time between heartbeat checks.
READ_BLOCK_MS = 1000


class Controller:
    def __init__(self, config: GantryConfig, info: RunInfo) -> None:
        plane = ControlPlane(info.redis_url)
        queue = PromptQueue(
            info.dataset_size,
            config.train.epoch,
            config.train.seed,
            shuffle=config.train.train_policy.dataloader_shuffle,
        )
        self.context = Run(
            config=config,
            info=info,
            plane=plane,
            out=journal.Outbox(plane, info.keys),
            queue=queue,
            total_steps=planned_steps(config, info.dataset_size),
            groups_per_step=groups_per_step(config),
        )
        self.context.state.run_id = info.run_id
        self.context.state.started_at = time.monotonic()
        sft = config.train.train_policy.type == "sft"
        self.plan: Plan = SFTPlan(self.context) if sft else GRPOPlan(self.context)
        self.policy_replicas = [str(i) for i in range(config.policy.parallelism.n_init_replicas)]
        self.metrics_path = self.context.run_dir / "metrics.jsonl"
        self.samples_path = self.context.run_dir / "samples.jsonl"
        self.context.out.mirror("metrics", self.metrics_path)
        self.context.out.mirror("samples", self.samples_path)
        try:  # wandb / TensorBoard: a thread that follows the two files (controller.trackers)
            self.trackers = trackers.open_trackers(config, self.context.run_dir)
        except trackers.TrackerError as exc:
            raise RunFailed(str(exc)) from None
        self._last_heartbeat_check = 0.0
        self._last_seen: dict[tuple[str, str], dict | None] = {}  # each worker's last heartbeat

    @property
    def state(self) -> ControllerState:
        return self.context.state

    # ---- lifecycle ------------------------------------------------------------------

    def run(self) -> int:
        if self.trackers is not None:
            log.info(trackers.describe(self.context.config, self.context.run_dir))
            self.trackers.start()
        try:
            return self._run()
        finally:  # also when the run fails: the trackers get what was committed
            if self.trackers is not None:
                self.trackers.close()

    def _run(self) -> int:
        run = self.context
        for stream in (run.keys.rollouts, run.keys.events):
            run.plane.ensure_group(stream, GROUP)
        snapshot = journal.load_state(run.plane, run.keys)
        if snapshot is None:
            self._start_fresh()
        else:
            self._recover(snapshot)
        if not self.state.started:
            self._wait_for_workers()
            self.state.started = True
            if self.state.version >= run.total_steps:  # resumed from the last step
                log.info(
                    "the checkpoint is at the last step (%d): exporting and stopping",
                    self.state.version,
                )
                self._order_export(self.state.version, final=True)
            self._commit()
        deliveries: list[Delivery] = []
        while True:
            for delivery in deliveries:
                self._handle(delivery)
            if not self.state.finished:
                self._check_heartbeats()
                self.plan.advance()
            # Before the wait: what this pass sent (a batch, prompts, a sync) goes out now.
            self._commit()
            if self.state.finished:
                break
            deliveries = run.plane.read_group(
                [run.keys.rollouts, run.keys.events], GROUP, GROUP, 256, READ_BLOCK_MS
            )
        self._write_result()
        return 0

    def _start_fresh(self) -> None:
        log.info("run %s: %s", self.context.info.run_id, self.plan.describe())
        self.state.metrics_base = journal.lines_in(self.metrics_path)
        self.state.samples_base = journal.lines_in(self.samples_path)
        if self.context.info.resume_from:
            self._resume(Path(self.context.info.resume_from))
            for value in self.state.rewards:
                self.context.out.append("rewards", value)
        self._commit()

    def _wait_for_workers(self) -> None:
        """Start once every policy replica and the workers the plan needs registered."""
        run = self.context
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        policy = {("policy", r) for r in self.policy_replicas}
        while not (policy <= self.state.registered and not self.plan.missing_workers()):
            if time.monotonic() > deadline:
                missing = sorted(policy - self.state.registered) + self.plan.missing_workers()
                raise RunFailed(
                    f"workers did not register in {WORKER_START_TIMEOUT_S:.0f}s: {missing}"
                )
            for delivery in run.plane.read_group([run.keys.events], GROUP, GROUP, 16, 500):
                self._handle(delivery)
            self._commit()
        log.info("starting with %s", sorted(self.state.registered))

    def _check_heartbeats(self) -> None:
        """A worker whose heartbeat lapsed (a process stopped as a whole: SIGSTOP, a lost
        node), or whose heartbeat says it is past the deadline of what it does (its own
        watchdog should have ended it: gantry.run.deadline), is lost: named with what it was
        doing. A rollout replica is dropped, a policy replica fails the run (it restarts)."""
        now = time.monotonic()
        if now - self._last_heartbeat_check < HEARTBEAT_CHECK_S:
            return
        self._last_heartbeat_check = now
        workers = sorted(self.state.registered)
        keys = [self.context.keys.heartbeat(role, replica) for role, replica in workers]
        values = self.context.plane.redis.mget(keys) if keys else []
        for worker, value in zip(workers, values, strict=True):
            self._last_seen.setdefault(worker, None)  # registered: it was up
            # One TTL past its deadline: after its own watchdog's turn, before the launcher's.
            why = lapsed_or_overdue(self._last_seen, worker, value, grace_s=HEARTBEAT_TTL_S)
            if not why:
                continue
            role, replica = worker
            if role == "policy":
                raise RunFailed(f"{role} replica {replica} {why}")
            self.plan.worker_lost(role, replica, why)

    # ---- the journal: surviving a controller restart ---------------------------------

    def _commit(self) -> None:
        self.context.out.commit(self._snapshot())
        if self.trackers is not None:
            self.trackers.wake()  # the mirrored files may have new committed lines

    def _snapshot(self) -> dict:
        """What a restarted controller needs besides the journal's lists and sets and the
        entries still pending in its consumer group."""
        self.state.queue = self.context.queue.state()
        self.plan.capture(self.state)
        return state_to_json(self.state, journaled=False)

    def _recover(self, snapshot: dict) -> None:
        """Carry on from the last committed pass of the controller before this one."""
        run = self.context
        state = run.state = state_from_json(snapshot)
        state.controller_restarts += 1
        for name in JOURNALED:
            setattr(state, name, journal.load_list(run.plane, run.keys, name))
        journal.catch_up_mirror(
            run.plane, run.keys, "metrics", self.metrics_path, state.metrics_base
        )
        journal.catch_up_mirror(
            run.plane, run.keys, "samples", self.samples_path, state.samples_base
        )
        run.queue.restore(state.queue)
        pending = journal.pending_deliveries(
            run.plane, [run.keys.rollouts, run.keys.events], GROUP, GROUP
        )
        again = self.plan.restore(state, pending)
        log.warning(
            "controller restarted (%d time(s)): carrying on at step %d, %d result(s) buffered, "
            "%d message(s) to handle again",
            state.controller_restarts, state.version, len(pending) - len(again), len(again),
        )  # fmt: skip
        for delivery in again:
            self._handle(delivery)
        self._commit()

    # ---- incoming -------------------------------------------------------------------

    def _handle(self, delivery: Delivery) -> None:
        if self.plan.handle(delivery):
            return
        message = delivery.message
        self.context.out.ack(delivery.stream, GROUP, [delivery.entry_id])
        if isinstance(message, Register):
            self.state.registered.add((message.role, message.replica))
            log.info(
                "%s replica %s registered (pid %d)", message.role, message.replica, message.pid
            )
        elif isinstance(message, StepDone):
            self._on_step_done(message)
        elif isinstance(message, ExportDone):
            self._on_export_done(message)
        elif isinstance(message, CheckpointSaved):
            self._on_checkpoint_saved(message)
        elif isinstance(message, UploadDone):
            self._on_upload_done(message)
        elif isinstance(message, WorkerFailed):
            raise RunFailed(f"{message.role} replica {message.replica} failed: {message.error}")

    def _on_step_done(self, done: StepDone) -> None:
        state = self.state
        batch, state.in_flight = state.in_flight, None
        state.version = done.step
        self.plan.record(done, batch)
        ckpt = self.context.config.train.ckpt
        final = done.step >= self.context.total_steps
        saving = ckpt.enable_checkpoint and (final or done.step % ckpt.save_freq == 0)
        if saving:
            self._order_checkpoint(done.step)
        self.plan.weights_ready(done.step, final)
        if final:
            self._order_export(done.step, final=True)
        elif saving and ckpt.export_safetensors:
            self._order_export(done.step, final=False)

    def _order_export(self, step: int, final: bool) -> None:
        path = self.context.run_dir / "export" / ("final" if final else f"step_{step}")
        message = Export(step=step, path=str(path), final=final)
        self.context.out.send(self.context.keys.policy_commands, message)

    def _on_export_done(self, done: ExportDone) -> None:
        log.info("exported step %d to %s", done.step, done.path)
        if not done.final:
            return
        self.state.final_export = done.path
        self.context.out.send(self.context.keys.policy_commands, Stop())
        for replica in self.plan.rollout_replicas():
            self.context.out.send(self.context.keys.commands("rollout", replica), Stop())
        self.state.finished = True

    def _on_upload_done(self, done: UploadDone) -> None:
        self.state.uploads.append(done.model_dump(exclude={"type"}))
        if done.ok:
            log.info("uploaded %s to %s", done.name, done.destination)
        else:
            log.error("upload of %s to %s failed: %s", done.name, done.destination, done.error)

    # ---- checkpoints ----------------------------------------------------------------

    def _order_checkpoint(self, step: int) -> None:
        """The policy saves its part; the controller's part is its state as of this step."""
        run = self.context
        path = checkpoints.step_dir(run.run_dir / checkpoints.CHECKPOINTS, step)
        self.plan.capture(self.state)
        # Prompts buffered or in flight are not trained yet: a resumed run hands them out again.
        queue = run.queue.state(self.plan.untrained())
        self.state.checkpoints[step] = carried(self.state, step, queue)
        run.out.send(run.keys.policy_commands, Checkpoint(step=step, path=str(path)))

    def _on_checkpoint_saved(self, saved: CheckpointSaved) -> None:
        path = Path(saved.path)
        state = self.state.checkpoints.pop(saved.step)
        checkpoints.write_json_atomic(path / "controller.json", state_to_json(state))
        checkpoints.mark_complete(path, saved.step)
        pruned = checkpoints.prune_step_dirs(
            path.parent, self.context.config.train.ckpt.max_keep, complete_only=True
        )
        log.info(
            "checkpoint step %d complete (%.1fs): %s%s", saved.step, saved.seconds, path,
            f"; pruned {', '.join(p.name for p in pruned)}" if pruned else "",
        )  # fmt: skip

    def _resume(self, checkpoint: Path) -> None:
        """Start a new run from the controller's part of a checkpoint (its progress)."""
        saved = state_from_json(json.loads((checkpoint / "controller.json").read_text()))
        state = self.state
        state.version = state.steps_sent = saved.version
        state.rewards = list(saved.rewards)
        state.buffer_stats.dropped_stale = saved.buffer_stats.dropped_stale
        state.buffer_stats.duplicates = saved.buffer_stats.duplicates
        state.truncated_samples = saved.truncated_samples
        self.context.queue.restore(saved.queue)
        self.plan.restore(state, [])
        log.info("resuming at step %d from %s", state.version, checkpoint)

    def _write_result(self) -> None:
        result = self.plan.result()
        (self.context.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        from gantry.watch.plot import PlotError, plot_run  # matplotlib: only at the run's end

        try:
            log.info("plots of the run: %s", plot_run(self.context.run_dir))
        except PlotError as exc:  # a run with no step to plot still has its result
            log.warning("no plot: %s", exc)
