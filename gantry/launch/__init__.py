"""Launching a run: the launcher and its node plan, placement, process supervision, multi-node
joins, SLURM submission and the embedded redis-server. Imports no torch."""
