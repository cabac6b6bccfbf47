"""Gantry's shared code, one sub-package per concern; the roles (`controller/`, `policy/`,
`rollout/`) import it, and it imports none of them.

- `config`  the run's configuration: schema, TOML loader, cosmos-rl keys, cluster sections
- `launch`  the launcher: node plan, placement, process supervision, SLURM, embedded redis-server
- `run`     what every process of a run shares: run directory files, logging, checkpoint folders
- `data`    the dataset-script API, chat/LLaVA/media loading, scoring of predictions
- `comm`    messages and their codec, the Redis control plane, weight transfer between processes
- `models`  model loading, and the built-in tiny models of the CPU default and the tests
"""
