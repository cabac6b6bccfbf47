"""The README's config table is the schema's (regenerate with scripts/config_table.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_table_matches_the_schema():
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_table.py")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    assert table in readme, "README config table is stale: run scripts/config_table.py"
