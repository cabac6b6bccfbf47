"""What every process of a run shares: the run directory and its files, logging, heartbeats,
the worker process boundary, and the naming of checkpoint and export folders."""
