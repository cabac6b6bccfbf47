"""Experiment trackers (wandb, TensorBoard) named in `[logging] logger`, fed by the controller.

Only the controller writes metrics. The trackers run in one thread of the controller that
follows the files the journal mirrors (`metrics.jsonl`, `samples.jsonl`): after each commit the
loop only wakes the thread (`Trackers.wake`, no I/O), and the thread reads the complete lines
past its cursor and hands them to each tracker. A slow tracker (a network upload) lags behind
and never slows the loop nor loses a record: the file is the queue, bounded in memory by the
chunk read at a time.

The cursor (bytes of each file already handed to the trackers) and the wandb run id live in
`<run_dir>/trackers.json`, written after the trackers took the lines. So a record reaches the
trackers once and only after it was committed (the mirror appends committed records only); a
restarted controller (or a run resumed in the same run directory) reads the cursor back, the
lines `catch_up_mirror` appends are past it, and the lines before it are not logged twice. The
same wandb run goes on (`resume="allow"` with the stored id).

- metrics records: every number except the bookkeeping keys (`gantry.comm.metrics.RECORD_KEYS`)
  is a scalar at `step = record["step"]`, under the record's own name (validation records carry
  `val_` names); a list of numbers is a histogram of counts per bin, element i counting the
  value i (`staleness_hist`); anything else is left out, said once per key.
- samples records (`{"step": n, "samples": [row, ...]}`): a `wandb.Table` of the rows, and in
  TensorBoard a markdown table (text) per step.

TensorBoard events are written with tensorboard's own event writer and protos (no torch: the
controller never imports it); wandb honours its environment (WANDB_MODE=offline, WANDB_DIR...).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from gantry.comm.metrics import RECORD_KEYS
from gantry.config import GantryConfig
from gantry.run.checkpoints import write_json_atomic

log = logging.getLogger("gantry.controller")
TRACKERS = ("wandb", "tensorboard")
STATE_FILE = "trackers.json"
FOLLOWED = {"metrics": "metrics.jsonl", "samples": "samples.jsonl"}
CHUNK_BYTES = 1 << 20  # read at most this much of a file per pass (memory bound)
POLL_S = 5.0  # the thread also looks at the files this often without a wake-up
CLOSE_TIMEOUT_S = 120.0  # wandb online may still be uploading at the end


def tracker_names(logger: list[str]) -> list[str]:
    """The trackers `[logging] logger` asks for, lower-cased as cosmos-rl reads them."""
    asked = {name.lower() for name in logger}
    return [name for name in TRACKERS if name in asked]


class Sink(Protocol):
    """One tracker."""

    def metrics(self, step: int, scalars: dict[str, float], lists: dict[str, list[float]]):
        """One metrics record: scalars, and histograms (element i counts the value i)."""

    def table(self, step: int, name: str, rows: list[dict]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


# ---- records --------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def split_record(record: dict) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """(scalars, histograms as per-bin counts, keys left out) of a metrics record."""
    scalars, lists, skipped = {}, {}, []
    for key, value in record.items():
        if key in RECORD_KEYS:
            continue
        if _is_number(value):
            scalars[key] = float(value)
        elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            lists[key] = [float(v) for v in value]
        elif not (isinstance(value, list) and not value):  # an empty list: nothing this step
            skipped.append(key)
    return scalars, lists, skipped


def table_columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in the order they first appear."""
    return list(dict.fromkeys(key for row in rows for key in row))


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (TensorBoard's text plugin renders it)."""
    columns = table_columns(rows)

    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---- the trackers ---------------------------------------------------------------------------


class TensorBoardSink:
    """Event files under `<run_dir>/tensorboard/`, one per controller process."""

    def __init__(self, logdir: Path) -> None:
        # tensorboard's writer and protos: no torch, no TensorFlow.
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._pb = summary_pb2
        # A new file per writer (its name holds time, host and pid): a restarted controller's
        # events land next to the earlier ones, and TensorBoard reads the folder as one run.
        self._writer = EventFileWriter(str(logdir))

    def _add(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import event_pb2

        summary = self._pb.Summary(value=values)
        self._writer.add_event(event_pb2.Event(step=step, summary=summary))

    def metrics(self, step: int, scalars: dict[str, float], lists: dict[str, list[float]]):
        Value = self._pb.Summary.Value
        values = [Value(tag=k, simple_value=v) for k, v in scalars.items()]
        values += [Value(tag=k, histo=_histogram(self._pb, v)) for k, v in lists.items()]
        self._add(step, values)

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2

        text = markdown_table(rows).encode()
        tensor = tensor_pb2.TensorProto(
            dtype=7,  # DT_STRING
            string_val=[text],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
            ),
        )
        plugin = self._pb.SummaryMetadata.PluginData(plugin_name="text")
        metadata = self._pb.SummaryMetadata(plugin_data=plugin)
        self._add(step, [self._pb.Summary.Value(tag=name, metadata=metadata, tensor=tensor)])

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _histogram(pb, counts: list[float]):
    """A HistogramProto of per-bin counts: bin i holds the value i (bucket (i-1, i])."""
    values = [i for i, c in enumerate(counts) if c]
    return pb.HistogramProto(
        min=float(min(values, default=0)),
        max=float(max(values, default=0)),
        num=float(sum(counts)),
        sum=float(sum(i * c for i, c in enumerate(counts))),
        sum_squares=float(sum(i * i * c for i, c in enumerate(counts))),
        bucket_limit=[float(i) for i in range(len(counts))],
        bucket=[float(c) for c in counts],
    )


class WandbSink:
    """A wandb run: project, name and the resolved config from the run; the run id stored in
    the run directory so that a restarted or resumed controller goes on with the same run."""

    def __init__(self, run_id: str, project: str, name: str, config: dict, run_dir: Path):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow",
            config=config,
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            # The controller's output stays its own; the one line at start names the run.
            settings=wandb.Settings(console="off", silent=True),
        )
        # Our step is the x axis: a record of an earlier step (a run resumed from a
        # checkpoint before its last logged step) is kept, not dropped as wandb's own would be.
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        # wandb imports its data types' dependencies (pandas...: ~0.25 s) on their first use:
        # here, at start, rather than in the first step's records.
        wandb.Histogram(np_histogram=([0], [0, 1]))
        wandb.Table(columns=["warm-up"], data=[])

    def metrics(self, step: int, scalars: dict[str, float], lists: dict[str, list[float]]):
        histograms = {
            k: self._wandb.Histogram(np_histogram=(v, list(range(len(v) + 1))))
            for k, v in lists.items()
        }
        self._run.log({"step": step, **scalars, **histograms})

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        columns = table_columns(rows)
        data = [[row.get(c) for c in columns] for row in rows]
        self._run.log({"step": step, name: self._wandb.Table(columns=columns, data=data)})

    def flush(self) -> None:
        """wandb sends in the background; `close` waits for it."""

    def close(self) -> None:
        self._run.finish()
        # finish() can return before wandb's service process has written the run's files:
        # teardown waits for it and ends it (no process of the run outlives the controller).
        self._wandb.teardown()


# ---- the thread -----------------------------------------------------------------------------


class Trackers:
    """The trackers' thread: it follows the mirrored files from the cursor in trackers.json."""

    def __init__(self, run_dir: Path, state: dict, openers: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self._state = state
        self._offsets = {name: int(state["offsets"].get(name, 0)) for name in FOLLOWED}
        self._openers = openers  # tracker name -> a callable that opens its Sink
        self._wake = threading.Event()
        self._stopping = False
        self._left_out: set[str] = set()
        self._state_unsaved = False  # the last save of trackers.json failed
        self._thread = threading.Thread(target=self._main, name="trackers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New committed lines may be in the files (called after each commit: no I/O here)."""
        self._wake.set()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Hand the trackers every line committed so far, then close them (wandb finishes)."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "the trackers did not finish in %.0fs: the last records may be missing from "
                "them (metrics.jsonl has every one)", timeout,
            )  # fmt: skip

    def _main(self) -> None:
        sinks: dict[str, Sink] = {}
        for name, opener in self._openers.items():
            sink = self._guarded(name, opener)
            if sink is not None:
                sinks[name] = sink
        while sinks:
            self._wake.wait(POLL_S)
            self._wake.clear()
            last = self._stopping  # read before the pass: the last pass reads to the end
            self._pass(sinks)
            if last:
                break
        for name, sink in list(sinks.items()):
            self._guarded(name, sink.close)

    def _pass(self, sinks: dict[str, Sink]) -> None:
        started, moved = time.thread_time(), False
        for name, filename in FOLLOWED.items():
            while sinks:
                lines, used = read_complete_lines(self.run_dir / filename, self._offsets[name])
                if not used:
                    break
                for line in lines:
                    self._deliver(sinks, name, line)
                self._offsets[name] += used
                moved = True
        if moved:
            for tracker, sink in list(sinks.items()):
                self._guarded(tracker, sink.flush, sinks)
            self._state["offsets"] = dict(self._offsets)
            # What the trackers cost the controller's process (bench/trackers.py reads it).
            spent = time.thread_time() - started
            self._state["cpu_seconds"] = self._state.get("cpu_seconds", 0.0) + spent
            self._save_state()

    def _save_state(self) -> None:
        """trackers.json, the cursor; on a full disk the thread goes on (the cursor is saved
        at the next pass that can): the controller's own writes report the disk."""
        try:
            write_json_atomic(self.run_dir / STATE_FILE, self._state)
        except OSError as exc:
            if not self._state_unsaved:
                log.warning("trackers: %s could not be saved: %s", STATE_FILE, exc)
            self._state_unsaved = True
        else:
            self._state_unsaved = False

    def _deliver(self, sinks: dict[str, Sink], name: str, line: bytes) -> None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("trackers: a line of %s is not JSON: left out", FOLLOWED[name])
            return
        step = int(record.get("step", 0))
        if name == "samples":
            rows = record.get("samples") or []
            for tracker, sink in list(sinks.items()):
                if rows:
                    self._guarded(tracker, lambda s=sink: s.table(step, "samples", rows), sinks)
            return
        scalars, lists, skipped = split_record(record)
        for key in set(skipped) - self._left_out:
            self._left_out.add(key)
            log.info("trackers: %r is not a number or a list of numbers: not sent", key)
        for tracker, sink in list(sinks.items()):
            self._guarded(tracker, lambda s=sink: s.metrics(step, scalars, lists), sinks)

    @staticmethod
    def _guarded(tracker: str, call, sinks: dict[str, Sink] | None = None):
        """Run a tracker's call; a tracker that fails is dropped with one line, the run and the
        other trackers go on (metrics.jsonl keeps every record)."""
        try:
            return call()
        except Exception as exc:  # a tracker (network, a third-party library) may raise anything
            log.error("tracker %s failed and is turned off: %s: %s", tracker,
                      type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
            if sinks is not None:
                sinks.pop(tracker, None)
            return None


def read_complete_lines(path: Path, offset: int, budget: int = CHUNK_BYTES):
    """(lines, bytes) of the whole lines of `path` from byte `offset`, up to about `budget`
    bytes; a last line without its newline is still being written and waits."""
    if not path.exists():
        return [], 0
    lines, used = [], 0
    with path.open("rb") as f:
        f.seek(offset)
        while used < budget:
            line = f.readline()
            if not line.endswith(b"\n"):
                break
            lines.append(line)
            used += len(line)
    return lines, used


# ---- from the config ------------------------------------------------------------------------


class TrackerError(RuntimeError):
    """A tracker the config asks for cannot be used (its package is missing)."""


_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def open_trackers(config: GantryConfig, run_dir: Path) -> Trackers | None:
    """The trackers `config.logging.logger` names (not started), None for console only."""
    import importlib.util

    names = tracker_names(config.logging.logger)
    if not names:
        return None
    missing = [_PACKAGES[n] for n in names if importlib.util.find_spec(_PACKAGES[n]) is None]
    if missing:
        raise TrackerError(
            f"logging.logger names {', '.join(missing)} but the package is not installed: "
            f"pip install {' '.join(missing)} (or remove it from logging.logger)"
        )
    state = read_state(run_dir)
    if "wandb" in names and not state.get("wandb_run_id"):
        state["wandb_run_id"] = new_wandb_id()
        write_json_atomic(run_dir / STATE_FILE, state)
    openers: dict[str, Any] = {}
    if "wandb" in names:
        logging_config = config.logging
        openers["wandb"] = lambda: WandbSink(
            state["wandb_run_id"],
            logging_config.project_name,
            logging_config.experiment_name or run_dir.name,
            config.model_dump(mode="json"),
            run_dir,
        )
    if "tensorboard" in names:
        openers["tensorboard"] = lambda: TensorBoardSink(run_dir / "tensorboard")
    return Trackers(run_dir, state, openers)


def read_state(run_dir: Path) -> dict:
    """trackers.json: the wandb run id and the cursor (bytes of each followed file logged)."""
    path = run_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.exists() else {}
    state.setdefault("offsets", {})
    return state


def new_wandb_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def describe(config: GantryConfig, run_dir: Path) -> str:
    """The one line at start naming the trackers and where they write."""
    parts = []
    for name in tracker_names(config.logging.logger):
        if name == "wandb":
            run_name = config.logging.experiment_name or run_dir.name
            mode = os.environ.get("WANDB_MODE", "online")
            parts.append(
                f"wandb (project {config.logging.project_name!r}, run {run_name!r}, "
                f"id {read_state(run_dir).get('wandb_run_id')}, {mode})"
            )
        else:
            parts.append(f"tensorboard ({run_dir / 'tensorboard'})")
    return "trackers: " + ", ".join(parts)
