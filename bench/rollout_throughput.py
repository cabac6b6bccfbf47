"""Benchmark: rollout throughput (generated tokens/s) of the vLLM engine inside Gantry's rollout
worker against the same engine called directly, measured in the same run.

    .venv/bin/python bench/rollout_throughput.py [--prompts 256] [--rounds 5] [--model DIR]
        [--config configs/quickstart-grpo.toml] [--dataset datasets/arithmetic.py]
        [rollout.batch_size=32 ...]

It makes a run directory the way the launcher does (resolved config, `RunInfo`; the built-in
tiny model is built in a temporary directory unless `--model` names one), starts a real
redis-server, and builds one `rollout.worker.RolloutWorker` (which makes its engine with
`make_engine`). On that one engine, in alternation so that both meet the same machine load:
  (a) direct: `worker.engine.generate` on the first `--prompts` dataset prompts, in batches of
      `rollout.batch_size`, with the worker's own sampling settings and seeds; prompt token ids
      are made beforehand, as the worker makes them, and are not timed;
  (b) Gantry: the real worker loop (`worker.run()`, on the main thread as in `python -m
      rollout`) fed the same prompts through its Redis prompt stream by a controller thread that
      keeps up to 2 x batch_size prompts queued, as the controller does, reads the
      `RolloutGroup`s from the rollouts stream, then sends `Stop`. Timed from the first prompt
      sent to the last result read: tokenizing, scoring, Redis included. With `--dispatch
      prefill` (default) the first window is queued before the loop starts, so every batch is
      whole and seeded like the direct one and both sides generate the same tokens; with
      `--dispatch register` it is sent once the worker registered, as the controller does.
Tokens/s = tokens generated / seconds. A warm-up round of each side comes first; it prints the
medians, whether both sides generated the same tokens, the worker's batch sizes, the gap split
into the worker's time outside `engine.generate` and generate's own speed on each side, and the
median of the per-round ratios (each round's two sides run back to back) against the goal:
Gantry >= 0.95x of direct. Other jobs on the machine make the rounds differ; it warns when they
differ by more than 20%.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `gantry` and `rollout` importable

GOAL_RATIO = 0.95
NOISY_SPREAD = 0.2  # direct rounds further apart than this: the machine was busy
GROUP = "bench"  # the bench's consumer group on the rollouts stream (the controller's role)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256, help="prompts per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each side")
    parser.add_argument(
        "--dispatch",
        choices=("prefill", "register"),
        default="prefill",
        help="prefill: queue the first prompts before the worker loop starts, so batches and "
        "seeds match the direct side; register: send them once the worker registered, as the "
        "controller does",
    )
    parser.add_argument("--model", help="HF model directory (default: the built-in tiny model)")
    parser.add_argument("--config", default=str(ROOT / "configs/quickstart-grpo.toml"))
    parser.add_argument("--dataset", default=str(ROOT / "datasets/arithmetic.py"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.batch_size=32")
    return parser.parse_args()


def make_run(args: argparse.Namespace, scratch: Path, redis_url: str):
    """A run directory as the launcher writes it; returns (config, info) read back from it."""
    from gantry.config import load_config, write_resolved_config
    from gantry.data.plugin import load_dataset_script
    from gantry.launch.launcher import resolve_model
    from gantry.launch.placement import resolve_parallelism
    from gantry.run.runtime import RunInfo, load_run

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"policy.model_name_or_path={args.model}")
    config = resolve_parallelism(load_config(args.config, overrides))
    script = load_dataset_script(args.dataset)
    size = len(script.load_samples(config.custom))
    if args.prompts > size:
        sys.exit(f"error: --prompts {args.prompts} > the dataset's {size} samples")
    run_dir = scratch / "run"
    run_dir.mkdir()
    write_resolved_config(config, run_dir / "config.json")
    RunInfo(
        run_id="bench",
        run_dir=str(run_dir),
        redis_url=redis_url,
        dataset_script=str(script.path),
        dataset_size=size,
        model_path=resolve_model(config.policy.model_name_or_path, scratch),
    ).write()
    return load_run(str(run_dir))


def record_calls(worker) -> list[tuple[int, float]]:
    """Wrap the worker's engine.generate to record (prompts, seconds) of each call."""
    calls: list[tuple[int, float]] = []
    generate = worker.engine.generate

    def recording(prompts, sampling):
        started = time.perf_counter()
        out = generate(prompts, sampling)
        calls.append((len(prompts), time.perf_counter() - started))
        return out

    worker.engine.generate = recording
    return calls


def direct_round(worker, batches: list[list]) -> tuple[float, dict]:
    """(seconds, token ids by prompt id) of the engine called directly on `batches`, each a
    list of (task, prompt token ids)."""
    engine = worker.engine
    tokens = {}
    started = time.perf_counter()
    for batch in batches:
        tasks = [task for task, _ in batch]
        outputs = engine.generate([ids for _, ids in batch], worker._sampling(tasks))
        for task, completions in zip(tasks, outputs, strict=True):
            tokens[task.prompt_id] = [c.token_ids for c in completions]
    return time.perf_counter() - started, tokens


class Controller:
    """The controller's side of one Gantry round, for the worker's replica: keeps up to
    `window` prompts queued, reads the results, then sends Stop.

    Results are decoded after the round: this thread shares the worker's GIL (the real
    controller is another process), and decoding them meanwhile cost the worker ~10 ms a
    round of 256 prompts here.
    """

    def __init__(self, worker, tasks: list, window: int) -> None:
        from gantry.comm.transport import ControlPlane

        self.plane = ControlPlane(worker.info.redis_url)
        self.keys, self.replica = worker.keys, worker.replica
        self.tasks, self.window, self.sent = tasks, window, 0
        self.results: list[bytes] = []  # encoded RolloutGroups
        self.started = self.finished = 0.0
        self.error: BaseException | None = None
        self.abandoned = False  # set when the worker loop failed: stop waiting for results
        for stream in (self.keys.rollouts, self.keys.events):
            self.plane.ensure_group(stream, GROUP)
            self.plane.redis.xgroup_setid(stream, GROUP, "$")  # skip earlier rounds' messages

    def top_up(self) -> None:
        if not self.started:
            self.started = time.perf_counter()
        room = self.window - (self.sent - len(self.results))
        batch = self.tasks[self.sent : self.sent + max(room, 0)]
        if batch:
            self.plane.send_many(self.keys.prompts(self.replica), batch)
            self.sent += len(batch)

    def run(self, wait_for_register: bool) -> None:
        from gantry.comm.protocol import Register, Stop

        try:
            while wait_for_register:  # as the controller: dispatch once the replica registered
                events = self.plane.read_group([self.keys.events], GROUP, GROUP, 16, 200)
                wait_for_register = not any(isinstance(e.message, Register) for e in events)
            self.top_up()
            streams = {self.keys.rollouts: ">"}
            while len(self.results) < len(self.tasks) and not self.abandoned:
                reply = self.plane.redis.xreadgroup(GROUP, GROUP, streams, count=256, block=200)
                entries = [entry for _stream, entries in reply or [] for entry in entries]
                self.results += [fields[b"m"] for _id, fields in entries]
                self.plane.ack(self.keys.rollouts, GROUP, [entry_id for entry_id, _ in entries])
                self.top_up()
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self.error = exc
        finally:
            self.finished = time.perf_counter()
            stop = Stop(reason="bench round done")
            self.plane.send(self.keys.commands("rollout", self.replica), stop)

    def tokens(self) -> dict:
        """Token ids of each result's samples, by prompt id."""
        from gantry.comm.protocol import decode

        groups = [decode(data) for data in self.results]
        return {g.prompt_id: [s.token_ids for s in g.samples] for g in groups}


def gantry_round(worker, tasks: list, window: int, dispatch: str) -> tuple[float, dict]:
    """(seconds, token ids by prompt id) of the worker loop fed `tasks` through Redis."""
    controller = Controller(worker, tasks, window)
    if dispatch == "prefill":
        controller.top_up()  # queued before the loop first reads: every batch is whole
    thread = threading.Thread(
        target=controller.run, args=(dispatch == "register",), name="bench-controller"
    )
    thread.start()
    worker.stopping = False  # run() again for this round (a Stop ended the last one)
    try:
        worker.run()
    finally:
        controller.abandoned = True  # only matters if run() raised: the results are all in
        thread.join()
    controller.plane.close()
    if controller.error is not None:
        raise controller.error
    return controller.finished - controller.started, controller.tokens()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # as `python -m rollout` does
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    from gantry.launch.redis_server import RedisServer

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gantry-bench-rollout-") as tmp:
        scratch = Path(tmp)
        with RedisServer(scratch / "redis") as server:
            config, info = make_run(args, scratch, server.url)
            from rollout.worker import RolloutWorker  # vLLM loads here

            started = time.perf_counter()
            worker = RolloutWorker(config, info, "0")
            startup = time.perf_counter() - started
            try:
                figures = measure(args, worker)
            finally:
                worker.engine.close()
                worker.plane.close()
    figures.update(startup=startup, load=(load_before, os.getloadavg()[0]))
    report(args, config, figures)


def measure(args: argparse.Namespace, worker) -> dict:
    """Warm-up, then `args.rounds` rounds of each side in alternating order."""
    from gantry.comm.protocol import PromptTask

    size = worker.config.rollout.batch_size
    tasks = [PromptTask(prompt_id=f"0:{i}", epoch=0, index=i) for i in range(args.prompts)]
    prompts = worker.prompts_of.build(worker.samples, [t.index for t in tasks], worker.script.path)
    pairs = list(zip(tasks, prompts, strict=True))
    batches = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    calls = record_calls(worker)
    window = 2 * size  # the controller keeps up to twice a batch queued at each replica
    figures: dict = {key: {"direct": [], "gantry": []} for key in ("times", "tokens", "generate")}
    figures["identical"] = True
    for run in range(args.rounds + 1):  # run 0: warm-up
        produced = {}
        for side in ("direct", "gantry") if run % 2 == 0 else ("gantry", "direct"):
            calls.clear()
            if side == "direct":
                seconds, produced[side] = direct_round(worker, batches)
            else:
                seconds, produced[side] = gantry_round(worker, tasks, window, args.dispatch)
                figures["batches"] = [prompts for prompts, _ in calls]
            figures["times"][side].append(seconds)
            figures["generate"][side].append(sum(t for _, t in calls))
            figures["tokens"][side].append(
                sum(len(ids) for g in produced[side].values() for ids in g)
            )
        figures["identical"] &= produced["direct"] == produced["gantry"]
    for key in ("times", "tokens", "generate"):
        for series in figures[key].values():
            del series[0]  # the warm-up
    return figures


def report(args: argparse.Namespace, config, figures: dict) -> None:
    rollout, times, generate = config.rollout, figures["times"], figures["generate"]
    print(
        f"model: {config.policy.model_name_or_path}; {args.prompts} prompts x "
        f"n_generation {rollout.n_generation}, max_response_length "
        f"{rollout.max_response_length}, batch_size {rollout.batch_size}; "
        f"{args.rounds} rounds each after a warm-up; engine start-up {figures['startup']:.1f}s"
    )
    rates = {side: _ratios(figures["tokens"][side], times[side]) for side in times}
    for side, label in (("direct", "direct engine.generate"), ("gantry", "Gantry RolloutWorker")):
        tokens = sorted(set(figures["tokens"][side]))
        print(
            f"{label:<24} tokens {'/'.join(map(str, tokens))}  median "
            f"{statistics.median(times[side]):.3f}s  median {statistics.median(rates[side]):.0f} "
            f"tok/s  [{', '.join(f'{r:.0f}' for r in rates[side])}]"
        )
    same = "yes" if figures["identical"] else "NO"
    print(f"same tokens on both sides, every prompt and sample, every round: {same}")
    print(f"worker generate calls (prompts each), last Gantry round: {figures['batches']}")
    # The gap in two parts, each timed within one round: less sensitive to other jobs.
    outside = [t - g for t, g in zip(times["gantry"], generate["gantry"], strict=True)]
    share = statistics.median(_ratios(outside, times["gantry"]))
    print(
        f"Gantry time outside engine.generate (tokenize, score, Redis, loop): median "
        f"{statistics.median(outside) * 1000:.0f} ms a round, "
        f"{statistics.median(outside) / len(figures['batches']) * 1000:.1f} ms a batch, "
        f"{share:.1%} of the round (at equal generate speed: {1 - share:.3f}x)"
    )
    slower = statistics.median(_ratios(generate["gantry"], generate["direct"]))
    print(f"engine.generate seconds of a round, median gantry / direct: {slower:.3f}x")
    print("machine load (1-min average) before / after: {:.2f} / {:.2f}".format(*figures["load"]))
    # Each round's sides ran back to back: their ratio cancels load that drifts between rounds.
    paired = _ratios(rates["gantry"], rates["direct"])
    ratio = statistics.median(paired)
    print(f"per-round ratios gantry / direct: [{', '.join(f'{r:.3f}' for r in paired)}]")
    spread = max(rates["direct"]) / min(rates["direct"]) - 1
    if spread > NOISY_SPREAD:
        print(
            f"warning: direct tok/s varied by {spread:.0%} between rounds: other jobs share the "
            "machine, so the ratio is unreliable; re-run when it is quiet, or with more --rounds"
        )
    verdict = "PASS" if ratio >= GOAL_RATIO else "FAIL"
    print(
        f"median per-round ratio gantry / direct (tokens/s): {ratio:.3f}x "
        f"(goal >= {GOAL_RATIO}x): {verdict}"
    )


def _ratios(numerators: list, denominators: list) -> list[float]:
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


if __name__ == "__main__":
    main()
