"""The trackers of `[logging] logger` (controller/trackers.py): wandb in offline mode and
TensorBoard, read back from the files they wrote (the offline run's .wandb records with wandb's
protos, the event files with TensorBoard's EventAccumulator); every committed record reaches
them once, also across a controller restart; the controller never imports torch for them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from controller import journal, trackers
from gantry.comm.protocol import Keys
from gantry.comm.transport import ControlPlane
from gantry.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KEYS = Keys("run")
ROWS = [
    {"prompt_id": "0:1", "prompt": "What is 1 + 2?", "completion": "3 | yes\nok", "reward": 1.0,
     "reward/accuracy": 1.0, "advantage": 0.5, "policy_version": 1, "finish_reason": "stop"},
    {"prompt_id": "0:1", "prompt": "What is 1 + 2?", "completion": "4", "reward": 0.0,
     "reward/accuracy": 0.0, "advantage": -0.5, "policy_version": 1, "finish_reason": "length"},
]  # fmt: skip


def record(step: int) -> dict:
    return {
        "step": step, "epoch": 0, "prompt_ids": ["0:1"], "reward_mean": step / 10,
        "reward/accuracy": step / 20, "loss": 1.0 / step, "staleness_hist": [3, 1, 0],
        "finish_note": "text is left out",
    }  # fmt: skip


def write_lines(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def run_trackers(run_dir: Path, *names: str) -> None:
    """What a controller does: open the trackers, start them, wake them, close them."""
    config = load_config(None, [f"logging.logger={json.dumps(['console', *names])}"])
    tracking = trackers.open_trackers(config, run_dir)
    tracking.start()
    tracking.wake()
    tracking.close()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb with no network and nothing outside tmp_path; its service process ends with
    the test."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    yield
    import wandb

    wandb.teardown()


# ---- reading the files back ------------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (a LevelDB-style log: a 7-byte header, 32 KiB
    blocks, chunks of a record tagged full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            found = wandb_internal_pb2.Record()
            found.ParseFromString(parts)
            yield found


def wandb_runs(run_dir: Path) -> list[dict]:
    """Per offline run directory (in order): its run record and history rows as dicts; each
    run's file must end with wandb's exit record (the run was finished and fully written)."""
    runs = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run, rows, kinds = None, [], []
        for found in wandb_records(path):
            kind = found.WhichOneof("record_type")
            kinds.append(kind)
            if kind == "run":
                run = found.run
            elif kind == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                             for i in found.history.item})  # fmt: skip
        assert kinds[-1:] == ["exit"], f"{path}: the run did not finish ({kinds[-3:]})"
        runs.append({"run": run, "rows": rows, "dir": path.parent})
    return runs


def tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "histograms": 0, "tensors": 0}
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


# ---- records ---------------------------------------------------------------------------------


def test_a_record_splits_into_scalars_histograms_and_keys_left_out():
    scalars, lists, left_out = trackers.split_record(
        {**record(2), "validation": True, "ok": True, "empty": []}
    )
    assert scalars == {"reward_mean": 0.2, "reward/accuracy": 0.1, "loss": 0.5}
    assert lists == {"staleness_hist": [3.0, 1.0, 0.0]}
    assert sorted(left_out) == ["finish_note", "ok"]  # bookkeeping keys are not left out: skipped


def test_samples_become_a_markdown_table_with_cells_kept_on_one_line():
    table = trackers.markdown_table(ROWS).splitlines()
    assert table[0] == (
        "| prompt_id | prompt | completion | reward | reward/accuracy | advantage | "
        "policy_version | finish_reason |"
    )
    assert table[1] == "|" + " --- |" * 8
    assert table[2].split(" | ")[2] == "3 \\| yes<br>ok" and len(table) == 4


def test_logger_names_are_read_case_insensitively():
    assert trackers.tracker_names(["Console", "TensorBoard", "WANDB"]) == ["wandb", "tensorboard"]
    assert trackers.tracker_names(["console"]) == []


# ---- TensorBoard -----------------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_step_metrics_and_the_samples(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [record(1), record(2)])
    validation = {"validation": True, "step": 2, "val_loss": 0.25}
    write_lines(tmp_path / "metrics.jsonl", [validation])
    write_lines(tmp_path / "samples.jsonl", [{"step": 2, "samples": ROWS}])
    run_trackers(tmp_path, "tensorboard")
    events = tensorboard(tmp_path)
    scalars = ["loss", "reward/accuracy", "reward_mean", "val_loss"]
    assert sorted(events.Tags()["scalars"]) == scalars
    reward = [(e.step, round(e.value, 6)) for e in events.Scalars("reward_mean")]
    assert reward == [(1, 0.1), (2, 0.2)]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(2, 0.25)]
    (first, _) = events.Histograms("staleness_hist")
    histogram = first.histogram_value
    assert (histogram.num, histogram.sum, list(histogram.bucket)) == (4.0, 1.0, [3.0, 1.0, 0.0])
    (text,) = events.Tensors("samples")
    assert text.step == 2
    assert text.tensor_proto.string_val[0].decode() == trackers.markdown_table(ROWS)


# ---- wandb -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("wandb_offline")
def test_wandb_offline_run_holds_the_config_step_metrics_and_samples_table(tmp_path):
    run_dir = tmp_path / "run-7"
    run_dir.mkdir()
    write_lines(run_dir / "metrics.jsonl", [record(1), record(2)])
    write_lines(run_dir / "samples.jsonl", [{"step": 2, "samples": ROWS}])
    config = load_config(
        None,
        ['logging.logger=["console", "wandb"]', 'logging.project_name="proj"',
         "train.optm_lr=0.125"],
    )  # fmt: skip
    tracking = trackers.open_trackers(config, run_dir)
    tracking.start()
    tracking.wake()
    tracking.close()
    (found,) = wandb_runs(run_dir)
    run = found["run"]
    stored_id = json.loads((run_dir / "trackers.json").read_text())["wandb_run_id"]
    assert (run.project, run.display_name, run.run_id) == ("proj", "run-7", stored_id)
    config_items = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config_items["train"]["optm_lr"] == 0.125  # the resolved config
    metrics = [row for row in found["rows"] if "reward_mean" in row]
    assert [(r["step"], r["reward_mean"], r["reward/accuracy"]) for r in metrics] == [
        (1, 0.1, 0.05), (2, 0.2, 0.1),
    ]  # fmt: skip
    assert metrics[0]["staleness_hist/values"] == [3, 1, 0]
    assert "finish_note" not in metrics[0] and "prompt_ids" not in metrics[0]
    (table_row,) = [row for row in found["rows"] if "samples/path" in row]
    assert table_row["step"] == 2 and table_row["samples/nrows"] == 2
    table = json.loads((found["dir"] / "files" / table_row["samples/path"]).read_text())
    assert table["columns"] == list(ROWS[0])
    assert [dict(zip(table["columns"], row, strict=True)) for row in table["data"]] == ROWS


@pytest.mark.redis
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("wandb_offline")
def test_a_restarted_controller_logs_each_committed_record_once(redis_url, tmp_path):
    """Controller 1 logs steps 1-3, commits step 4 (mirrored to the file, the trackers' thread
    never got to it) and step 5 (committed; killed before the file write). Controller 2
    catches the file up from the journal and goes on with the same wandb run: each step
    reaches each tracker once."""
    plane = ControlPlane(redis_url)
    metrics = tmp_path / "metrics.jsonl"
    out = journal.Outbox(plane, KEYS)
    out.mirror("metrics", metrics)
    for step in (1, 2, 3):
        out.append("metrics", record(step))
        out.commit({"step": step})
    run_trackers(tmp_path, "wandb", "tensorboard")
    out.append("metrics", record(4))
    out.commit({"step": 4})
    unmirrored = journal.Outbox(plane, KEYS)  # the crash: committed, the file write never ran
    unmirrored.append("metrics", record(5))
    unmirrored.commit({"step": 5})
    assert journal.lines_in(metrics) == 4
    # Controller 2:
    journal.catch_up_mirror(plane, KEYS, "metrics", metrics, base=0)
    assert journal.lines_in(metrics) == 5
    run_trackers(tmp_path, "wandb", "tensorboard")
    run_trackers(tmp_path, "wandb", "tensorboard")  # a third start with nothing new: no repeat
    assert [e.step for e in tensorboard(tmp_path).Scalars("reward_mean")] == [1, 2, 3, 4, 5]
    runs = wandb_runs(tmp_path)
    assert len({r["run"].run_id for r in runs}) == 1  # one wandb run, resumed
    logged = [row["step"] for r in runs for row in r["rows"] if "reward_mean" in row]
    assert logged == [1, 2, 3, 4, 5]


def test_a_failing_tracker_is_turned_off_and_the_others_go_on(tmp_path, caplog):
    write_lines(tmp_path / "metrics.jsonl", [record(1)])

    def broken():
        raise OSError("disk quota exceeded\nmore detail")

    openers = {"wandb": broken, "tensorboard": lambda: trackers.TensorBoardSink(tmp_path / "tb")}
    tracking = trackers.Trackers(tmp_path, trackers.read_state(tmp_path), openers)
    tracking.start()
    tracking.close()
    assert "tracker wandb failed and is turned off: OSError: disk quota exceeded" in caplog.text
    assert json.loads((tmp_path / "trackers.json").read_text())["offsets"]["metrics"] > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_line_still_being_written_waits_for_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2')
    lines, used = trackers.read_complete_lines(path, 0)
    assert lines == [b'{"step": 1}\n'] and used == 12
    assert trackers.read_complete_lines(path, used) == ([], 0)


def test_a_missing_tracker_package_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    config = load_config(None, ['logging.logger=["wandb"]'])
    with pytest.raises(trackers.TrackerError, match=r"^logging.logger names wandb but the package"):
        trackers.open_trackers(config, tmp_path)


TORCH_FREE = """
import json, sys
from pathlib import Path
from gantry.config import load_config
from controller import controller, trackers
run_dir = Path(sys.argv[1])
config = load_config(None, ['logging.logger=["wandb", "tensorboard"]'])
tracking = trackers.open_trackers(config, run_dir)
tracking.start(); tracking.wake(); tracking.close()
print(json.dumps(sorted(m for m in ("torch", "tensorflow") if m in sys.modules)))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_controller_with_both_trackers_imports_no_torch(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [record(1)])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(tmp_path)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "[]"
    assert tensorboard(tmp_path).Scalars("reward_mean")[0].step == 1
    assert wandb_runs(tmp_path)[0]["rows"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_launched_run_with_every_logger_fills_both_trackers(tmp_path):
    env = {
        **os.environ, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / ".wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / ".wandb-cache"),
    }  # fmt: skip
    env.pop("WANDB_DIR", None)
    result = subprocess.run(
        [sys.executable, "-m", "gantry.launch", "--config", "configs/quickstart-grpo.toml",
         "datasets/arithmetic.py", f"train.output_dir={tmp_path}", "rollout.backend=transformers",
         "train.max_num_steps=4", "logging.log_interval=2",
         'logging.logger=["console", "wandb", "tensorboard"]', "logging.experiment_name=e2e"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    log = (run_dir / "logs" / "controller.log").read_text()
    assert "trackers: wandb (project 'gantry', run 'e2e', id " in log
    assert f"tensorboard ({run_dir / 'tensorboard'})" in log
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics]
    assert steps == [1, 2, 3, 4]
    events = tensorboard(run_dir)
    tensorboard_reward = [(e.step, e.value) for e in events.Scalars("reward_mean")]
    assert tensorboard_reward == [(m["step"], pytest.approx(m["reward_mean"])) for m in metrics]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and [e.step for e in events.Tensors("samples")] == [s["step"] for s in samples]
    (found,) = wandb_runs(run_dir)
    rows = [row for row in found["rows"] if "reward_mean" in row]
    assert [(r["step"], r["reward_mean"]) for r in rows] == [
        (m["step"], pytest.approx(m["reward_mean"])) for m in metrics
    ]
    tables = [row for row in found["rows"] if "samples/path" in row]
    assert [t["step"] for t in tables] == [s["step"] for s in samples]
