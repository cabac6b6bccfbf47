"""The rules of the house that code review alone would let slip (see DESIGN.md)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("controller", "policy", "rollout")


def imported_packages(folder: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update((path.name, a.name.split(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((path.name, node.module.split(".")[0]))
    return found


def test_roles_never_import_each_other_and_gantry_imports_no_role():
    for role in ROLES:
        others = set(ROLES) - {role}
        assert not {(f, m) for f, m in imported_packages(role) if m in others}, role
    assert not {(f, m) for f, m in imported_packages("gantry") if m in ROLES}


def test_controller_starts_without_torch():
    code = (
        "import sys, controller.controller, controller.__main__, gantry.launcher; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
