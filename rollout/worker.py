"""The rollout worker loop: take prompts, sample n completions each, score them, publish.

Prompts come from this replica's prompt stream, filled by the controller as the replica has
room (consumer group "rollout", so a restarted replica picks up what it held); a batch of
results is published and its prompts acknowledged in one transaction. Before each batch the
worker applies pending commands, so a weight sync the controller ordered before dispatching
new prompts is in place before those prompts are generated, and every result carries the
version it was generated with.

Nothing polls: an idle replica blocks in one XREADGROUP on its prompt stream and its command
stream together (both read by the consumer group "rollout"), so a sync order wakes it at once.
A generate call cannot be interrupted (an engine's weights cannot change in the middle of
one): the commands that came during it are applied right after it, before the batch is scored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib

import torch

from gantry.comm.protocol import (
    PromptTask,
    Register,
    RolloutGroup,
    Sample,
    Stop,
    SyncWeights,
    WeightsSynced,
)
from gantry.comm.sync_groups import SyncCancelled
from gantry.comm.transport import ControlPlane, Delivery
from gantry.config import GantryConfig
from gantry.data.plugin import load_dataset_script
from gantry.data.rewards import RewardSet
from gantry.launch.placement import rollout_dtype
from gantry.run.activity import Activity
from gantry.run.deadline import Deadlines, Units, Watchdog, exit_on_thread_error
from gantry.run.runtime import Heartbeat, RunInfo, host_name, report_failure
from rollout.engine import Completion, RolloutEngine, SamplingSettings
from rollout.prompts import PromptBuilder

log = logging.getLogger("gantry.rollout")
GROUP = "rollout"
# A safety net only: prompts and commands both wake the blocking read as they land.
READ_BLOCK_MS = 5000
# A test hook, not a setting: "REPLICA:CALL" makes that replica's CALL-th generate call (1-based)
# hang as a stuck engine would (its heartbeat beating on), for the fault tests of its deadline.
HANG_ENV = "GANTRY_TEST_HANG_GENERATE"


def hang_at(replica: str) -> int:
    """The generate call at which this replica hangs (HANG_ENV), 0 for none."""
    target, _, call = os.environ.get(HANG_ENV, "").partition(":")
    return int(call) if target == replica and call else 0


def make_engine(config: GantryConfig, model_path: str) -> RolloutEngine:
    rollout = config.rollout
    dtype = rollout_dtype(rollout.dtype, model_path, torch.cuda.is_available())
    if rollout.backend == "transformers":
        from rollout.hf_engine import HFEngine

        return HFEngine(model_path, dtype=getattr(torch, dtype))
    from rollout.vllm_compat import LAYERWISE_LOGGER
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        model_path,
        tp_size=rollout.parallelism.tp_size,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        max_model_len=config.policy.model_max_length,
        seed=rollout.seed,
        enforce_eager=rollout.enforce_eager,
        dtype=dtype,
    )
    # Warns at every in-place reload that rotary buffers have no checkpoint weights; they are
    # kept as they were, which is right. Set after start-up: vLLM configures its loggers then.
    logging.getLogger(LAYERWISE_LOGGER).setLevel(logging.ERROR)
    return engine


class RolloutWorker:
    def __init__(self, config: GantryConfig, info: RunInfo, replica: str) -> None:
        self.config, self.info, self.replica = config, info, replica
        self.keys = info.keys
        self.plane = ControlPlane(info.redis_url)
        self.script = load_dataset_script(
            info.dataset_script,
            config=config,
            model_path=info.model_path,
            config_source=info.config_source or None,
        )
        self.samples = self.script.load_samples(config.custom)
        # The script's reward functions, the reward server and the overlong penalty, weighted.
        self.rewards = RewardSet(
            self.script, config.train.train_policy, config.rollout.max_response_length
        )
        self.reward_names = self.rewards.names
        self.prompts_of = PromptBuilder(info.model_path)
        self.tokenizer = self.prompts_of.tokenizer
        started = time.perf_counter()
        self.engine = make_engine(config, info.model_path)
        log.info("engine %s up in %.1fs", config.rollout.backend, time.perf_counter() - started)
        self.version = 0
        self.manifest: str | None = None
        self.prompts = self.keys.prompts(replica)
        self.commands = self.keys.commands("rollout", replica)
        self.plane.ensure_group(self.commands, GROUP)  # read from its first entry
        self.consumer = f"rollout-{replica}"
        self.stopping = False
        # What this replica does now (published with the heartbeat; idle time for the metrics).
        self.activity = Activity("rollout", replica, host=host_name())

        # A reward function that never returns (a hung HTTP call) would keep the heartbeat
        # alive while nothing is scored: past rollout.reward_timeout the replica stops, named.
        def fail(text: str) -> None:
            report_failure("rollout", replica, info, text)

        self.watchdog = Watchdog(on_expiry=lambda text: fail(f"stuck: {text}"))
        # Each generate call and weight sync has a deadline too (gantry.run.deadline), and an
        # error that ends any thread of this process ends the process.
        self.units = Units(
            self.activity, self.watchdog, Deadlines.from_config(config.fault_tolerance)
        )
        self.report_failure = fail
        self.generate_calls, self.hang_at = 0, hang_at(replica)

    def run(self) -> None:
        restore_thread_hook = exit_on_thread_error(self.report_failure)
        try:
            self._run()
        finally:  # the orderly end (an engine shutting down is no failure), or an error raised
            restore_thread_hook()

    def _run(self) -> None:
        self.plane.ensure_group(self.prompts, GROUP)
        heartbeat = Heartbeat(
            self.plane, self.keys.heartbeat("rollout", self.replica), self.activity
        ).start()
        ranks = self.config.rollout.parallelism.tp_size
        if self.config.rollout.backend == "transformers":
            ranks = 1
        register = Register(
            role="rollout", replica=self.replica, pid=os.getpid(), host=host_name(), ranks=ranks
        )
        self.plane.send(self.keys.events, register)
        self.activity.set("idle", "waiting for prompts")
        # Prompts this replica held when it last died come first.
        backlog = self.plane.read_own_pending(
            self.prompts, GROUP, self.consumer, self.config.rollout.batch_size
        )
        while not self.stopping:
            deliveries = backlog or self._next_prompts()
            backlog = []
            # Commands again: a sync ordered before these prompts were dispatched comes first.
            if deliveries and self._apply_commands():
                self._roll_out(deliveries)
            # Prompts read but not rolled out stay pending: this replica's, after a restart.
        heartbeat.stop()

    def _next_prompts(self) -> list[Delivery]:
        """The next prompts, waiting for them and for commands together: commands that come
        meanwhile are applied at once (a sync's check-in does not wait for a prompt)."""
        count = self.config.rollout.batch_size
        read = self.plane.read_group(
            [self.prompts, self.commands], GROUP, self.consumer, count, READ_BLOCK_MS
        )
        if not self._apply([d for d in read if d.stream == self.commands]):
            return []
        return [d for d in read if d.stream == self.prompts]

    def _apply_commands(self) -> bool:
        """Apply the commands that came (without waiting for any); False once told to stop."""
        if self.stopping:
            return False
        return self._apply(
            self.plane.read_group([self.commands], GROUP, self.consumer, 16, block_ms=None)
        )

    def _apply(self, deliveries: list[Delivery]) -> bool:
        """Apply these commands in order, acknowledging each; False once told to stop."""
        for delivery in deliveries:
            command = delivery.message
            if isinstance(command, Stop):
                log.info("stopping: %s", command.reason)
                self.activity.set("stopping", command.reason)
                self.stopping = True
            elif isinstance(command, SyncWeights):
                latency = delivery.latency_ms()
                # Bounded by the sync's own timeout (its check-in) plus the transfer's deadline.
                with self.units.run(
                    "weight sync", "syncing", f"weights v{command.version}",
                    extra_s=command.plan.timeout_s,
                ):  # fmt: skip
                    self._receive_weights(command, latency)
            else:
                raise TypeError(f"rollout got an unexpected command: {command!r}")
            self.plane.ack(delivery.stream, GROUP, [delivery.entry_id])
            if self.stopping:
                return False
        return True

    def _receive_weights(self, command: SyncWeights, latency_ms: float = 0.0) -> None:
        started = time.perf_counter()
        if self.manifest is None:
            raw = self.plane.redis.get(self.keys.manifest)
            if raw is None:
                raise RuntimeError("no weight manifest in Redis: the policy publishes it first")
            self.manifest = raw.decode()
        try:
            self.engine.receive_weights(command.plan, self.manifest, command.version, self.replica)
        except SyncCancelled:
            # The controller gave this sync up (another member died) and will order a new
            # one. Every engine raises it here, in this process (`VLLMEngine` re-raises it
            # from its workers' answers), so nothing else needs catching.
            called_off = self.keys.sync_called_off(command.plan.group, command.version)
            if not self.plane.redis.exists(called_off):
                raise
            log.warning("weight sync v%d called off: a member left the run", command.version)
            return
        self.version = command.version
        seconds = time.perf_counter() - started
        log.debug("weights v%d received and loaded in %.3fs", command.version, seconds)
        self.plane.send(
            self.keys.events,
            WeightsSynced(
                replica=self.replica,
                version=command.version,
                seconds=seconds,
                order_latency_ms=latency_ms,
            ),
        )

    def _roll_out(self, deliveries: list[Delivery]) -> None:
        tasks: list[PromptTask] = [d.message for d in deliveries]
        version = self.version  # the weights these prompts are generated with
        started = time.perf_counter()
        prompts, prompt_texts, completions = self._generate(tasks)
        generated = time.perf_counter()
        # A sync ordered during the generate call starts now, not after the scoring; a Stop
        # leaves the batch pending (the controller is done, or hands it to another replica).
        if not self._apply_commands():
            return
        after_commands = time.perf_counter()
        with self.activity.doing("scoring", f"{len(tasks)} prompts"):
            scores = self._score(tasks, completions)
        # The replica's time since its previous batch, shared equally by this batch's groups
        # like the generation and scoring seconds: the controller sums them over a step.
        totals = self.activity.take_totals()
        share = 1.0 / len(tasks)
        timing = {
            "generation_seconds": (generated - started) * share,
            "scoring_seconds": (time.perf_counter() - after_commands) * share,
            "idle_seconds": totals.get("idle", 0.0) * share,
            "busy_seconds": (sum(totals.values()) - totals.get("idle", 0.0)) * share,
        }
        groups = []
        for task, prompt, text, outs, scored in zip(
            tasks, prompts, prompt_texts, completions, scores, strict=True
        ):
            samples = [
                Sample(
                    token_ids=c.token_ids,
                    logprobs=c.logprobs,
                    reward=total,
                    finish_reason=c.finish_reason,
                    reward_parts=parts,
                    text=completion_text,
                    reward_info=info,
                )
                for c, (completion_text, total, parts, info) in zip(outs, scored, strict=True)
            ]
            groups.append(
                RolloutGroup(
                    prompt_id=task.prompt_id,
                    replica=self.replica,
                    policy_version=version,
                    # A multimodal prompt's ids, placeholders expanded, come from the engine.
                    prompt_token_ids=outs[0].prompt_token_ids or prompt,
                    samples=samples,
                    reward_names=self.reward_names,
                    prompt_text=text,
                    **timing,
                )
            )
        ids = [d.entry_id for d in deliveries]
        self.plane.ack_and_send(self.prompts, GROUP, ids, self.keys.rollouts, groups)

    def _generate(self, tasks: list[PromptTask]) -> tuple[list, list[str], list[list[Completion]]]:
        """The engine's generate call, within its deadline: the slowest seconds per prompt so
        far, or the batch's worst case (every completion max_response_length tokens) at the
        best tokens/s measured, times fault_tolerance.deadline_factor."""
        cfg, deadlines = self.config.rollout, self.units.deadlines
        worst_tokens = len(tasks) * cfg.n_generation * cfg.max_response_length
        per_token = deadlines.best_rate("generated token")
        estimate = deadlines.factor * per_token * worst_tokens if per_token else 0.0
        self.generate_calls += 1
        started = time.perf_counter()
        detail = f"{len(tasks)} prompts (weights v{self.version})"
        with self.units.run("generate", "generating", detail, work=len(tasks), estimate_s=estimate):
            prompts, prompt_texts = self.prompts_of.build_with_texts(
                self.samples, [task.index for task in tasks], self.script.path
            )
            if self.generate_calls == self.hang_at:  # the test hook (HANG_ENV)
                log.warning("%s: generate call %d hangs (test hook)", HANG_ENV, self.hang_at)
                threading.Event().wait()
            completions = self.engine.generate(prompts, self._sampling(tasks))
        tokens = sum(len(c.token_ids) for outs in completions for c in outs)
        deadlines.record("generated token", time.perf_counter() - started, max(tokens, 1))
        return prompts, prompt_texts, completions

    def _score(
        self, tasks: list[PromptTask], completions: list[list[Completion]]
    ) -> list[list[tuple[str, float, list[float], dict]]]:
        """Per prompt, per completion: its text, weighted reward, each reward function's value
        and the functions' info (gantry.data.rewards)."""
        # One decode call for the whole batch: the worker's time between generate calls is
        # generation lost.
        texts = iter(
            self.tokenizer.batch_decode(
                [c.token_ids for outs in completions for c in outs], skip_special_tokens=True
            )
        )
        scores = []
        timeout = self.config.rollout.reward_timeout
        for task, outs in zip(tasks, completions, strict=True):
            sample = self.samples[task.index]

            def guard(name: str, task: PromptTask = task):
                return self.watchdog.limit(
                    timeout,
                    lambda: (
                        f"reward function {name} on sample {task.index} (prompt "
                        f"{task.prompt_id}; rollout.reward_timeout = {timeout:g})"
                    ),
                )

            group_texts = [next(texts) for _ in outs]
            scored = self.rewards.score_group(
                group_texts,
                [len(c.token_ids) for c in outs],
                sample,
                task.index,
                task.prompt_id,
                guard,
            )
            scores.append([(t, *rest) for t, rest in zip(group_texts, scored, strict=True)])
        return scores

    def _sampling(self, tasks: list[PromptTask]) -> SamplingSettings:
        cfg = self.config.rollout
        sc = cfg.sampling_config
        # Seeded by run seed and the prompts, so a re-delivered batch samples the same way.
        key = ",".join(t.prompt_id for t in tasks) + f"/v{self.version}"
        return SamplingSettings(
            n=cfg.n_generation,
            temperature=sc.temperature,
            top_p=sc.top_p,
            top_k=sc.top_k,
            repetition_penalty=sc.repetition_penalty,
            max_tokens=cfg.max_response_length,
            seed=(cfg.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31),
            stop_token_ids=[self.tokenizer.eos_token_id],
            banned_token_ids=self.prompts_of.banned_token_ids,
        )
