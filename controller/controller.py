"""The controller process: registry, prompt dispatch, batching, versions, sync and export orders.

It is the only writer of run state. Each loop: check heartbeats, dispatch prompts up to the
in-flight window, send a batch when the policy is idle and one is ready, then handle what came
back (rollout groups, worker events). It never imports torch.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from controller import journal
from controller.fleet import RolloutFleet
from controller.scheduler import PromptQueue, RolloutBuffer, task_of
from gantry.comm.protocol import (
    Checkpoint,
    CheckpointSaved,
    Export,
    ExportDone,
    Register,
    RolloutGroup,
    StepDone,
    Stop,
    SyncWeights,
    TrainBatch,
    UploadDone,
    WeightsSynced,
    WorkerFailed,
    prompt_id_parts,
)
from gantry.comm.transport import ControlPlane, Delivery
from gantry.config import GantryConfig
from gantry.launch.redis_server import free_port
from gantry.run import checkpoints
from gantry.run.runtime import RunInfo, groups_per_step, planned_steps

log = logging.getLogger("gantry.controller")
GROUP = "controller"
WORKER_START_TIMEOUT_S = 900.0
HEARTBEAT_CHECK_S = 5.0


class RunFailed(RuntimeError):
    pass


class Controller:
    def __init__(self, config: GantryConfig, info: RunInfo) -> None:
        self.config, self.info = config, info
        self.keys = info.keys
        self.plane = ControlPlane(info.redis_url)
        self.fleet = RolloutFleet(
            capacity=2 * config.rollout.batch_size,
            run_id=info.run_id,
            # The policy's rank 0 (on node 0) hosts the weight-sync store.
            host=info.head_host,
            port=free_port(),
            timeout_s=config.rollout.weight_sync_timeout,
        )
        self.n_rollout_replicas = config.rollout.parallelism.n_init_replicas
        self.policy_replicas = [str(i) for i in range(config.policy.parallelism.n_init_replicas)]
        self.groups_per_step = groups_per_step(config)
        self.total_steps = planned_steps(config, info.dataset_size)
        max_staleness = config.train.train_policy.allowed_outdated_steps
        self.queue = PromptQueue(
            info.dataset_size,
            config.train.epoch,
            config.train.seed,
            shuffle=config.train.train_policy.dataloader_shuffle,
        )
        self.buffer = RolloutBuffer(self.groups_per_step, max_staleness)
        self.run_dir = Path(info.run_dir)
        self.version = 0  # the policy's weights: steps done
        self.steps_sent = 0
        self.pending_batch: dict | None = None  # the batch the policy is training on
        self.registered: set[tuple[str, str]] = set()
        # Syncs ordered and not yet confirmed by every replica: (group, version) -> replicas.
        self.open_syncs: dict[tuple[str, int], set[str]] = {}
        self._fleet_empty_since: float | None = None
        self.rewards: list[float] = []
        self.uploads: list[dict] = []
        self.checkpoint_states: dict[int, dict] = {}  # ordered saves: the controller's part
        self.finished = False
        self.final_export = ""
        self._last_heartbeat_check = 0.0
        self._last_step_done: float | None = None
        self._started = time.monotonic()
        self.started = False  # every worker registered, training began
        self.controller_restarts = 0
        # Every write goes out with the state it leads to (controller.journal).
        self.out = journal.Outbox(self.plane, self.keys)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.metrics_base = 0  # records of an earlier attempt in metrics.jsonl
        self.out.mirror("metrics", self.metrics_path)

    # ---- lifecycle ------------------------------------------------------------------

    def run(self) -> int:
        for stream in (self.keys.rollouts, self.keys.events):
            self.plane.ensure_group(stream, GROUP)
        state = journal.load_state(self.plane, self.keys)
        if state is None:
            self._start_fresh()
        else:
            self._recover(state)
        if not self.started:
            self._wait_for_workers()
            self.started = True
            if self.version >= self.total_steps:  # resumed from the last step: nothing to train
                log.info(
                    "the checkpoint is at the last step (%d): exporting and stopping", self.version
                )
                self._order_export(self.version, final=True)
            self._commit()
        while not self.finished:
            self._check_heartbeats()
            self._check_fleet_not_empty()
            self._catch_up_joiners()
            self._dispatch()
            self._maybe_send_batch()
            for delivery in self.plane.read_group(
                [self.keys.rollouts, self.keys.events], GROUP, GROUP, count=256, block_ms=200
            ):
                self._handle(delivery)
            self._commit()
        self._write_result()
        return 0

    def _start_fresh(self) -> None:
        log.info("run %s: %s", self.info.run_id, self._plan())
        self.metrics_base = journal.lines_in(self.metrics_path)
        if self.info.resume_from:
            self._restore(Path(self.info.resume_from))
            for value in self.rewards:
                self.out.append("rewards", value)
        self._commit()

    # ---- the journal: surviving a controller restart ---------------------------------

    def _remember(self, name: str, values: list, value) -> None:
        values.append(value)
        self.out.append(name, value)

    def _commit(self) -> None:
        self.out.commit(self._snapshot())

    def _snapshot(self) -> dict:
        """What a restarted controller needs besides the journal's lists and sets and the
        entries still pending in its consumer group."""
        return {
            "version": self.version,
            "steps_sent": self.steps_sent,
            "pending_batch": self.pending_batch,
            "registered": sorted(self.registered),
            "open_syncs": [[g, v, sorted(w)] for (g, v), w in self.open_syncs.items()],
            "fleet_empty_since": self._fleet_empty_since,
            "uploads": self.uploads,
            "checkpoint_states": self.checkpoint_states,
            "finished": self.finished,
            "final_export": self.final_export,
            "last_step_done": self._last_step_done,
            "started_at": self._started,  # time.monotonic: the restart runs on the same node
            "started": self.started,
            "controller_restarts": self.controller_restarts,
            "metrics_base": self.metrics_base,
            "queue": self.queue.state(),
            "buffer": {"entries": self.buffer.entry_ids(), "stats": asdict(self.buffer.stats)},
            "fleet": self.fleet.state(),
        }

    def _recover(self, state: dict) -> None:
        """Carry on from the last committed pass of the controller before this one."""
        self.version, self.steps_sent = state["version"], state["steps_sent"]
        self.pending_batch = state["pending_batch"]
        self.registered = {tuple(member) for member in state["registered"]}
        self.open_syncs = {(g, v): set(w) for g, v, w in state["open_syncs"]}
        self._fleet_empty_since = state["fleet_empty_since"]
        self.uploads = state["uploads"]
        self.checkpoint_states = {int(k): v for k, v in state["checkpoint_states"].items()}
        self.finished, self.final_export = state["finished"], state["final_export"]
        self._last_step_done, self._started = state["last_step_done"], state["started_at"]
        self.started = state["started"]
        self.controller_restarts = state["controller_restarts"] + 1
        self.metrics_base = state["metrics_base"]
        self.queue.restore(state["queue"])
        self.fleet.restore(state["fleet"])
        self.rewards = journal.load_list(self.plane, self.keys, "rewards")
        journal.catch_up_mirror(
            self.plane, self.keys, "metrics", self.metrics_path, self.metrics_base
        )
        pending = journal.pending_deliveries(
            self.plane, [self.keys.rollouts, self.keys.events], GROUP, GROUP
        )
        buffered = set(state["buffer"]["entries"])
        groups = {d.entry_id: d.message for d in pending if d.entry_id in buffered}
        self.buffer.restore(
            [(groups[e], e) for e in state["buffer"]["entries"]],
            journal.load_set(self.plane, self.keys, "seen"),
            state["buffer"]["stats"],
        )
        log.warning(
            "controller restarted (%d time(s)): carrying on at step %d, %d result(s) buffered, "
            "%d message(s) to handle again",
            self.controller_restarts, self.version, len(groups), len(pending) - len(groups),
        )  # fmt: skip
        for delivery in pending:
            if delivery.entry_id not in buffered:
                self._handle(delivery)
        self._commit()

    def _plan(self) -> str:
        return (
            f"{self.total_steps} steps of {self.groups_per_step} prompts x "
            f"{self.config.rollout.n_generation} samples, max staleness {self.buffer.max_staleness}"
        )

    def _wait_for_workers(self) -> None:
        """Start once every policy replica and one rollout replica registered; other rollout
        replicas join when they are up."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        policy = {("policy", r) for r in self.policy_replicas}
        need_rollout = self.n_rollout_replicas > 0
        while not (policy <= self.registered and (self.fleet.replicas or not need_rollout)):
            if time.monotonic() > deadline:
                missing = sorted(policy - self.registered)
                if need_rollout and not self.fleet.replicas:
                    missing.append(("rollout", "any"))
                raise RunFailed(
                    f"workers did not register in {WORKER_START_TIMEOUT_S:.0f}s: {missing}"
                )
            for delivery in self.plane.read_group([self.keys.events], GROUP, GROUP, 16, 500):
                self._handle(delivery)
            self._commit()
        log.info("starting with %s", sorted(self.registered))

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat_check < HEARTBEAT_CHECK_S:
            return
        self._last_heartbeat_check = now
        for role, replica in sorted(self.registered):
            if self.plane.alive(self.keys.heartbeat(role, replica)):
                continue
            if role == "rollout":
                self._drop_rollout(replica, "stopped sending heartbeats")
            else:
                raise RunFailed(f"{role} replica {replica} stopped sending heartbeats")

    def _check_fleet_not_empty(self) -> None:
        """Training needs rollouts: with every replica gone, wait a bounded time for one."""
        if self.n_rollout_replicas == 0 or self.fleet.replicas:
            self._fleet_empty_since = None
            return
        now = time.monotonic()
        timeout = self.config.fault_tolerance.rollout_rejoin_timeout_s
        if self._fleet_empty_since is None:
            self._fleet_empty_since = now
            log.warning("no rollout replica left: waiting up to %.0fs for one to join", timeout)
        elif now - self._fleet_empty_since > timeout:
            raise RunFailed(
                f"no rollout replica for {timeout:.0f}s "
                "(fault_tolerance.rollout_rejoin_timeout_s): start one, or raise the timeout"
            )

    def _drop_rollout(self, name: str, why: str) -> None:
        """A rollout replica left: its prompts go back to the queue (the others generate
        them), a sync it was part of is called off, and the run goes on."""
        replica = self.fleet.drop(name, why)
        self.registered.discard(("rollout", name))
        for prompt_id in sorted(replica.in_flight, key=prompt_id_parts):
            self.queue.retry(task_of(prompt_id))
        # Prompts it never read; a process restarted under its name starts clean.
        self.out.delete(self.keys.prompts(name))
        self.out.send(self.keys.commands("rollout", name), Stop(reason=f"dropped: {why}"))
        for (group, version), waiting in list(self.open_syncs.items()):
            if name in waiting:
                self.out.set(self.keys.sync_called_off(group, version), b"1", ex=86400)
                self.fleet.sync_called_off(sorted(waiting - {name}))
                del self.open_syncs[(group, version)]
        log.warning(
            "rollout replica %s %s: dropped; %d prompt(s) it held go to the other replicas "
            "(%d left)",
            name, why, len(replica.in_flight), len(self.fleet.replicas),
        )  # fmt: skip

    # ---- prompts and batches --------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand out only prompts whose results can still be trained within the staleness bound.

        A prompt given now to a replica that was ordered to sync to version v is generated
        with weights of at least v, and lands in the batch of step
        `steps_sent + ceil((queued + 1) / G)`, which trains weights one version behind that
        step: so with that replica at most G * (v + max_staleness + 1 - steps_sent) prompts may
        be queued (buffered or in flight), and no more than the remaining steps need.
        """
        needed = (self.total_steps - self.steps_sent) * self.groups_per_step
        queued = len(self.fleet.in_flight) + len(self.buffer)
        budget = {
            name: min(
                (replica.version + self.buffer.max_staleness + 1 - self.steps_sent)
                * self.groups_per_step,
                needed,
            )
            - queued
            for name, replica in self.fleet.replicas.items()
        }
        picks = self.fleet.assign(max(budget.values(), default=0), budget)
        by_replica: dict[str, list] = {}
        for name in picks:
            task = self.queue.next()
            if task is None:
                break
            self.fleet.dispatched(name, task.prompt_id)
            by_replica.setdefault(name, []).append(task)
        for name, tasks in by_replica.items():
            self.out.send_many(self.keys.prompts(name), tasks)

    def _catch_up_joiners(self) -> None:
        """Send the current weights to replicas that hold older ones, while the policy is
        between steps (its weights are then exactly `version`)."""
        if self.pending_batch is not None or self.finished or self.version >= self.total_steps:
            return
        behind = self.fleet.behind(self.version)
        if behind:
            log.info("rollout replica(s) %s catch up to v%d", ", ".join(behind), self.version)
            self._order_sync(self.version, behind)

    def _maybe_send_batch(self) -> None:
        if self.pending_batch is not None or self.steps_sent >= self.total_steps:
            return
        batch, expired = self.buffer.take_batch(self.version)
        self._retry(expired)
        if not batch:
            return
        self.steps_sent += 1
        groups = [g for g, _ in batch]
        message = TrainBatch(step=self.steps_sent, groups=groups)
        self.out.ack(self.keys.rollouts, GROUP, [e for _, e in batch])
        self.out.send(self.keys.policy_commands, message)
        rewards = [s.reward for g in groups for s in g.samples]
        self.pending_batch = {
            "sent": time.monotonic(),
            "reward_mean": statistics.fmean(rewards),
            "samples": len(rewards),
            "staleness": [self.version - g.policy_version for g in groups],
            "prompt_ids": [g.prompt_id for g in groups],
        }

    def _retry(self, items: list[tuple[RolloutGroup, str]]) -> None:
        if not items:
            return
        self.out.ack(self.keys.rollouts, GROUP, [e for _, e in items])
        for group, _ in items:
            self.out.mark("seen", group.prompt_id, present=False)
            self.queue.retry(task_of(group.prompt_id))

    # ---- incoming -------------------------------------------------------------------

    def _handle(self, delivery: Delivery) -> None:
        message = delivery.message
        if isinstance(message, RolloutGroup):
            self.fleet.returned(message.replica, message.prompt_id, message.policy_version)
            outcome = self.buffer.add(message, delivery.entry_id, self.version)
            if outcome == "accepted":
                self.out.mark("seen", message.prompt_id)
            elif outcome == "stale":
                self._retry([(message, delivery.entry_id)])
            elif outcome == "duplicate":
                self.out.ack(delivery.stream, GROUP, [delivery.entry_id])
            return  # accepted groups are acknowledged when their batch is sent
        self.out.ack(delivery.stream, GROUP, [delivery.entry_id])
        if isinstance(message, Register):
            self._on_register(message)
        elif isinstance(message, StepDone):
            self._on_step_done(message)
        elif isinstance(message, ExportDone):
            self._on_export_done(message)
        elif isinstance(message, CheckpointSaved):
            self._on_checkpoint_saved(message)
        elif isinstance(message, UploadDone):
            self._on_upload_done(message)
        elif isinstance(message, WeightsSynced):
            self._on_weights_synced(message)
        elif isinstance(message, WorkerFailed):
            if message.role != "rollout":
                raise RunFailed(f"{message.role} replica {message.replica} failed: {message.error}")
            if message.replica in self.fleet.replicas:
                self._drop_rollout(message.replica, f"failed: {message.error}")

    def _on_weights_synced(self, message: WeightsSynced) -> None:
        log.debug(
            "rollout %s now at v%d (sync took %.3fs)",
            message.replica, message.version, message.seconds,
        )  # fmt: skip
        self.fleet.confirmed(message.replica, message.version)
        for key, waiting in list(self.open_syncs.items()):
            if key[1] == message.version:
                waiting.discard(message.replica)
                if not waiting:
                    del self.open_syncs[key]

    def _on_register(self, message: Register) -> None:
        if message.role == "rollout" and message.replica in self.fleet.replicas:
            # A new process under a known name: the old one died without being noticed.
            self._drop_rollout(message.replica, "was restarted")
        self.registered.add((message.role, message.replica))
        log.info("%s replica %s registered (pid %d)", message.role, message.replica, message.pid)
        if message.role == "rollout":
            self.fleet.register(
                message.replica, message.ranks, message.policy_version, self.version
            )

    def _on_step_done(self, done: StepDone) -> None:
        batch, self.pending_batch = self.pending_batch, None
        self.version = done.step
        self._record(done, batch)
        ckpt = self.config.train.ckpt
        final = done.step >= self.total_steps
        saving = ckpt.enable_checkpoint and (final or done.step % ckpt.save_freq == 0)
        if saving:
            self._order_checkpoint(done.step)
        if final:
            self._order_export(done.step, final=True)
            return
        if done.step % self.config.train.sync_weight_interval == 0:
            self._order_sync(done.step, sorted(self.fleet.replicas))
        if saving and ckpt.export_safetensors:
            self._order_export(done.step, final=False)

    def _order_sync(self, version: int, replicas: list[str]) -> None:
        """One broadcast from the policy reaches every rank of these replicas."""
        if not replicas:  # all gone: those that join later catch up
            return
        sync = SyncWeights(version=version, plan=self.fleet.plan(replicas))
        self.out.send(self.keys.policy_commands, sync)
        for replica in replicas:
            self.out.send(self.keys.commands("rollout", replica), sync)
        self.fleet.synced(replicas, version)
        self.open_syncs[(sync.plan.group, version)] = set(replicas)

    def _order_export(self, step: int, final: bool) -> None:
        path = self.run_dir / "export" / ("final" if final else f"step_{step}")
        self.out.send(self.keys.policy_commands, Export(step=step, path=str(path), final=final))

    # ---- checkpoints ----------------------------------------------------------------

    def _order_checkpoint(self, step: int) -> None:
        """The policy saves its part; the controller's part is its state as of this step."""
        path = checkpoints.step_dir(self.run_dir / checkpoints.CHECKPOINTS, step)
        self.checkpoint_states[step] = self._state(step)
        self.out.send(self.keys.policy_commands, Checkpoint(step=step, path=str(path)))

    def _state(self, step: int) -> dict:
        # Prompts buffered or in flight are not trained yet: a resumed run hands them out again.
        # A prompt re-queued from a dead replica can be both buffered and in flight again.
        pending = sorted(set(self.fleet.in_flight) | set(self.buffer.prompt_ids()))
        return {
            "step": step,
            "queue": self.queue.state(pending),
            "rewards": list(self.rewards),
            "dropped_stale": self.buffer.stats.dropped_stale,
            "duplicates": self.buffer.stats.duplicates,
            "run_id": self.info.run_id,
        }

    def _on_checkpoint_saved(self, saved: CheckpointSaved) -> None:
        path = Path(saved.path)
        checkpoints.write_json_atomic(
            path / "controller.json", self.checkpoint_states.pop(saved.step)
        )
        checkpoints.mark_complete(path, saved.step)
        pruned = checkpoints.prune_step_dirs(
            path.parent, self.config.train.ckpt.max_keep, complete_only=True
        )
        log.info(
            "checkpoint step %d complete (%.1fs): %s%s", saved.step, saved.seconds, path,
            f"; pruned {', '.join(p.name for p in pruned)}" if pruned else "",
        )  # fmt: skip

    def _restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / "controller.json").read_text())
        self.queue.restore(state["queue"])
        self.version = self.steps_sent = state["step"]
        self.rewards = list(state["rewards"])
        self.buffer.stats.dropped_stale = state["dropped_stale"]
        self.buffer.stats.duplicates = state["duplicates"]
        log.info("resuming at step %d from %s", self.version, checkpoint)

    def _on_upload_done(self, done: UploadDone) -> None:
        self.uploads.append(done.model_dump(exclude={"type"}))
        if done.ok:
            log.info("uploaded %s to %s", done.name, done.destination)
        else:
            log.error("upload of %s to %s failed: %s", done.name, done.destination, done.error)

    def _on_export_done(self, done: ExportDone) -> None:
        log.info("exported step %d to %s", done.step, done.path)
        if not done.final:
            return
        self.final_export = done.path
        self.out.send(self.keys.policy_commands, Stop())
        # Also those started but not registered yet, which stop when they are up.
        launched = {str(i) for i in range(self.n_rollout_replicas)}
        for replica in sorted(launched | set(self.fleet.replicas)):
            self.out.send(self.keys.commands("rollout", replica), Stop())
        self.finished = True

    def _record(self, done: StepDone, batch: dict) -> None:
        now = time.monotonic()
        elapsed = now - (self._last_step_done or batch["sent"])
        self._last_step_done = now
        staleness = batch["staleness"]
        record = {
            "step": done.step,
            "reward_mean": batch["reward_mean"],
            "samples_per_s": batch["samples"] / max(elapsed, 1e-9),
            "staleness_mean": statistics.fmean(staleness),
            "staleness_max": max(staleness),
            "dropped_stale": self.buffer.stats.dropped_stale,
            "elapsed_s": time.monotonic() - self._started,
            **done.metrics,
            "prompt_ids": batch["prompt_ids"],  # what this step trained on: an audit trail
        }
        self._remember("rewards", self.rewards, batch["reward_mean"])
        self.out.append("metrics", record)
        if done.step % self.config.logging.log_interval == 0 or done.step == self.total_steps:
            log.info(
                "step %d/%d | reward %.3f | loss %.4f | kl %.4f | %.1f samples/s | "
                "staleness %.2f (max %d) | dropped %d",
                done.step, self.total_steps, record["reward_mean"], record["loss"],
                record["kl_ref"] if self.config.train.train_policy.kl_beta > 0
                else record["kl_behaviour"],
                record["samples_per_s"], record["staleness_mean"], record["staleness_max"],
                record["dropped_stale"],
            )  # fmt: skip

    def _write_result_json(self, result: dict) -> None:
        (self.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")

    def _write_result(self) -> None:
        head, tail = self.rewards[:10], self.rewards[-10:]
        result = {
            "steps": len(self.rewards),
            "reward_mean_first_10": statistics.fmean(head) if head else None,
            "reward_mean_last_10": statistics.fmean(tail) if tail else None,
            "dropped_stale": self.buffer.stats.dropped_stale,
            "duplicates": self.buffer.stats.duplicates,
            "final_export": self.final_export,
            "resumed_from": self.info.resume_from or None,
            "uploads": self.uploads,
            "rollout_replicas": self.fleet.stats(),
            "departed_rollout_replicas": self.fleet.departed,
            "controller_restarts": self.controller_restarts,
            "seconds": time.monotonic() - self._started,
        }
        self._write_result_json(result)
        log.info(
            "done: %d steps, reward %.3f (first 10) -> %.3f (last 10); export: %s",
            result["steps"], result["reward_mean_first_10"] or 0.0,
            result["reward_mean_last_10"] or 0.0, self.final_export,
        )  # fmt: skip
