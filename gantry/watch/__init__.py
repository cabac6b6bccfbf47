"""Watching a run from outside it: `python -m gantry plot RUN_DIR` (run.png from metrics.jsonl,
`gantry.watch.plot`) and `python -m gantry status RUN_DIR` (who does what now, and who a
stuck run waits for, read from the run's Redis: `gantry.watch.status`).

Nothing here is imported by a worker; matplotlib is imported only when a plot is drawn.
"""
