"""The controller's journal against a real redis-server: a pass's writes land with its state
snapshot or not at all, unacknowledged entries come back for a restarted controller in the order they were added,
and metrics.jsonl is repaired from the journal after a crash."""

from __future__ import annotations

import json

import pytest

from controller import journal
from gantry.comm.protocol import Keys, PromptTask, Stop
from gantry.comm.transport import ControlPlane

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
KEYS = Keys("run")


def test_a_pass_lands_whole_at_commit_or_not_at_all(redis_url):
    plane = ControlPlane(redis_url)
    out = journal.Outbox(plane, KEYS)
    out.send(KEYS.policy_commands, Stop())
    out.set(KEYS.sync_called_off("g", 1), b"1", ex=60)
    out.append("rewards", 0.5)
    out.mark("seen", "0:1")
    assert plane.redis.xlen(KEYS.policy_commands) == 0  # nothing before the commit
    out.discard()  # the controller died mid-pass
    out.commit({"step": 1})
    assert plane.redis.xlen(KEYS.policy_commands) == 0
    assert not plane.redis.exists(KEYS.sync_called_off("g", 1))
    assert journal.load_list(plane, KEYS, "rewards") == []
    assert journal.load_state(plane, KEYS) == {"step": 1}

    out.send(KEYS.policy_commands, Stop())
    out.append("rewards", 0.5)
    out.mark("seen", "0:1")
    out.mark("seen", "0:2")
    out.mark("seen", "0:2", present=False)
    out.commit({"step": 2})
    assert plane.read_next(KEYS.policy_commands, block_ms=None) == [Stop()]
    assert journal.load_list(plane, KEYS, "rewards") == [0.5]
    assert journal.load_set(plane, KEYS, "seen") == {"0:1"}
    assert journal.load_state(plane, KEYS) == {"step": 2}
    assert journal.load_state(plane, Keys("another run")) is None


def test_unacknowledged_entries_come_back_in_order(redis_url):
    plane = ControlPlane(redis_url)
    streams = [KEYS.rollouts, KEYS.events]
    for stream in streams:
        plane.ensure_group(stream, "controller")
    for i in range(2500):  # more than one page of pending entries
        task = PromptTask(prompt_id=f"0:{i}", epoch=0, index=i)
        plane.send(streams[i % 7 == 0], task)
    read = []
    while batch := plane.read_group(streams, "controller", "controller", 500, 10):
        read += batch
    assert len(read) == 2500
    out = journal.Outbox(plane, KEYS)
    out.ack(KEYS.rollouts, "controller", [d.entry_id for d in read[:100] if d.stream == streams[0]])
    out.commit({})
    pending = journal.pending_deliveries(plane, streams, "controller", "controller")
    acked = sum(d.stream == streams[0] for d in read[:100])
    assert len(pending) == 2500 - acked
    for stream in streams:  # each stream in order, and both interleaved by the time added
        indices = [d.message.index for d in pending if d.stream == stream]
        assert indices == sorted(indices)
    stamps = [int(d.entry_id.split("-")[0]) for d in pending]
    assert stamps == sorted(stamps)


def test_metrics_file_is_repaired_from_the_journal(redis_url, tmp_path):
    plane = ControlPlane(redis_url)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "attempt": 0}\n')  # an earlier attempt's record
    base = journal.lines_in(metrics)
    out = journal.Outbox(plane, KEYS)
    out.mirror("metrics", metrics)
    for step in (1, 2, 3):
        out.append("metrics", {"step": step})
        out.commit({})
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 1, 2, 3]
    # Killed between a commit and its file write: the file lacks the last record.
    metrics.write_text("\n".join(lines[:-1]) + "\n")
    journal.catch_up_mirror(plane, KEYS, "metrics", metrics, base)
    assert metrics.read_text().splitlines() == lines
    journal.catch_up_mirror(plane, KEYS, "metrics", metrics, base)  # nothing twice
    assert metrics.read_text().splitlines() == lines
