"""`python -m gantry plot RUN_DIR` and `python -m gantry status RUN_DIR [--watch]`: look at a run
from outside it (see docs/watching-a-run.md). A run is started with `python -m gantry.launch`
(or launch.sh).
"""

from __future__ import annotations

import argparse
import sys
import time

WATCH_EVERY_S = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gantry",
        description="Look at a run: its metrics as a plot, or what its processes do now. "
        "Start a run with python -m gantry.launch (or launch.sh).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="write RUN_DIR/run.png from RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    status = commands.add_parser(
        "status", help="what every process of a running run does, and who the run waits for"
    )
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.add_argument(
        "--watch",
        action="store_true",
        help=f"refresh every {WATCH_EVERY_S:.0f} s until the run ends",
    )
    args = parser.parse_args(argv)
    if args.command == "plot":
        return _plot(args.run_dir)
    return _status(args.run_dir, args.watch)


def _plot(run_dir: str) -> int:
    from gantry.watch.plot import PlotError, plot_run

    try:
        print(plot_run(run_dir))
    except PlotError as exc:
        print(f"gantry plot: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(run_dir: str, watch: bool) -> int:
    from gantry.watch.status import RunOver, StatusError, open_run, read_status
    from gantry.watch.status_text import render

    try:
        client = open_run(run_dir)
        while True:
            screen = render(read_status(run_dir, client))
            if watch and sys.stdout.isatty():
                screen = "\033[H\033[J" + screen  # cursor home, clear: one screen, redrawn
            print(screen, flush=True)
            if not watch:
                return 0
            time.sleep(WATCH_EVERY_S)
            print()
    except RunOver as over:
        print(over)
        return 0
    except StatusError as exc:
        print(f"gantry status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
