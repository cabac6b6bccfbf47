"""sbatch's reading of a batch script, written out for the SLURM tests (tests/test_slurm*.py):
the words of an #SBATCH line, the options of a script's header, and a check of each option's
value against the forms sbatch accepts, independently of gantry.launch.slurm."""

from __future__ import annotations

import re


def split_directive(text: str) -> list[str]:
    """The words of an #SBATCH line as sbatch reads them: blanks split, double quotes group,
    a backslash escapes the next character, '#' outside quotes starts a comment."""
    words, word, quoted, escaped, in_word = [], "", False, False, False
    for char in text:
        if escaped:
            word, escaped, in_word = word + char, False, True
        elif char == "\\":
            escaped = in_word = True
        elif char == '"':
            quoted, in_word = not quoted, True
        elif char == "#" and not quoted:
            break
        elif char.isspace() and not quoted:
            if in_word:
                words.append(word)
            word, in_word = "", False
        else:
            word, in_word = word + char, True
    assert not quoted, f"unbalanced quote in #SBATCH{text}"
    return [*words, word] if in_word else words


def sbatch_options(script: str) -> list[tuple[str, str | None]]:
    """(option, value) of each #SBATCH option, read like sbatch: only #SBATCH lines that come
    before the first command count (comments and blank lines may sit between them)."""
    lines = script.splitlines()
    assert lines[0].startswith("#!"), "sbatch wants an interpreter line first"
    options = []
    for line in lines[1:]:
        if line.startswith("#SBATCH"):
            for word in split_directive(line[len("#SBATCH") :]):
                name, sep, value = word.partition("=")
                options.append((name, value if sep else None))
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return options


_COUNT = re.compile(r"[1-9]\d*")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# sbatch's --time forms, written out independently of gantry.launch.slurm's validator.
_TIME = re.compile(r"\d+|\d+:\d\d|\d+:\d\d:\d\d|\d+-\d\d?|\d+-\d\d?:\d\d|\d+-\d\d?:\d\d:\d\d")
SBATCH_LONG_OPTIONS = {  # option -> check of its value (None: a flag that takes no value)
    "--job-name": _NAME.fullmatch,
    "--nodes": re.compile(r"[1-9]\d*(-[1-9]\d*)?").fullmatch,
    "--ntasks-per-node": _COUNT.fullmatch,
    "--gpus-per-node": re.compile(r"([A-Za-z0-9_]+:)?[1-9]\d*").fullmatch,
    "--cpus-per-task": _COUNT.fullmatch,
    "--partition": re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*").fullmatch,
    "--account": _NAME.fullmatch,
    "--time": _TIME.fullmatch,
    "--output": lambda v: v.startswith("/") and "%j" in v,
    "--error": lambda v: v.startswith("/") and "%j" in v,
    "--qos": _NAME.fullmatch,
    "--mail-type": re.compile(r"(NONE|BEGIN|END|FAIL|ALL)(,(BEGIN|END|FAIL|ALL))*").fullmatch,
    "--exclusive": None,
    "--mem": re.compile(r"\d+[KMGT]?").fullmatch,
    "--requeue": None,
    "--no-requeue": None,
}


def check_sbatch_header(script: str) -> dict[str, str | None]:
    options = sbatch_options(script)
    names = [name for name, _ in options]
    assert len(names) == len(set(names)), f"an option is given twice: {names}"
    for name, value in options:
        assert name in SBATCH_LONG_OPTIONS, f"{name} is not an sbatch option we expect"
        check = SBATCH_LONG_OPTIONS[name]
        if check is None:
            assert value is None, f"{name} takes no value, got {value!r}"
        else:
            assert value is not None and check(value), f"{name}: bad value {value!r}"
    return dict(options)
