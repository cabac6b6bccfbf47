"""Print the README's table of config keys from the schema (gantry/config/schema.py).

    .venv/bin/python scripts/config_table.py     # paste between the README's table markers
tests/test_readme.py checks that the README holds exactly this table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel  # noqa: E402

from gantry.config import GantryConfig  # noqa: E402


def rows(model: type[BaseModel], section: str):
    subsections = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            subsections.append((annotation, f"{section}.{name}" if section else name))
            continue
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default.model_dump() if isinstance(default, BaseModel) else default)
        where = f" `[{section}]` " if section else " "
        yield f"|{where}| `{name}` | `{shown}` | {field.description} |"
    for sub, path in subsections:
        yield from rows(sub, path)


def table() -> str:
    head = ["| section | key | default | meaning |", "| --- | --- | --- | --- |"]
    body = list(rows(GantryConfig, ""))
    # Top-level free-form tables ([custom]) come last, as in a TOML file.
    top = [r for r in body if r.startswith("| | ")]
    return "\n".join(head + [r for r in body if r not in top] + top)


if __name__ == "__main__":
    print(table())
