"""The policy worker loop: train on the batches the controller sends, sync weights, export.

Commands arrive in order on this worker's command stream (TrainBatch, SyncWeights, Export,
Stop); results go back as events. Weights leave only through the weight-sync process group.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from gantry import communicator
from gantry.config import GantryConfig
from gantry.protocol import (
    Export,
    ExportDone,
    Register,
    StepDone,
    Stop,
    SyncWeights,
    TrainBatch,
)
from gantry.runtime import Heartbeat, RunInfo, host_name
from gantry.transport import ControlPlane
from policy.export import export_hf, prune_exports
from policy.trainer import GRPOTrainer

log = logging.getLogger("gantry.policy")
WEIGHT_SYNC_RANK = 0


class PolicyWorker:
    def __init__(self, config: GantryConfig, info: RunInfo, replica: str) -> None:
        self.config, self.info, self.replica = config, info, replica
        self.keys = info.keys
        self.plane = ControlPlane(info.redis_url)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        self.trainer = GRPOTrainer(config, info.model_path)
        self.weights = self.trainer.named_weights()
        self.manifest = communicator.manifest_of(self.weights.items())
        self.buckets = communicator.plan_buckets(self.manifest)
        self.group = None

    def run(self) -> None:
        communicator.publish_manifest(
            self.plane, self.keys, self.manifest, communicator.DEFAULT_BUCKET_BYTES
        )
        heartbeat = Heartbeat(self.plane, self.keys.heartbeat("policy", self.replica)).start()
        self.plane.send(
            self.keys.events,
            Register(role="policy", replica=self.replica, pid=os.getpid(), host=host_name()),
        )
        log.info("policy ready: %d parameters", sum(e.numel for e in self.manifest))
        commands = self.keys.commands("policy", self.replica)
        while True:
            for command in self.plane.read_next(commands, block_ms=1000):
                if isinstance(command, Stop):
                    heartbeat.stop()
                    log.info("stopping: %s", command.reason)
                    return
                self._handle(command)

    def _handle(self, command) -> None:
        if isinstance(command, TrainBatch):
            metrics = self.trainer.step(command.groups)
            self.plane.send(self.keys.events, StepDone(step=command.step, metrics=metrics))
        elif isinstance(command, SyncWeights):
            self._send_weights(command.version)
        elif isinstance(command, Export):
            path = export_hf(self.trainer.model, self.info.model_path, command.path)
            prune_exports(path.parent, self.config.train.ckpt.max_keep)
            self.plane.send(
                self.keys.events, ExportDone(step=command.step, path=str(path), final=command.final)
            )
        else:
            raise TypeError(f"policy got an unexpected command: {command!r}")

    def _send_weights(self, version: int) -> None:
        started = time.perf_counter()
        if self.group is None:
            self.group = communicator.join_group(self.plane, self.keys, WEIGHT_SYNC_RANK)
        communicator.send_weights(self.group, self.weights, self.buckets)
        log.info("sent weights v%d in %.3fs", version, time.perf_counter() - started)
