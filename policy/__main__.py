"""Entry point of a policy process: `python -m policy --run-dir RUN [--replica 0]`."""

import os
import sys

from gantry.launch.lifeline import watch_launcher
from gantry.run.runtime import load_run, parse_worker_args, run_worker, setup_logging


def main() -> None:
    watch_launcher()  # dies with the launcher, even a SIGKILLed one
    args = parse_worker_args("policy", "Gantry policy (trainer) process")
    setup_logging("policy")
    config, info = load_run(args.run_dir)
    from policy.parallel import join_policy_job  # torch loads after argument parsing
    from policy.worker import PolicyWorker

    def run() -> None:
        join_policy_job(info)  # the worker's own init_distributed() then finds the group formed
        PolicyWorker(config, info, args.replica).run()

    run_worker("policy", args.replica, info, run)
    # torch 2.13's gloo can abort at interpreter shutdown ("terminate called without an active
    # exception": its thread frees the last collective's tensors while Python tears down),
    # turning a finished rank into a failed one. Nothing is left to clean up: exit now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
