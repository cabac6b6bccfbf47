"""Entry point of the controller: `python -m controller --run-dir RUN`. Never imports torch."""

import sys
import traceback

from gantry.launch.lifeline import watch_launcher
from gantry.run.runtime import (
    ALWAYS_RECUR,
    EXIT_BAD_INPUT,
    EXIT_RUN_FAILED,
    RECUR_AT_START,
    is_deterministic,
    load_run,
    parse_worker_args,
    record_fatal,
    setup_logging,
)


def main() -> None:
    watch_launcher()  # dies with the launcher, even a SIGKILLed one
    args = parse_worker_args("controller", "Gantry controller process")
    log = setup_logging("controller")
    config, info = load_run(args.run_dir)
    from controller.controller import Controller, RunFailed

    started = False
    try:  # the controller runs the plan of the config's algorithm (GRPO or SFT)
        controller = Controller(config, info)
        started = True
        sys.exit(controller.run())
    except RunFailed as exc:  # the process boundary: one clear line for the launcher
        log.error("run failed: %s", exc)
        sys.exit(EXIT_RUN_FAILED)
    except (*ALWAYS_RECUR, *RECUR_AT_START, OSError) as exc:  # OSError: a full disk
        if not is_deterministic(exc, started=started):
            raise  # the controller's own death: the launcher starts it again
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()  # for the log file; the console gets the line below
        record_fatal(info, "controller", error)
        log.error("controller failed: %s", error)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
