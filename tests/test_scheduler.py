"""Prompt order, retries, staleness and batching of the controller, without Redis."""

import json

from controller.scheduler import PromptQueue, RolloutBuffer, task_of
from gantry.comm.protocol import RolloutGroup, Sample


def group(prompt_id: str, version: int) -> RolloutGroup:
    sample = Sample(token_ids=[1], logprobs=[-1.0], reward=0.0, finish_reason="stop")
    return RolloutGroup(
        prompt_id=prompt_id,
        replica="0",
        policy_version=version,
        prompt_token_ids=[0],
        samples=[sample],
    )


def drain(queue: PromptQueue) -> list:
    out = []
    while (task := queue.next()) is not None:
        out.append(task)
    return out


def test_queue_is_seeded_epoch_ordered_and_complete():
    tasks = drain(PromptQueue(5, epochs=2, seed=1))
    assert [t.epoch for t in tasks] == [0] * 5 + [1] * 5
    assert sorted(t.index for t in tasks[:5]) == list(range(5))
    assert [t.prompt_id for t in tasks] == [t.prompt_id for t in drain(PromptQueue(5, 2, 1))]
    assert [t.index for t in tasks] != [t.index for t in drain(PromptQueue(5, 2, 2))]


def test_queue_retries_first():
    queue = PromptQueue(3, epochs=1, seed=0)
    first = queue.next()
    queue.retry(first)
    assert queue.next() == first
    assert len(drain(queue)) == 2


def test_peek_shows_the_next_tasks_without_taking_them():
    queue = PromptQueue(dataset_size=5, epochs=2, seed=3)
    taken = [queue.next() for _ in range(3)]
    queue.retry(taken[0])
    ahead = queue.peek(6)  # the retry, the 2 left of epoch 0, 3 of epoch 1
    assert queue.peek(6) == ahead  # nothing taken
    assert [queue.next().index for _ in range(6)] == ahead
    assert len(queue.peek(10)) == 2  # only two tasks are left
    assert queue.peek(10) == [queue.next().index, queue.next().index]
    assert queue.peek(3) == [] and queue.next() is None


def test_task_of_inverts_prompt_id():
    task = task_of("3:17")
    assert (task.epoch, task.index, task.prompt_id) == (3, 17, "3:17")


def test_buffer_accepts_once_and_drops_stale():
    buffer = RolloutBuffer(groups_per_step=2, max_staleness=1)
    assert buffer.add(group("0:0", 5), "e1", version=6) == "accepted"
    assert buffer.add(group("0:0", 6), "e2", version=6) == "duplicate"
    assert buffer.add(group("0:1", 4), "e3", version=6) == "stale"
    assert buffer.stats.dropped_stale == 1 and buffer.stats.duplicates == 1
    batch, expired = buffer.take_batch(version=6)
    assert batch == [] and expired == []
    assert buffer.add(group("0:2", 6), "e4", version=6) == "accepted"
    batch, expired = buffer.take_batch(version=6)
    assert [g.prompt_id for g, _ in batch] == ["0:0", "0:2"]
    assert [e for _, e in batch] == ["e1", "e4"]


def test_buffer_expires_groups_that_waited_too_long():
    buffer = RolloutBuffer(groups_per_step=2, max_staleness=0)
    buffer.add(group("0:0", 0), "e1", version=0)
    batch, expired = buffer.take_batch(version=1)
    assert batch == [] and [g.prompt_id for g, _ in expired] == ["0:0"]
    # an expired prompt may come back (re-generated) and be accepted
    assert buffer.add(group("0:0", 1), "e2", version=1) == "accepted"


def test_queue_state_hands_out_pending_prompts_again_then_the_rest():
    queue = PromptQueue(dataset_size=5, epochs=2, seed=1)
    handed = [queue.next().prompt_id for _ in range(4)]
    expected_rest = []
    probe = PromptQueue(5, 2, 1)
    probe.restore(queue.state(pending=[]))
    while (task := probe.next()) is not None:
        expected_rest.append(task.prompt_id)
    # handed[2] was trained; handed[0], handed[1], handed[3] were still buffered or in flight
    state = queue.state(pending=[handed[3], handed[0], handed[1]])
    resumed = PromptQueue(5, 2, 1)
    resumed.restore(json.loads(json.dumps(state)))
    order = []
    while (task := resumed.next()) is not None:
        order.append(task.prompt_id)
    pending = sorted([handed[0], handed[1], handed[3]], key=lambda p: tuple(map(int, p.split(":"))))
    assert order == pending + expected_rest
    assert sorted(order + [handed[2]]) == sorted(handed + expected_rest)  # each prompt once


def test_queue_state_stays_small_however_large_the_dataset():
    queue = PromptQueue(dataset_size=200_000, epochs=2, seed=3)
    for _ in range(150_000):
        queue.next()
    queue.retry(task_of("0:7"))
    state = json.loads(json.dumps(queue.state()))
    assert len(json.dumps(state)) < 200
    resumed = PromptQueue(200_000, 2, 3)
    resumed.restore(state)
    for _ in range(60_000):  # the retry, the rest of epoch 0, into epoch 1
        assert resumed.next() == queue.next()
