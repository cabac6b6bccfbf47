"""The run configuration: the TOML loader with dotted overrides, error messages, serialisations.

The schema (every key Gantry reads) is in `gantry.config.schema`; `gantry.config` exports both. Section
and key names follow cosmos-rl's schema (`[train]`, `[train.train_policy]`, `[train.ckpt]`, `[policy]`, `[policy.parallelism]`,
`[rollout]`, `[rollout.parallelism]`, `[rollout.sampling_config]`, `[logging]`, `[custom]`), so that
cosmos-rl configs load unchanged; `[redis]` is Gantry's own. Loading a config:

    cfg = load_config("configs/quickstart-grpo.toml", ["train.optm_lr=1e-5"])

- cosmos-rl keys (`gantry.config.cosmos_keys`): one that moved between cosmos-rl's releases is
  read at its new place; one that cannot change the result is dropped; one that changes what is
  trained is an error (unless its value is what Gantry does anyway). One warning names the moved
  and dropped keys; `load_config(..., ignored=d)` puts the dropped ones, with values, in `d`
  (the launcher records them in run.json).
- Any other key that belongs to no model is an error naming the key, its section and the closest
  valid key; wrong types and out-of-range values are errors naming the key, what was expected and
  the value given. All problems are collected into one `ConfigError`.
- The launcher writes the validated config to the run directory as JSON (`write_resolved_config`);
  every role reads it back with `read_resolved_config`. `config_to_toml` prints it for `--dry-run`.

Imports no torch: the launcher and the controller must start fast.
"""

from __future__ import annotations

import datetime
import difflib
import json
import re
import tomllib
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from gantry.config.cosmos_keys import HINTS, MOVED, REFUSED, SAME_AS_GANTRY, known_keys
from gantry.config.schema import GantryConfig


class ConfigError(ValueError):
    """A config that cannot be used; str() is ready to print, one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ConfigWarning(UserWarning):
    """Keys read from a cosmos-rl config that Gantry accepts but does not act on."""


# ------------------------------------------------------------------------------------ loading


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    ignored: dict[str, Any] | None = None,
) -> GantryConfig:
    """Read a TOML config (None: all defaults), apply `section.key=value` overrides, validate.

    An override's value is parsed as a TOML value (`3`, `1e-5`, `true`, `["console"]`, `"x"`); if
    that fails, or if the key is a string field, the text is taken as a plain string.
    `ignored`, if given, receives the cosmos-rl keys accepted without effect (dotted key ->
    value), for run.json. Raises ConfigError listing every problem found.
    """
    raw = _read_toml(Path(path)) if path is not None else {}
    notes: list[str] = []
    _take_cosmos_redis_port(raw, notes)
    problems = [problem for text in overrides for problem in _apply_override(raw, text)]
    _move_cosmos_keys(raw, notes, problems)
    dropped: dict[str, Any] = {}
    _check_keys(raw, raw, GantryConfig, "", problems, dropped)
    if dropped:
        notes.insert(
            0, f"ignored cosmos-rl keys that do not change the result: {', '.join(dropped)}"
        )
    if ignored is not None:
        ignored.update(dropped)
    if notes:
        warnings.warn("; ".join(notes), ConfigWarning, stacklevel=2)
    try:
        config = GantryConfig.model_validate(raw)
    except ValidationError as exc:
        problems += describe_errors(exc)
    if problems:
        raise ConfigError(problems)
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror}"]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None


def _take_cosmos_redis_port(raw: dict[str, Any], notes: list[str]) -> None:
    """cosmos-rl has a top-level `redis = "12800"` (its server's port): read it as [redis] port."""
    value = raw.get("redis")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not (value == "" or value.isdigit()):
        return  # a table, or a value pydantic reports as "expected a table"
    del raw["redis"]
    if value == "":  # cosmos-rl's default: let the launcher choose
        notes.append('ignored cosmos-rl\'s top-level redis = ""')
        return
    raw["redis"] = {"port": int(value)}
    notes.append(f"read cosmos-rl's top-level redis = {value!r} as [redis] port = {int(value)}")


def _move_cosmos_keys(raw: dict[str, Any], notes: list[str], problems: list[str]) -> None:
    """Read keys that the current cosmos-rl release moved (`MOVED`) at their new place."""
    for old, new in MOVED.items():
        *old_path, old_key = old.split(".")
        parent = _section(raw, old_path)
        if parent is None or old_key not in parent:
            continue
        value = parent.pop(old_key)
        *new_path, new_key = new.split(".")
        target = _section(raw, new_path, create=True)
        if target is None:
            problems.append(f"{old}: moved to {new}, but {'.'.join(new_path)} is not a table")
        elif new_key in target and target[new_key] != value:
            problems.append(
                f"{old} = {_show(value)} and {new} = {_show(target[new_key])} disagree: {old} "
                f"is cosmos-rl's old place of {new}; keep only {new}"
            )
        elif value is None:  # cosmos-rl's "unset" (rollout.val_batch_size): nothing to move
            notes.append(f"ignored {old} = None")
        else:
            target[new_key] = value
            notes.append(f"read {old} (older cosmos-rl) as {new}")


def _section(raw: dict[str, Any], path: list[str], create: bool = False) -> dict | None:
    node: Any = raw
    for part in path:
        if not isinstance(node, dict):
            return None
        if part not in node and create:
            node[part] = {}
        node = node.get(part)
    return node if isinstance(node, dict) else None


def _apply_override(raw: dict[str, Any], text: str) -> list[str]:
    """Set one `a.b.c=value` override in the raw TOML dict; returns the problems found."""
    key, sep, value_text = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        return [
            f"override {text!r}: expected the form section.key=value, e.g. train.optm_lr=1e-5 "
            "or rollout.sampling_config.temperature=0.7"
        ]
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            return [f"override {text!r}: {where} is a value, not a section"]
        node = child
    node[parts[-1]] = _parse_override_value(value_text.strip(), parts)
    return []


def _parse_override_value(text: str, parts: list[str]) -> Any:
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    # A value with a newline could smuggle in more keys; the command line means one value.
    if list(parsed) != ["v"]:
        return text
    value = parsed["v"]
    # `logging.experiment_name=2024` means the string "2024", not a type error.
    if not isinstance(value, str) and _wants_text(parts, value):
        return text
    return value


def _wants_text(parts: list[str], value: Any) -> bool:
    """Whether the field takes a string and not a value of `value`'s type (`resume=true`)."""
    model: type[BaseModel] = GantryConfig
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        sub = _submodel(field.annotation) if field else None
        if sub is None:
            return False
        model = sub
    field = model.model_fields.get(parts[-1])
    if field is None:
        return False
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        kinds = {typing.get_origin(m) or m for m in members}  # list[str] -> list
        return str in members and type(value) not in kinds
    return annotation is str


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _check_keys(
    data: dict[str, Any],
    raw: dict[str, Any],
    model: type[BaseModel],
    section: str,
    problems: list[str],
    dropped: dict[str, Any],
) -> None:
    """Drop cosmos-rl keys that cannot change the result (into `dropped`); refuse those that
    change what is trained and keys that belong to no schema (into `problems`)."""
    for key in list(data):
        dotted = f"{section}.{key}" if section else key
        field = model.model_fields.get(key)
        if field is not None:
            sub = _submodel(field.annotation)
            if sub is not None and isinstance(data[key], dict):
                _check_keys(data[key], raw, sub, dotted, problems, dropped)
            continue
        value = data.pop(key)
        refused = REFUSED.get(section, {}).get(key)
        same = SAME_AS_GANTRY.get(dotted)
        if key in HINTS.get(section, set()) or (refused and same and same(value, raw)):
            dropped[dotted] = value
        elif refused:
            problems.append(
                f"{dotted} = {_show(value)}: cosmos-rl key that changes what is trained; {refused}"
            )
        else:
            problems.append(_unknown_key(key, value, section, model, known_keys(section)))


def _unknown_key(
    key: str, value: Any, section: str, model: type[BaseModel], cosmos: set[str]
) -> str:
    valid = list(model.model_fields)
    match = difflib.get_close_matches(key, valid + sorted(cosmos), n=1)
    prefix = f"{section}." if section else ""
    if isinstance(value, dict):
        message = f"unknown section [{prefix}{key}]"
        hint = f"did you mean [{prefix}{match[0]}]?" if match else None
    else:
        where = f"in [{section}]" if section else "at the top level"
        message = f"{prefix}{key}: unknown key {key!r} {where}"
        hint = f"did you mean {match[0]!r}?" if match else None
    return f"{message}; {hint or 'valid keys: ' + ', '.join(valid)}"


# --------------------------------------------------------------------------- error messages

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}
_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per pydantic error: the dotted key, what was expected, and the value given."""
    problems = []
    for error in exc.errors():
        path = _dotted(error["loc"])
        kind, ctx, given = error["type"], error.get("ctx", {}), _show(error.get("input"))
        if kind == "value_error":  # our validators' messages already say what to do
            message = str(ctx["error"])
        elif kind in _EXPECTED:
            message = f"expected {_EXPECTED[kind]}, got {given}"
        elif kind in _BOUNDS:
            symbol, name = _BOUNDS[kind]
            bound = ctx[name]
            if isinstance(bound, float) and bound.is_integer():
                bound = int(bound)  # "must be > 0", not "> 0.0", whatever the field's type
            message = f"must be {symbol} {bound}, got {given}"
        elif kind == "literal_error":
            message = f"expected one of {ctx['expected']}, got {given}"
        elif kind == "extra_forbidden":  # only reachable from read_resolved_config
            message = "unknown key"
        else:
            message = f"{error['msg']}, got {given}"
        for line in message.splitlines():
            problems.append(f"{path}: {line}" if path else line)
    return problems


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- serialising


def config_to_dict(cfg: GantryConfig) -> dict[str, Any]:
    """The config as JSON-able nested dicts."""
    return cfg.model_dump(mode="json")


def write_resolved_config(cfg: GantryConfig, path: str | Path) -> None:
    """Write the validated config as JSON, for every role of the run to read."""
    Path(path).write_text(cfg.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_resolved_config(path: str | Path) -> GantryConfig:
    """Read the config the launcher wrote; ConfigError if it does not match this schema."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return GantryConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError([f"{path}: {line}" for line in describe_errors(exc)]) from None


def config_to_toml(cfg: GantryConfig) -> str:
    """The config as TOML (None values omitted), which loads back to an equal config."""
    # python mode keeps datetimes that [custom] may hold as TOML datetimes, not strings.
    return table_to_toml(cfg.model_dump(mode="python"))


def table_to_toml(table: dict[str, Any]) -> str:
    """A dict as TOML (None values omitted: TOML has no null)."""
    return "\n".join(_toml_table(table, ())) + "\n"


def _toml_table(table: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    # TOML wants a table's own values before its sub-tables.
    lines = [f"[{'.'.join(_toml_key(part) for part in path)}]"] if path else []
    subtables = []
    for key, value in table.items():
        if isinstance(value, dict):
            subtables.append((key, value))
        elif value is not None:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in subtables:
        if lines:
            lines.append("")
        lines += _toml_table(value, (*path, key))
    return lines


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's string escapes are TOML's, except that TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr gives TOML's forms too: 1e-06, inf, nan
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        if any(item is None for item in value):
            raise ValueError(f"TOML cannot hold None inside a list: {value!r}")
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")
