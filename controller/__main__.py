"""Entry point of the controller: `python -m controller --run-dir RUN`. Never imports torch."""

import sys

from gantry.run.runtime import EXIT_RUN_FAILED, load_run, parse_worker_args, setup_logging


def main() -> None:
    args = parse_worker_args("controller", "Gantry controller process")
    setup_logging("controller")
    config, info = load_run(args.run_dir)
    from controller.controller import Controller, RunFailed

    try:  # the controller runs the plan of the config's algorithm (GRPO or SFT)
        sys.exit(Controller(config, info).run())
    except RunFailed as exc:  # the process boundary: one clear line for the launcher
        print(f"run failed: {exc}", flush=True)
        sys.exit(EXIT_RUN_FAILED)


if __name__ == "__main__":
    main()
