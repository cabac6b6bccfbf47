"""The control plane against a real redis-server: dispatch, collection, re-delivery, commands."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from gantry.comm.protocol import Keys, PromptTask, RolloutGroup, Sample, Stop, SyncPlan, SyncWeights
from gantry.comm.transport import ControlPlane, Latencies, latency_ms, percentile, sent_ms

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
KEYS = Keys("test")


def tasks(n):
    return [PromptTask(prompt_id=f"0:{i}", epoch=0, index=i) for i in range(n)]


def result_for(task: PromptTask, replica: str) -> RolloutGroup:
    sample = Sample(token_ids=[task.index], logprobs=[-1.0], reward=1.0, finish_reason="stop")
    return RolloutGroup(
        prompt_id=task.prompt_id,
        replica=replica,
        policy_version=0,
        prompt_token_ids=[1],
        samples=[sample],
    )


def serve(plane: ControlPlane, deliveries, replica: str) -> None:
    results = [result_for(d.message, replica) for d in deliveries]
    plane.ack_and_send(
        KEYS.prompts("0"), "rollout", [d.entry_id for d in deliveries], KEYS.rollouts, results
    )


def collect(plane: ControlPlane, expected: int) -> list[RolloutGroup]:
    plane.ensure_group(KEYS.rollouts, "controller")
    got = []
    deadline = time.monotonic() + 10
    while len(got) < expected and time.monotonic() < deadline:
        for d in plane.read_group([KEYS.rollouts], "controller", "controller", 100, 100):
            got.append(d.message)
            plane.ack(d.stream, "controller", [d.entry_id])
    return got


def pending(plane: ControlPlane, stream: str, group: str) -> int:
    return plane.redis.xpending(stream, group)["pending"]


def wait_for(condition, what: str, timeout_s: float = 10.0) -> float:
    """Poll `condition()` until it is true; the seconds it took. Fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not after {timeout_s} s"
        time.sleep(0.005)
    return time.monotonic() - started


def all_idle(plane: ControlPlane, stream: str, group: str, min_idle_ms: int) -> bool:
    """True when every entry pending in `group` was delivered at least `min_idle_ms` ago."""
    entries = plane.redis.xpending_range(stream, group, "-", "+", 100)
    return all(e["time_since_delivered"] >= min_idle_ms for e in entries)


def reader_blocked(plane: ControlPlane) -> bool:
    """True when some client of the server is blocked in XREADGROUP."""
    return any(
        c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
        for c in plane.redis.client_list()
    )


def test_dispatch_and_collect_each_prompt_once(redis_url):
    plane = ControlPlane(redis_url)
    plane.ensure_group(KEYS.prompts("0"), "rollout")
    plane.send_many(KEYS.prompts("0"), tasks(10))
    while batch := plane.read_group([KEYS.prompts("0")], "rollout", "r0", 4, 100):
        serve(plane, batch, "0")
    got = collect(plane, 10)
    assert sorted(g.prompt_id for g in got) == sorted(t.prompt_id for t in tasks(10))
    assert pending(plane, KEYS.prompts("0"), "rollout") == 0
    assert pending(plane, KEYS.rollouts, "controller") == 0


CONSUMER = textwrap.dedent(
    """
    import sys, time
    from gantry.comm.protocol import Keys
    from gantry.comm.transport import ControlPlane
    plane = ControlPlane(sys.argv[1])
    got = plane.read_group([Keys("test").prompts("0")], "rollout", "dies", 3, 5000)
    print(" ".join(d.message.prompt_id for d in got), flush=True)
    time.sleep(60)  # "generating" when it is killed
    """
)


def test_prompt_of_a_consumer_killed_mid_prompt_is_redelivered_once(redis_url):
    plane = ControlPlane(redis_url)
    plane.ensure_group(KEYS.prompts("0"), "rollout")
    plane.send_many(KEYS.prompts("0"), tasks(8))
    victim = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, redis_url], stdout=subprocess.PIPE, text=True
    )
    try:
        held = victim.stdout.readline().split()
    finally:
        victim.kill()  # by pid: only the process this test started
        victim.wait()
    assert len(held) == 3
    assert pending(plane, KEYS.prompts("0"), "rollout") == 3
    # A live consumer takes over what the dead one held, then the rest of the stream.
    wait_for(lambda: all_idle(plane, KEYS.prompts("0"), "rollout", 10), "entries idle 10 ms")
    claimed = plane.claim_stale(KEYS.prompts("0"), "rollout", "survivor", min_idle_ms=10, count=10)
    assert sorted(d.message.prompt_id for d in claimed) == sorted(held)
    serve(plane, claimed, "survivor")
    while batch := plane.read_group([KEYS.prompts("0")], "rollout", "survivor", 4, 100):
        serve(plane, batch, "survivor")
    got = collect(plane, 8)
    ids = [g.prompt_id for g in got]
    assert sorted(ids) == sorted(t.prompt_id for t in tasks(8))  # none lost, none twice
    assert pending(plane, KEYS.prompts("0"), "rollout") == 0


def test_restarted_consumer_reads_its_own_pending_first(redis_url):
    plane = ControlPlane(redis_url)
    plane.ensure_group(KEYS.prompts("0"), "rollout")
    plane.send_many(KEYS.prompts("0"), tasks(3))
    first = plane.read_group([KEYS.prompts("0")], "rollout", "r0", 2, 100)
    again = ControlPlane(redis_url).read_own_pending(KEYS.prompts("0"), "rollout", "r0", 10)
    assert [d.entry_id for d in again] == [d.entry_id for d in first]


def test_commands_are_read_in_order_once(redis_url):
    plane = ControlPlane(redis_url)
    stream = KEYS.commands("rollout", "0")
    assert plane.read_next(stream, block_ms=None) == []
    plan = SyncPlan(group="g", host="127.0.0.1", port=1, receivers=[], timeout_s=1.0)
    plane.send(stream, SyncWeights(version=1, plan=plan))
    plane.send(stream, SyncWeights(version=2, plan=plan))
    plane.send(stream, Stop())
    got = plane.read_next(stream, block_ms=100)
    assert got == [SyncWeights(version=1, plan=plan), SyncWeights(version=2, plan=plan), Stop()]
    assert plane.read_next(stream, block_ms=None) == []


def test_heartbeat_expires(redis_url):
    plane = ControlPlane(redis_url)
    started = time.monotonic()
    plane.beat(KEYS.heartbeat("policy", "0"), ttl_s=0.2)
    assert plane.alive(KEYS.heartbeat("policy", "0"))
    wait_for(lambda: not plane.alive(KEYS.heartbeat("policy", "0")), "heartbeat expiry")
    assert time.monotonic() - started >= 0.19  # not before its TTL (Redis's ms clock)


def test_a_blocked_reader_wakes_to_the_whole_burst(redis_url):
    """A rollout replica waiting for prompts gets the controller's whole dispatch at once, not
    a first batch of one prompt."""
    plane = ControlPlane(redis_url)
    stream = KEYS.prompts("0")
    plane.ensure_group(stream, "rollout")
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(
            ControlPlane(redis_url).read_group([stream], "rollout", "r0", 32, 5000)
        )
    )
    reader.start()
    wait_for(lambda: reader_blocked(plane), "the reader blocked in XREADGROUP")
    plane.send_many(stream, tasks(32))
    reader.join()
    assert len(got) == 32


def test_latency_is_the_time_since_the_entry_id_and_percentiles_take_nearest_ranks():
    assert sent_ms("1700000000123-4") == 1_700_000_000_123
    assert latency_ms("1700000000123-0", now_s=1_700_000_000.5) == pytest.approx(377.0)
    assert latency_ms("1700000000123-0", now_s=1_700_000_000.0) == 0.0  # clock behind: 0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile([], 50)) == (50, 99, 0)
    assert percentile([3.0], 99) == 3.0
    latencies = Latencies()
    latencies.handled(f"{int(time.time() * 1000) - 40}-0")
    (taken,) = latencies.take()
    assert 40 <= taken < 10_000 and latencies.take() == []


def test_a_replica_waiting_for_prompts_wakes_to_a_command(redis_url):
    """One XREADGROUP on the prompt and command streams together: an order reaches a replica
    that waits for prompts (a long block) without any prompt coming."""
    plane = ControlPlane(redis_url)
    prompts, commands = KEYS.prompts("0"), KEYS.commands("rollout", "0")
    for stream in (prompts, commands):
        plane.ensure_group(stream, "rollout")
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(
            ControlPlane(redis_url).read_group([prompts, commands], "rollout", "r0", 8, 30_000)
        )
    )
    reader.start()
    wait_for(lambda: reader_blocked(plane), "the reader blocked in XREADGROUP")
    plane.send(commands, Stop(reason="test"))
    reader.join(timeout=20)
    assert not reader.is_alive(), "the command did not wake the reader"
    (delivery,) = got
    assert delivery.stream == commands and delivery.message == Stop(reason="test")
    assert delivery.latency_ms() >= 0
    # Pending until acknowledged, like a prompt: a command is not lost with its reader.
    assert [d.message for d in plane.read_own_pending(commands, "rollout", "r0", 8)] == [
        Stop(reason="test")
    ]


def test_an_idle_policy_handles_a_command_as_it_lands(redis_url):
    """The policy's loop (PolicyWorker._serve) blocks on its command stream: a command sent
    while it is idle is handled and its latency recorded; Stop then ends the loop."""
    from types import MethodType, SimpleNamespace

    from gantry.comm.protocol import Validate
    from policy.worker import PolicyWorker

    handled = threading.Event()
    worker = SimpleNamespace(
        plane=ControlPlane(redis_url), keys=KEYS, weights=None, sync_error=None,
        latencies=Latencies(), activity=SimpleNamespace(set=lambda *a: None),
        _handle=lambda command: handled.set(), _report_checkpoints=lambda: None,
        _finish_checkpoints=lambda: None,
    )  # fmt: skip
    worker._check_sync = MethodType(PolicyWorker._check_sync, worker)
    loop = threading.Thread(target=PolicyWorker._serve, args=(worker,))
    loop.start()
    plane = ControlPlane(redis_url)
    wait_for(
        lambda: any(c.get("cmd") == "xread" for c in plane.redis.client_list()),
        "the policy blocked on its commands",
    )
    plane.send(KEYS.policy_commands, Validate(step=3))
    assert handled.wait(timeout=20), "the command was not handled"
    assert len(worker.latencies.values) == 1
    plane.send(KEYS.policy_commands, Stop(reason="test"))
    loop.join(timeout=20)
    assert not loop.is_alive()


def test_the_control_cost_of_a_step_merges_the_policys_latencies_and_restarts_each_lap():
    from controller.grpo_metrics import ControlCost
    from gantry.comm.transport import Delivery

    cost = ControlCost()
    cost.handled(Delivery("events", f"{int(time.time() * 1000) - 50}-0", None))
    cost.sync_orders += [120.0, 80.0]
    sum(i * i for i in range(200_000))  # some CPU for the controller to have spent
    lap = cost.lap([3.0, 5.0])
    assert lap["control_latency_p50_ms"] == 5.0 and lap["control_latency_p99_ms"] >= 50
    assert lap["sync_order_latency_ms"] == 120.0 and lap["controller_cpu_s"] > 0
    again = cost.lap([])
    assert again["control_latency_p99_ms"] == again["sync_order_latency_ms"] == 0.0
