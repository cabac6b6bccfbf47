"""A full disk (issue 18): one line naming the path that is full and the bytes needed against
those free, exit 2 without a restart, the previous complete checkpoint intact, no half-written
one left, and metrics.jsonl / samples.jsonl never with a partial last line.

The launcher case and the checkpointer's run on a real small tmpfs (mounted here as root,
unmounted in a `finally`; skipped with the reason where mounting is not permitted); the
whole-line writer is also tested with a write cut short by hand, which needs no mount."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gantry.run import checkpoints
from gantry.run.checkpoints import (
    append_whole,
    trim_partial_line,
    write_json_atomic,
)
from gantry.run.errors import DiskFullError, is_disk_full
from tests.test_interrupt import LONG, Launcher, commands, wait_gone

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path`, unmounted on the way out; the test is skipped when this
    machine does not let us mount one."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int) -> None:
    """Fill the filesystem of `directory` but for about `leave` bytes."""
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with (directory / "ballast").open("wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(0, free - leave))


# ---- the whole-line writer ----------------------------------------------------------------


def test_append_whole_appends_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_whole(path, b'{"step": 1}\n')
    append_whole(path, b'{"step": 2}\n{"step": 3}\n')
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_a_write_cut_short_is_taken_back_and_named(tmp_path, monkeypatch):
    """The disk fills in the middle of a record: half of it is written, then ENOSPC. The file
    is truncated back to its last whole line and DiskFullError names the path and bytes."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n')
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a short write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    record = b'{"step": 2, "loss": 0.5}\n'
    with pytest.raises(DiskFullError) as raised:
        append_whole(path, record)
    monkeypatch.undo()
    assert calls[0] == len(record) and len(calls) == 2
    assert path.read_bytes() == b'{"step": 1}\n'
    line = str(raised.value)
    assert str(path) in line and f"needs {len(record)} bytes" in line and "free there" in line


def test_other_write_errors_are_raised_as_they_are_and_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b"{}\n")
    real_write = os.write
    monkeypatch.setattr(
        os, "write", lambda fd, data: real_write(fd, bytes(data[:3])) and (_ for _ in ()).throw(
            OSError(errno.EIO, "I/O error")
        ),
    )  # fmt: skip
    with pytest.raises(OSError) as raised:
        append_whole(path, b'{"a": 1}\n')
    monkeypatch.undo()
    assert not isinstance(raised.value, DiskFullError) and raised.value.errno == errno.EIO
    assert path.read_bytes() == b"{}\n"


def test_a_partial_last_line_is_cut_off(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"st')
    assert trim_partial_line(path) == 4
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    assert trim_partial_line(path) == 0  # whole lines are left alone
    long = tmp_path / "long.jsonl"
    long.write_bytes(b"x" * 10_000)  # no newline at all: nothing whole to keep
    assert trim_partial_line(long) == 10_000 and long.read_bytes() == b""


def test_the_journal_counts_whole_lines_and_mends_a_partial_one(tmp_path, redis_url):
    """A file left with a partial line (an older writer killed mid-write) is mended: the
    record is written again whole from the journal."""
    from controller import journal
    from gantry.comm.protocol import Keys
    from gantry.comm.transport import ControlPlane

    plane, keys = ControlPlane(redis_url), Keys("fulldisk")
    path = tmp_path / "metrics.jsonl"
    outbox = journal.Outbox(plane, keys)
    outbox.mirror("metrics", path)
    for step in (1, 2):
        outbox.append("metrics", {"step": step})
    outbox.commit({"n": 1})
    path.write_bytes(path.read_bytes() + b'{"step": 3, "lo')  # a crash in the middle of it
    outbox.append("metrics", {"step": 3})
    outbox.discard()  # what a new controller finds: step 3 committed, the file cut
    plane.redis.rpush(keys.journal("metrics"), json.dumps({"step": 3}))
    assert journal.lines_in(path) == 2
    journal.catch_up_mirror(plane, keys, "metrics", path, base=0)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    plane.close()


def test_a_full_disk_is_recognised_through_its_causes():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("saving failed") from exc
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)

    class CheckpointException(Exception):  # DCP's shape: the ranks' errors in `failures`
        failures = {0: full}

    assert is_disk_full(CheckpointException())
    assert is_disk_full(
        Exception("MISCONF Errors writing to the AOF file: No space left on device")
    )
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))
    assert not is_disk_full(OSError(errno.EIO, "I/O error"))


# ---- on a real small tmpfs ----------------------------------------------------------------


def test_on_a_full_tmpfs_appends_and_json_writes_leave_whole_files(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        metrics = disk / "metrics.jsonl"
        append_whole(metrics, b'{"step": 1}\n')
        write_json_atomic(disk / "trackers.json", {"offsets": 1})
        fill(disk, leave=100)
        with pytest.raises(DiskFullError, match=str(metrics)):
            append_whole(metrics, b'{"step": 2, "text": "' + b"x" * 20_000 + b'"}\n')
        assert metrics.read_bytes() == b'{"step": 1}\n'
        with pytest.raises(DiskFullError, match="trackers.json needs"):
            write_json_atomic(disk / "trackers.json", {"offsets": "y" * 20_000})
        assert json.loads((disk / "trackers.json").read_text()) == {"offsets": 1}
        assert not (disk / "trackers.json.tmp").exists()


CHECKPOINTER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    dist.init_process_group("gloo", rank=0, world_size=1)
    from gantry.run.checkpoints import mark_complete
    from gantry.run.errors import DiskFullError
    from policy.checkpoint import PolicyCheckpointer
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # 257 kB of weights, 0.8 MB with AdamW's moments
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt = PolicyCheckpointer(async_mode=sys.argv[2] == "async")
    if len(sys.argv) > 4:  # no look before the save: the disk fills in the middle of it
        ckpt._check_room = lambda path, state: 800_000
    root = Path(sys.argv[1]) / "checkpoints"
    said = {}
    for step in (1, 2):
        try:
            ckpt.save(root / f"step_{step}" / "policy", model=model, optimizer=optimizer,
                      scheduler=scheduler, step=step, extra={})
            for path in ckpt.wait():
                mark_complete(path.parent, step)
        except DiskFullError as exc:
            said[step] = str(exc)
    ckpt.load(root / "step_1" / "policy", model=model, optimizer=optimizer, scheduler=scheduler)
    print(json.dumps(said))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("when", ["before", "during"])
def test_a_checkpoint_that_does_not_fit_is_named_and_the_last_one_kept(tmp_path, mode, when):
    """The first save fits, the second does not: found before writing (free space against
    the last checkpoint's size), or while writing (torch.save's error, no errno). Either
    way one line names the path and the bytes, the half-written save is gone, and the first
    checkpoint is complete and loads."""
    from gantry.launch.redis_server import free_port

    with tmpfs(tmp_path / "disk", "1300k") as disk:
        args = [str(disk), mode, str(free_port())] + (["no-look"] if when == "during" else [])
        done = subprocess.run(
            [sys.executable, "-c", CHECKPOINTER, *args], capture_output=True, text=True,
            cwd=ROOT, timeout=150,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        said = json.loads(done.stdout.strip().splitlines()[-1])
        assert list(said) == ["2"], said
        line = said["2"]
        assert line.startswith("the disk is full: the policy checkpoint ")
        assert f"{disk}/checkpoints/step_2/policy needs" in line and "free there" in line
        root = disk / "checkpoints"
        assert [p.name for p in checkpoints.complete_checkpoints(root)] == ["step_1"]
        assert not (root / "step_2").exists()


def test_an_export_that_does_not_fit_is_named_before_writing(tmp_path):
    import torch

    from policy.export_files import ShardFiles, TensorSpec

    with tmpfs(tmp_path / "disk", "256k") as disk:
        out = disk / "export" / "step_2.tmp"
        files = ShardFiles(out, [[TensorSpec("w", (256, 512), torch.float32)]])  # 512 kB
        with pytest.raises(DiskFullError) as raised:
            files.create()
        assert f"the export {out} needs 524" in str(raised.value), raised.value
        assert not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_whose_disk_is_too_small_for_its_second_checkpoint_stops_with_one_line(
    tmp_path,
):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        launcher = Launcher(
            disk, "--config", "configs/quickstart-grpo.toml", "datasets/arithmetic.py", *LONG,
            "train.ckpt.enable_checkpoint=true", "train.ckpt.save_freq=3",
            "train.max_num_steps=12", "fault_tolerance.max_restarts=2",
        )  # fmt: skip
        try:
            run_dir = launcher.run_dir()
            launcher.wait_for(r"step 4/", 300)
            tree = launcher.tree()
            assert launcher.finish(timeout=200) == 2, launcher.output()[-6000:]
            assert not wait_gone(tree, 10), commands(wait_gone(tree, 0))
        finally:
            launcher.kill()
        output = launcher.output()
        last = output.strip().splitlines()[-1]
        assert last.startswith("[launcher] error: policy0: DiskFullError: the disk is full: "), (
            output[-6000:]
        )
        assert f"{run_dir}/checkpoints/step_6/policy needs" in last and "free there" in last
        assert "not retried" in last and "restart 1/2" not in output, output[-6000:]
        assert "Traceback" not in output and "Exception in thread" not in output
        root = run_dir / "checkpoints"
        assert [p.name for p in checkpoints.complete_checkpoints(root)] == ["step_3"]
        assert not (root / "step_6").exists()
        assert_loads(root / "step_3" / "policy", tmp_path)
        text = (run_dir / "metrics.jsonl").read_text()
        assert text.endswith("\n")
        steps = [json.loads(line)["step"] for line in text.splitlines()]
        assert steps[:6] == [1, 2, 3, 4, 5, 6], steps
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "failed" and result["retried"] is False, result


def assert_loads(policy_dir: Path, scratch: Path) -> None:
    """The checkpoint's DCP files read back into one torch file with the model's weights."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from policy.checkpoint import read_done

    assert read_done(policy_dir)["step"] == 3
    dcp_to_torch_save(policy_dir, scratch / "step_3.pt")
    state = torch.load(scratch / "step_3.pt", weights_only=False)
    weights = [v for k, v in state["model"].items() if isinstance(v, torch.Tensor)]
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights)
