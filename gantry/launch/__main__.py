"""`python -m gantry.launch --config rl.toml dataset.py [key=value ...]`: what launch.sh runs."""

import os
import sys

from gantry.launch.launcher import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main())
