"""The rules of the house that code review alone would let slip (see DESIGN.md): who imports
whom, no import circles, and the size budgets of files and functions."""

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("controller", "policy", "rollout")
PACKAGES = ("gantry", *ROLES)
# Every Python file of the project: the packages, the example scripts, benchmarks, tests.
SOURCE_FOLDERS = (*PACKAGES, "datasets", "bench", "scripts")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_BROAD_EXCEPT_PER_1000_LINES = 0.3


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def own_imports(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c`: c is a module of a.b, or a name defined in a.b
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in python_files(*PACKAGES)}
    return {name: own_imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def sub_package(module: str) -> str:
    parts = module.split(".")
    # gantry.config (its __init__) is the sub-package gantry.config, not part of "gantry".
    return ".".join(parts[:2]) if parts[0] == "gantry" and len(parts) >= 2 else parts[0]


def test_roles_never_import_each_other_and_gantry_imports_no_role():
    for module, imported in import_graph().items():
        top = module.split(".")[0]
        others = {m.split(".")[0] for m in imported} - {top, "gantry"}
        assert not others, f"{module} imports {sorted(others)}"


def test_no_import_circle_between_modules():
    assert find_cycle(import_graph()) is None, f"import circle: {find_cycle(import_graph())}"


def test_no_import_circle_between_sub_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for module, imported in import_graph().items():
        packages[sub_package(module)].update(sub_package(m) for m in imported)
    graph = {name: deps - {name} for name, deps in packages.items()}
    assert find_cycle(graph) is None, f"sub-package circle: {find_cycle(graph)}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_gantry_is_made_of_sub_packages():
    entry = ("__init__.py", "__main__.py")  # __main__: `python -m gantry plot|status`
    loose = [p.name for p in (ROOT / "gantry").glob("*.py") if p.name not in entry]
    assert not loose, f"gantry/ holds sub-packages only; move {loose} into one"


def test_controller_starts_without_torch():
    code = (
        "import sys, controller.controller, controller.__main__, gantry.launch.launcher; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_no_file_over_the_line_budget():
    long = {
        str(p.relative_to(ROOT)): n
        for p in python_files(*SOURCE_FOLDERS, "tests")
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_the_line_budget():
    long = []
    for path in python_files(*SOURCE_FOLDERS, "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_broad_excepts_are_rare_and_explained():
    lines, broad = 0, []
    for path in python_files(*SOURCE_FOLDERS):
        text = path.read_text().splitlines()
        lines += len(text)
        for number, line in enumerate(text, 1):
            if re.search(r"except\s*(\(.*\b)?(Exception|BaseException)\b|except\s*:", line):
                broad.append((path.relative_to(ROOT), number, line.strip()))
    unexplained = [b for b in broad if "#" not in b[2]]
    assert not unexplained, f"a broad except needs a comment saying why: {unexplained}"
    allowed = MAX_BROAD_EXCEPT_PER_1000_LINES * lines / 1000
    assert len(broad) <= allowed, f"{len(broad)} broad excepts, at most {allowed:.1f}: {broad}"
