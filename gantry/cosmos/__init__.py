"""The cosmos-rl compatibility layer: dataset scripts written for cosmos-rl run unmodified.

`gantry.data.plugin.load_dataset_script` hands a script that imports `cosmos_rl` to
`load_cosmos_script`, which runs it as `__main__` with Gantry's `cosmos_rl` modules and returns
plain callables (`CosmosParts`) for Gantry's dataset API. See docs/cosmos-rl.md.

- `config`   cosmos-rl's `Config`: the run config under cosmos-rl's names, unknown keys kept
- `modules`  the `cosmos_rl.*` modules provided while the script runs; `launch_worker` capture
- `packers`  the built-in data packers, and the check that a user packer only forwards
- `samples`  datasets -> Gantry samples, reward functions with cosmos-rl's signature
- `script`   detection (ast) and running the script
"""

from gantry.cosmos.samples import CosmosError
from gantry.cosmos.script import CosmosParts, is_cosmos_script, load_cosmos_script

__all__ = ["CosmosError", "CosmosParts", "is_cosmos_script", "load_cosmos_script"]
