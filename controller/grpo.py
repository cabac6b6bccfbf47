"""The GRPO plan of the controller: prompts to rollout replicas, their results into batches,
weight syncs, and what a GRPO step records.

Prompts go out only while their results can still be trained within the staleness bound
(controller.fleet); results wait in the buffer (controller.scheduler) until a batch is full,
and are acknowledged on their stream when their batch is sent. A rollout replica that dies is
dropped and its prompts go to the others; with none left the run waits a bounded time for one.
"""

from __future__ import annotations

import logging
import statistics
import time

from controller import grpo_metrics, journal
from controller.fleet import RolloutFleet
from controller.plan import GROUP, Run, RunFailed
from controller.scheduler import RolloutBuffer, task_of
from controller.state import ControllerState, RolloutBatch
from gantry.comm.protocol import (
    GRPOStepMetrics,
    Register,
    RolloutGroup,
    StepDone,
    Stop,
    SyncWeights,
    TrainBatch,
    WeightsSynced,
    WorkerFailed,
    prompt_id_parts,
)
from gantry.comm.transport import Delivery
from gantry.launch.redis_server import free_port

log = logging.getLogger("gantry.controller")
# DAPO's queue: passes over the dataset it may draw from to fill the planned steps.
DAPO_EPOCHS = 1_000_000


class GRPOPlan:
    def __init__(self, run: Run) -> None:
        config = run.config
        self.run = run
        self.fleet = RolloutFleet(
            capacity=2 * config.rollout.batch_size,
            run_id=run.info.run_id,
            # The policy's rank 0 (on node 0) hosts the weight-sync store.
            host=run.info.head_host,
            port=free_port(),
            timeout_s=config.rollout.weight_sync_timeout,
        )
        self.n_rollout_replicas = config.rollout.parallelism.n_init_replicas
        policy = config.train.train_policy
        self.dapo = policy.variant == "dapo"
        self.max_retry = policy.max_retry_for_on_policy
        self.buffer = RolloutBuffer(
            run.groups_per_step, policy.allowed_outdated_steps, self.dapo,
            policy.filter_reward_metric,
        )  # fmt: skip
        if self.dapo:
            # Dropped prompts are replaced by the next ones, from further passes over the
            # dataset when needed: the run trains its planned steps, each batch full.
            run.queue.epochs = max(run.queue.epochs, DAPO_EPOCHS)
        self.clock = grpo_metrics.StepClock()
        self.cost = grpo_metrics.ControlCost()  # the control plane's own, per step

    def describe(self) -> str:
        return (
            f"{self.run.total_steps} steps of {self.run.groups_per_step} prompts x "
            f"{self.run.config.rollout.n_generation} samples, "
            f"max staleness {self.buffer.max_staleness}"
        )

    def missing_workers(self) -> list[tuple[str, str]]:
        """Training starts with one rollout replica; the others join when they are up."""
        if self.n_rollout_replicas > 0 and not self.fleet.replicas:
            return [("rollout", "any")]
        return []

    def rollout_replicas(self) -> list[str]:
        # Also those started but not registered yet, which stop when they are up.
        launched = {str(i) for i in range(self.n_rollout_replicas)}
        return sorted(launched | set(self.fleet.replicas))

    # ---- each pass ------------------------------------------------------------------------

    def advance(self) -> None:
        self._check_fleet_not_empty()
        self._catch_up_joiners()
        self._dispatch()
        if self.run.policy_idle():
            self._send_batch()

    def _check_fleet_not_empty(self) -> None:
        """Training needs rollouts: with every replica gone, wait a bounded time for one."""
        state = self.run.state
        if self.n_rollout_replicas == 0 or self.fleet.replicas:
            state.fleet_empty_since = None
            return
        now = time.monotonic()
        timeout = self.run.config.fault_tolerance.rollout_rejoin_timeout_s
        if state.fleet_empty_since is None:
            state.fleet_empty_since = now
            log.warning("no rollout replica left: waiting up to %.0fs for one to join", timeout)
        elif now - state.fleet_empty_since > timeout:
            raise RunFailed(
                f"no rollout replica for {timeout:.0f}s "
                "(fault_tolerance.rollout_rejoin_timeout_s): start one, or raise the timeout"
            )

    def _catch_up_joiners(self) -> None:
        """Send the current weights to replicas that hold older ones than the last scheduled
        sync (joiners, restarted replicas), while the policy is between steps (its weights
        are then exactly `version`). Replicas that have the last scheduled sync's weights wait
        for the next one: train.sync_weight_interval holds for them."""
        state = self.run.state
        if state.in_flight is not None or state.finished or state.version >= self.run.total_steps:
            return
        interval = self.run.config.train.sync_weight_interval
        behind = self.fleet.behind(state.version - state.version % interval)
        if behind:
            log.info("rollout replica(s) %s catch up to v%d", ", ".join(behind), state.version)
            self._order_sync(state.version, behind)

    def _dispatch(self) -> None:
        """Hand out only prompts whose results can still be trained within the staleness bound.

        A prompt given now to a replica that was ordered to sync to version v is generated
        with weights of at least v, and lands in the batch of step
        `steps_sent + ceil((queued + 1) / G)`, which trains weights one version behind that
        step: so with that replica at most G * (v + max_staleness + 1 - steps_sent) prompts may
        be queued (buffered or in flight), and no more than the remaining steps need.
        """
        run, steps_sent = self.run, self.run.state.steps_sent
        needed = (run.total_steps - steps_sent) * run.groups_per_step
        queued = len(self.fleet.in_flight) + len(self.buffer)
        budget = {
            name: min(
                (replica.version + self.buffer.max_staleness + 1 - steps_sent)
                * run.groups_per_step,
                needed,
            )
            - queued
            for name, replica in self.fleet.replicas.items()
        }
        picks = self.fleet.assign(max(budget.values(), default=0), budget)
        by_replica: dict[str, list] = {}
        for name in picks:
            task = run.queue.next()
            if task is None:
                break
            self.fleet.dispatched(name, task.prompt_id)
            by_replica.setdefault(name, []).append(task)
        for name, tasks in by_replica.items():
            run.out.send_many(run.keys.prompts(name), tasks)

    def _send_batch(self) -> None:
        run, state = self.run, self.run.state
        batch, expired = self.buffer.take_batch(state.version)
        self._retry(expired)
        if not batch:
            return
        state.steps_sent += 1
        groups = [g for g, _ in batch]
        run.out.ack(run.keys.rollouts, GROUP, [e for _, e in batch])
        step = state.steps_sent
        # The texts go along: leaving them out costs more than the bytes they take.
        run.out.send(run.keys.policy_commands, TrainBatch(step=step, groups=groups))
        staleness = [state.version - g.policy_version for g in groups]
        metrics = grpo_metrics.rollout_metrics(groups, staleness, self.buffer.max_staleness)
        if self.dapo:
            dropped = self.buffer.stats.dropped_since_batch
            metrics.update(grpo_metrics.dynamic_sampling_metrics(len(groups), dropped))
            self.buffer.stats.dropped_since_batch = []
        state.in_flight = RolloutBatch(
            sent=time.monotonic(),
            reward_mean=metrics["reward_mean"],
            samples=sum(len(g.samples) for g in groups),
            staleness=staleness,
            prompt_ids=[g.prompt_id for g in groups],
            metrics=metrics,
        )
        if run.logs_step(step):  # sent with the batch: a restart cannot log them twice
            rows = grpo_metrics.sample_rows(groups[: grpo_metrics.SAMPLES_PER_LOG])
            run.out.append("samples", {"step": step, "samples": rows})

    def _check_draw_bound(self) -> None:
        """DAPO: a step may draw max_retry_for_on_policy x its groups (<= 0: a pass over the
        dataset, so that a task where every group is equal stops rather than loops)."""
        run, size = self.run, self.run.groups_per_step
        dropped = len(self.buffer.stats.dropped_since_batch)
        bound = self.max_retry * size if self.max_retry > 0 else None
        limit = bound - size if bound is not None else max(run.queue.dataset_size, size)
        if dropped <= limit:
            return
        step = run.state.steps_sent + 1
        how = (
            f"train.train_policy.max_retry_for_on_policy = {self.max_retry} allows {bound} "
            "per step: raise it (<= 0: no bound)"
            if bound is not None
            else "a whole pass over the dataset gave no group with different rewards"
        )
        raise RunFailed(
            f"DAPO dynamic sampling: step {step} drew {dropped + len(self.buffer)} groups and "
            f"dropped {dropped} whose completions all got the same reward, and its batch of "
            f"{size} is not full; {how}. Check the reward functions, or use variant = 'grpo'"
        )

    def _retry(self, items: list[tuple[RolloutGroup, str]]) -> None:
        if not items:
            return
        self.run.out.ack(self.run.keys.rollouts, GROUP, [e for _, e in items])
        for group, _ in items:
            self.run.out.mark("seen", group.prompt_id, present=False)
            self.run.queue.retry(task_of(group.prompt_id))

    # ---- incoming -------------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> bool:
        # Every message the controller reads comes here first: its handling starts now.
        self.cost.handled(delivery)
        message = delivery.message
        if isinstance(message, RolloutGroup):
            self._on_rollout(message, delivery)
            return True
        rollout_event = isinstance(message, Register | WorkerFailed) and message.role == "rollout"
        if not (rollout_event or isinstance(message, WeightsSynced)):
            return False
        self.run.out.ack(delivery.stream, GROUP, [delivery.entry_id])
        if isinstance(message, Register):
            self._on_register(message)
        elif isinstance(message, WorkerFailed):
            if message.replica in self.fleet.replicas:
                self._drop_rollout(message.replica, f"failed: {message.error}")
        else:
            self._on_weights_synced(message)
        return True

    def _on_rollout(self, message: RolloutGroup, delivery: Delivery) -> None:
        self.clock.received(message)
        self.fleet.returned(message.replica, message.prompt_id, message.policy_version)
        outcome = self.buffer.add(message, delivery.entry_id, self.run.state.version)
        if outcome == "accepted":  # acknowledged when its batch is sent
            self.run.out.mark("seen", message.prompt_id)
        elif outcome == "dropped":  # DAPO: visited, never trained nor retried
            self.run.out.mark("seen", message.prompt_id)
            self.run.out.ack(delivery.stream, GROUP, [delivery.entry_id])
            self._check_draw_bound()
        elif outcome == "stale":
            self._retry([(message, delivery.entry_id)])
        elif outcome == "duplicate":
            self.run.out.ack(delivery.stream, GROUP, [delivery.entry_id])

    def _on_register(self, message: Register) -> None:
        if message.replica in self.fleet.replicas:
            # A new process under a known name: the old one died without being noticed.
            self._drop_rollout(message.replica, "was restarted")
        self.run.state.registered.add((message.role, message.replica))
        log.info("%s replica %s registered (pid %d)", message.role, message.replica, message.pid)
        self.fleet.register(
            message.replica, message.ranks, message.policy_version, self.run.state.version
        )

    def _on_weights_synced(self, message: WeightsSynced) -> None:
        log.debug(
            "rollout %s now at v%d (sync took %.3fs)",
            message.replica, message.version, message.seconds,
        )  # fmt: skip
        self.fleet.confirmed(message.replica, message.version)
        self.cost.sync_orders.append(message.order_latency_ms)
        open_syncs = self.run.state.open_syncs
        for key, waiting in list(open_syncs.items()):
            if key[1] == message.version:
                waiting.discard(message.replica)
                if not waiting:
                    del open_syncs[key]

    def worker_lost(self, role: str, replica: str, why: str) -> None:
        if role != "rollout":
            raise RunFailed(f"{role} replica {replica} {why}")
        self._drop_rollout(replica, why)

    def _drop_rollout(self, name: str, why: str) -> None:
        """A rollout replica left: its prompts go back to the queue (the others generate
        them), a sync it was part of is called off, and the run goes on."""
        run, state = self.run, self.run.state
        replica = self.fleet.drop(name, why)
        state.registered.discard(("rollout", name))
        for prompt_id in sorted(replica.in_flight, key=prompt_id_parts):
            run.queue.retry(task_of(prompt_id))
        # Prompts it never read; a process restarted under its name starts clean.
        run.out.delete(run.keys.prompts(name))
        run.out.send(run.keys.commands("rollout", name), Stop(reason=f"dropped: {why}"))
        for (group, version), waiting in list(state.open_syncs.items()):
            if name in waiting:
                run.out.set(run.keys.sync_called_off(group, version), b"1", ex=86400)
                self.fleet.sync_called_off(sorted(waiting - {name}))
                del state.open_syncs[(group, version)]
        log.warning(
            "rollout replica %s %s: dropped; %d prompt(s) it held go to the other replicas "
            "(%d left)",
            name, why, len(replica.in_flight), len(self.fleet.replicas),
        )  # fmt: skip

    # ---- steps ----------------------------------------------------------------------------

    def weights_ready(self, step: int, final: bool) -> None:
        """Send them to every rollout replica each sync_weight_interval steps (not after the
        last step: nothing is generated with them)."""
        if not final and step % self.run.config.train.sync_weight_interval == 0:
            self._order_sync(step, sorted(self.fleet.replicas))

    def _order_sync(self, version: int, replicas: list[str]) -> None:
        """One broadcast from the policy reaches every rank of these replicas."""
        if not replicas:  # all gone: those that join later catch up
            return
        run = self.run
        sync = SyncWeights(version=version, plan=self.fleet.plan(replicas))
        run.out.send(run.keys.policy_commands, sync)
        for replica in replicas:
            run.out.send(run.keys.commands("rollout", replica), sync)
        self.fleet.synced(replicas, version)
        run.state.open_syncs[(sync.plan.group, version)] = set(replicas)

    def record(self, done: StepDone, batch: RolloutBatch) -> None:
        run, state, metrics = self.run, self.run.state, done.metrics
        if not isinstance(metrics, GRPOStepMetrics):
            raise RunFailed(f"a GRPO run got step metrics of another kind: {metrics!r}")
        now = time.monotonic()
        elapsed = max(now - (state.last_step_done or batch.sent), 1e-9)
        state.last_step_done = now
        rollouts = batch.metrics
        record = {
            "step": done.step,
            **rollouts,
            "samples_per_s": batch.samples / elapsed,
            "completion_tokens_per_s": rollouts.get("completion_len_mean", 0.0)
            * batch.samples
            / elapsed,
            "dropped_stale": self.buffer.stats.dropped_stale,
            **self.clock.lap(),
            **self.cost.lap(done.command_latency_ms),
            "elapsed_s": now - state.started_at,
            **metrics.model_dump(),
            "prompt_ids": batch.prompt_ids,  # what this step trained on: an audit trail
        }
        run.remember("rewards", batch.reward_mean)
        run.out.append("metrics", record)
        if run.logs_step(done.step):
            log.info(
                "step %d/%d | reward %.3f ± %.3f | len %.1f | loss %.4f | kl %.4f | "
                "%.1f samples/s | staleness %.2f (max %d) | dropped %d",
                done.step, run.total_steps, batch.reward_mean, rollouts.get("reward_std", 0.0),
                rollouts.get("completion_len_mean", 0.0), metrics.loss,
                metrics.kl_ref if run.config.train.train_policy.kl_beta > 0
                else metrics.kl_behaviour,
                record["samples_per_s"], rollouts.get("staleness_mean", 0.0),
                rollouts.get("staleness_max", 0), record["dropped_stale"],
            )  # fmt: skip

    # ---- state ----------------------------------------------------------------------------

    def untrained(self) -> list[str]:
        # A prompt re-queued from a dead replica can be both buffered and in flight again.
        return sorted(set(self.fleet.in_flight) | set(self.buffer.prompt_ids()))

    def capture(self, state: ControllerState) -> None:
        state.buffered = self.buffer.entry_ids()
        state.buffer_stats = self.buffer.stats
        state.fleet = self.fleet.state()

    def restore(self, state: ControllerState, pending: list[Delivery]) -> list[Delivery]:
        if state.fleet:  # a new run (resumed from a checkpoint) has no fleet yet
            self.fleet.restore(state.fleet)
        buffered = set(state.buffered)
        groups = {d.entry_id: d.message for d in pending if d.entry_id in buffered}
        self.buffer.restore(
            [(groups[e], e) for e in state.buffered],
            journal.load_set(self.run.plane, self.run.keys, "seen"),
            state.buffer_stats,
        )
        return [d for d in pending if d.entry_id not in buffered]

    def result(self) -> dict:
        state = self.run.state
        head, tail = state.rewards[:10], state.rewards[-10:]
        result = {
            "steps": len(state.rewards),
            "reward_mean_first_10": statistics.fmean(head) if head else None,
            "reward_mean_last_10": statistics.fmean(tail) if tail else None,
            "dropped_stale": self.buffer.stats.dropped_stale,
            "duplicates": self.buffer.stats.duplicates,
            "dapo_groups_dropped": self.buffer.stats.dropped_equal,
            "final_export": state.final_export,
            "resumed_from": self.run.info.resume_from or None,
            "uploads": state.uploads,
            "rollout_replicas": self.fleet.stats(),
            "departed_rollout_replicas": self.fleet.departed,
            "controller_restarts": state.controller_restarts,
            "seconds": time.monotonic() - state.started_at,
        }
        log.info(
            "done: %d steps, reward %.3f (first 10) -> %.3f (last 10); export: %s",
            result["steps"], result["reward_mean_first_10"] or 0.0,
            result["reward_mean_last_10"] or 0.0, state.final_export,
        )  # fmt: skip
        return result
