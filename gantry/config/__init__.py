"""The run configuration: what a run is asked to do, from TOML to a validated `GantryConfig`.

- `schema`      the whole config (`GantryConfig`) and its small sections ([logging], [custom]...)
- `training`    [train] and its sub-sections; `replicas` [policy] and [rollout]; `fields` shared types
- `cluster`     Gantry's own sections for the machines: `[redis]`, `[fault_tolerance]`, `[slurm]`
- `cosmos_keys` cosmos-rl keys outside the schema: moved, refused, or accepted as hints
- `loader`      the TOML loader, dotted overrides, error messages, the resolved-config files

Everything a caller needs is exported here: `from gantry.config import load_config, GantryConfig`.
Imports no torch: the launcher and the controller must start fast.
"""

from gantry.config.loader import (
    ConfigError,
    ConfigWarning,
    config_to_dict,
    config_to_toml,
    describe_errors,
    load_config,
    read_resolved_config,
    write_resolved_config,
)
from gantry.config.schema import GantryConfig

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "GantryConfig",
    "config_to_dict",
    "config_to_toml",
    "describe_errors",
    "load_config",
    "read_resolved_config",
    "write_resolved_config",
]
