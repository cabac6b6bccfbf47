"""Entry point of a rollout process: `python -m rollout --run-dir RUN [--replica 0]`."""

import os

from gantry.launch.lifeline import watch_launcher
from gantry.run.runtime import load_run, parse_worker_args, run_worker, setup_logging


def main() -> None:
    watch_launcher()  # dies with the launcher, even a SIGKILLed one
    args = parse_worker_args("rollout", "Gantry rollout (generator) process")
    if args.cpus:
        # Before torch loads: its thread pool (and vLLM's CPU binding) size to these cores.
        os.sched_setaffinity(0, args.cpus)
    setup_logging("rollout")
    # vLLM logs every request batch and cache reset at INFO; its warnings and errors remain.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    config, info = load_run(args.run_dir)
    from rollout.worker import RolloutWorker  # vLLM and torch load after argument parsing

    run_worker(
        "rollout", args.replica, info, lambda: RolloutWorker(config, info, args.replica).run()
    )


if __name__ == "__main__":
    main()
