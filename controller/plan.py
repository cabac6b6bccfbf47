"""What the controller's loop shares with the algorithm it runs, and what it asks of it.

`Controller` (controller.controller) runs the part every run has: the workers' registration
and heartbeats, the journal, checkpoints, exports, uploads and the run's end. Where batches
come from and what a step reports depend on the algorithm: a `Plan` (controller.grpo's, fed
by rollout replicas; controller.sft's, straight from the dataset order) is handed the `Run`
(settings, writes, state) and answers the loop's questions at fixed points of each pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from controller import journal
from controller.scheduler import PromptQueue
from controller.state import ControllerState, InFlightBatch
from gantry.comm.protocol import Keys, StepDone
from gantry.comm.transport import ControlPlane, Delivery
from gantry.config import GantryConfig
from gantry.run.runtime import RunInfo

GROUP = "controller"  # the controller's consumer group (and consumer) on the streams it reads


class RunFailed(RuntimeError):
    """The run cannot go on: the controller prints this one line and exits non-zero."""


@dataclass
class Run:
    """The run as the controller and its plan both see it."""

    config: GantryConfig
    info: RunInfo
    plane: ControlPlane
    out: journal.Outbox  # every write of a pass goes out with the state it leads to
    queue: PromptQueue
    total_steps: int
    groups_per_step: int  # prompts (GRPO) or samples (SFT) per step
    state: ControllerState = field(default_factory=ControllerState)

    @property
    def keys(self) -> Keys:
        return self.info.keys

    @property
    def run_dir(self) -> Path:
        return Path(self.info.run_dir)

    def remember(self, name: str, value) -> None:
        """Add `value` to the state's journaled list `name` (controller.state.JOURNALED)."""
        getattr(self.state, name).append(value)
        self.out.append(name, value)

    def policy_idle(self) -> bool:
        """No batch in flight and steps left to send: the time for the next batch."""
        return self.state.in_flight is None and self.state.steps_sent < self.total_steps

    def logs_step(self, step: int) -> bool:
        return step % self.config.logging.log_interval == 0 or step == self.total_steps


class Plan(Protocol):
    """The algorithm's part of the controller, called by its loop."""

    def describe(self) -> str:
        """One line for the log: steps, batch sizes."""

    def missing_workers(self) -> list[tuple[str, str]]:
        """Workers besides the policy replicas that training waits for: (role, replica)."""

    def advance(self) -> None:
        """Once per pass: hand out work, and send a batch when the policy is idle."""

    def handle(self, delivery: Delivery) -> bool:
        """Take a message that is the plan's own (acknowledging it); False: not the plan's."""

    def worker_lost(self, role: str, replica: str, why: str) -> None:
        """A registered worker that is not a policy replica is lost: its heartbeat lapsed, or
        says it is past its deadline (`why` names what it was doing: gantry.run.deadline)."""

    def record(self, done: StepDone, batch: InFlightBatch) -> None:
        """The step's metrics record (metrics.jsonl) and history."""

    def weights_ready(self, step: int, final: bool) -> None:
        """The policy now holds the weights of `step` (its checkpoint, if any, is ordered;
        its export is not yet)."""

    def untrained(self) -> list[str]:
        """Prompt ids handed out and not trained yet (a checkpoint hands them out again)."""

    def capture(self, state: ControllerState) -> None:
        """Write the plan's components' parts into `state`, about to be stored."""

    def restore(self, state: ControllerState, pending: list[Delivery]) -> list[Delivery]:
        """Take the plan's parts back from `state`; of the deliveries a restarted controller
        found pending, those the plan holds are kept, the others returned to handle again."""

    def rollout_replicas(self) -> list[str]:
        """Every rollout replica of the run, registered or only launched (to stop them)."""

    def result(self) -> dict:
        """The run's summary (result.json), logged in one line."""
