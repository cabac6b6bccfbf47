"""Chat datasets on disk -> Gantry samples: what datasets/llava_json.py, meta_json.py and
hf_chat.py share. It owns
- `[custom.dataset]` settings (DatasetSettings, which each script subclasses with its layout's
  keys) and `[custom.vision]` (VisionSettings, media limits), with errors naming the key;
- bad entries (BadEntries): raised at once, or skipped, counted by kind and summarised;
- conversation normalisation: LLaVA turns or role/content messages, with `<image>` / `<video>`
  placeholders or media parts, into the sample format
      {"id", "messages": [{"role", "content": str | [parts]}], "answer", **extra fields}
  with media parts {"type": "image", "image": "/abs/path", **limits} (or "video");
- answer_match_reward, the GRPO reward the three scripts offer. Imports nothing of torch.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LOG = logging.getLogger("gantry.data")

# Kinds of bad entries, in the order the skip summary lists them.
MISSING_MEDIA = "missing media"
MALFORMED = "malformed"
NO_ASSISTANT = "without an assistant turn"
BAD_CONVERSATION_FILE = "with an unreadable conversation file"
KINDS = (MISSING_MEDIA, MALFORMED, NO_ASSISTANT, BAD_CONVERSATION_FILE)

ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", **{role: role for role in ROLES}}
MEDIA_KINDS = ("image", "video")
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v", ".mpeg", ".mpg"}
_PLACEHOLDER = re.compile(r"\n?<(image|video)>\n?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


class BadDatasetConfig(ValueError):
    """[custom.dataset] or [custom.vision] is wrong; the message names the key and the fix."""


class BadEntryError(ValueError):
    """An entry of a dataset file is unusable and on_bad_entry is "fail"."""


class EntryProblem(ValueError):
    """What is wrong with one entry; `kind` is one of KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def malformed(message: str) -> EntryProblem:
    return EntryProblem(MALFORMED, f"malformed: {message}")


# ----------------------------------------------------------------------------- settings


def _merge_aliases(table: Any, aliases: dict[str, str]) -> Any:
    """`table` with each alias key (a published recipe's spelling) renamed to Gantry's key;
    both spellings with different values are an error naming both."""
    if not isinstance(table, dict):
        return table
    table = dict(table)
    for alias, key in aliases.items():
        if alias not in table:
            continue
        value = table.pop(alias)
        if key in table and table[key] != value:
            raise ValueError(
                f"{alias} = {value!r} and {key} = {table[key]!r} are two spellings of one "
                "setting with different values; keep one of them"
            )
        table[key] = value
    return table


def _refuse(table: Any, refused: dict[str, str]) -> None:
    """A ValueError naming the first key of `refused` (key -> what to use) that `table` has."""
    for key, instead in refused.items():
        if isinstance(table, dict) and key in table:
            raise ValueError(f"{key} is not supported by Gantry; {instead}")


class DatasetSettings(BaseModel):
    """The [custom.dataset] keys every layout has; each script subclasses it with its own.

    ALIASES maps the key names the published cosmos-rl / Cosmos-Reason1 recipes use to the
    script's own (e.g. media_path -> media_root); both are accepted."""

    model_config = ConfigDict(extra="forbid")
    ALIASES: ClassVar[dict[str, str]] = {}

    on_bad_entry: Literal["fail", "skip"] = Field(
        "fail", description='"fail" stops at the first bad entry; "skip" skips and counts them'
    )
    max_samples: int | None = Field(None, gt=0, description="stop after N good samples")
    val_max_samples: int | None = Field(None, gt=0, description="the same, for validation")
    system_prompt: str = Field(
        "",
        description="a system message put first in every conversation that has none "
        "(the Cosmos-Reason1 recipes' key)",
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_spellings(cls, data: Any) -> Any:
        return _merge_aliases(data, cls.ALIASES)


# cosmos-reason1's VisionConfig keys Gantry does not implement, and what to use instead.
REFUSED_VISION = {
    "total_pixels": "limit each image / frame with max_pixels (and videos with max_frames)",
    "nframes": "sample videos with fps, min_frames and max_frames",
    "video_start": "cut the clip to the part to train on before training",
    "video_end": "cut the clip to the part to train on before training",
}


class VisionSettings(BaseModel):
    """[custom.vision]: limits copied onto every media part (unset keys are left out)."""

    model_config = ConfigDict(extra="forbid")

    min_pixels: int | None = Field(None, gt=0, description="least pixels an image/frame keeps")
    max_pixels: int | None = Field(None, gt=0, description="most pixels an image/frame keeps")
    resized_height: int | None = Field(
        None, gt=0, description="resize images / frames to this height (with resized_width)"
    )
    resized_width: int | None = Field(
        None, gt=0, description="resize images / frames to this width (with resized_height)"
    )
    fps: float | None = Field(None, gt=0, description="video frames sampled per second")
    min_frames: int | None = Field(None, gt=0, description="least frames taken from a video")
    max_frames: int | None = Field(None, gt=0, description="most frames taken from a video")

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        _refuse(data, REFUSED_VISION)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> VisionSettings:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels is above max_pixels ({self.max_pixels}); lower it")
        if self.min_frames and self.max_frames and self.min_frames > self.max_frames:
            raise ValueError(f"min_frames is above max_frames ({self.max_frames}); lower it")
        if (self.resized_height is None) != (self.resized_width is None):
            raise ValueError("resized_height and resized_width go together; give both or neither")
        return self

    def limits(self, kind: str) -> dict[str, Any]:
        """The limits a part of `kind` ("image" or "video") carries."""
        keys = ("min_pixels", "max_pixels", "resized_height", "resized_width")
        keys += ("fps", "min_frames", "max_frames") if kind == "video" else ()
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


def parse_settings(model: type[BaseModel], table: Any, section: str) -> Any:
    """`table` validated as `model`; BadDatasetConfig naming `<section>.<key>` otherwise."""
    table = {} if table is None else table
    if not isinstance(table, dict):
        raise BadDatasetConfig(
            f"{section} must be a table ([{section}] in the config), got {type(table).__name__}"
        )
    try:
        return model.model_validate(table)
    except ValidationError as exc:
        raise BadDatasetConfig("\n".join(_describe(exc, model, section))) from None


def load_settings(config: Any, model: type[DatasetSettings]) -> tuple[Any, VisionSettings]:
    """[custom.dataset] and [custom.vision] of the [custom] section a script receives."""
    if not isinstance(config, dict):
        raise BadDatasetConfig(f"custom must be a table, got {type(config).__name__}")
    dataset = parse_settings(model, config.get("dataset"), "custom.dataset")
    return dataset, parse_settings(VisionSettings, config.get("vision"), "custom.vision")


def _describe(exc: ValidationError, model: type[BaseModel], section: str) -> list[str]:
    problems = []
    for error in exc.errors():
        key = ".".join([section, *map(str, error["loc"])])
        field = model.model_fields.get(str(error["loc"][0])) if error["loc"] else None
        if error["type"] == "extra_forbidden":
            valid = sorted(model.model_fields)
            close = difflib.get_close_matches(str(error["loc"][0]), valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{key}: unknown key; {hint}valid keys: {', '.join(valid)}")
        elif error["type"] == "missing":
            problems.append(f"{key}: required: {field.description if field else ''}")
        elif error["type"] == "value_error":
            problems.append(f"{section}: {error['ctx']['error']}")
        else:
            fix = f" ({field.description})" if field and field.description else ""
            problems.append(f"{key}: {error['msg']}, got {error['input']!r}{fix}")
    return problems


def absolute(path: str | Path, base: str | Path | None = None) -> Path:
    """`path` made absolute (against `base`, else the current directory), symlinks kept."""
    path = Path(path).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return Path(os.path.abspath(path))


def read_json_entries(path: Path, key: str) -> list[Any]:
    """The entries of a JSON list (or JSONL) file that `custom.dataset.<key>` names."""
    if not path.is_file():
        raise BadDatasetConfig(f"custom.dataset.{key}: {path} does not exist; fix the path")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        entries = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadDatasetConfig(f"custom.dataset.{key}: cannot read {path}: {exc}") from None
    if not isinstance(entries, list):
        raise BadDatasetConfig(f"custom.dataset.{key}: {path} must hold a JSON list of entries")
    return entries


# ----------------------------------------------------------------------------- bad entries


class BadEntries:
    """Bad entries, per on_bad_entry: raised at once ("fail") or skipped and counted ("skip")."""

    def __init__(self, on_bad_entry: str = "fail"):
        self.on_bad_entry = on_bad_entry
        self.counts: Counter[str] = Counter()  # kind -> entries skipped

    def report(self, source_file: str | Path, entry_id: Any, problem: EntryProblem | str) -> None:
        kind = problem.kind if isinstance(problem, EntryProblem) else MALFORMED
        message = f"{source_file}: entry {entry_id}: {problem}"
        if self.on_bad_entry == "fail":
            raise BadEntryError(
                f'{message}\n(set custom.dataset.on_bad_entry = "skip" to skip bad entries)'
            )
        LOG.warning("%s (skipped)", message)
        self.counts[kind] += 1

    def summary(self, source_file: str | Path, total: int) -> str | None:
        """'skipped N of M entries of <file>: 3 missing media, 2 malformed', or None."""
        if not self.counts:
            return None
        kinds = ", ".join(f"{self.counts[kind]} {kind}" for kind in KINDS if self.counts[kind])
        return f"skipped {self.counts.total()} of {total} entries of {source_file}: {kinds}"


def build_samples(
    entries: Iterable[Any],
    source_file: str | Path,
    build: Callable[[Any, str], dict],
    *,
    on_bad_entry: str = "fail",
    max_samples: int | None = None,
    bad: BadEntries | None = None,
) -> list[dict]:
    """`build(entry, entry_id)` over the entries of one file, bad ones handled by `bad`."""
    bad = bad or BadEntries(on_bad_entry)
    samples, seen = [], 0
    for index, entry in enumerate(entries):
        if max_samples is not None and len(samples) >= max_samples:
            break
        seen += 1
        raw_id = entry.get("id") if isinstance(entry, dict) else None
        entry_id = str(index) if raw_id is None else str(raw_id)
        try:
            samples.append(build(entry, entry_id))
        except EntryProblem as problem:
            bad.report(source_file, entry_id, problem)
    if summary := bad.summary(source_file, seen):
        if not samples:
            raise BadEntryError(f"no usable entries: {summary}")
        LOG.warning("%s", summary)
    return samples


# ----------------------------------------------------------------------------- conversations


def chat_messages(turns: Any) -> list[dict]:
    """LLaVA turns ({"from": "human"|"gpt"|"system", "value"}) or role/content messages ->
    checked role/content messages (EntryProblem if malformed or without an assistant turn)."""
    if not isinstance(turns, list) or not turns:
        raise malformed(f"the conversation must be a non-empty list of turns, got {turns!r:.80}")
    messages = []
    for number, turn in enumerate(turns):
        message = turn
        if isinstance(turn, dict) and "from" in turn:
            message = {"role": LLAVA_ROLES.get(turn["from"]), "content": turn.get("value")}
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise malformed(
                f"turn {number} is {turn!r:.80}; expected {{'role': 'system'|'user'|'assistant'"
                ", 'content': ...} or {'from': 'human'|'gpt'|'system', 'value': ...}"
            )
        content = message.get("content")
        text = content.strip() if isinstance(content, str) else ""
        if not (text or isinstance(content, list) and content):
            raise malformed(f"turn {number} ({message['role']}) has no content")
        messages.append(message)
    if not any(message["role"] == "assistant" for message in messages):
        raise EntryProblem(NO_ASSISTANT, "no assistant turn")
    return messages


def media_paths(value: Any, field: str) -> list[str]:
    """An entry's media field (a path, a list of paths, or {"path": ...} dicts) as paths."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    paths = []
    for item in items:
        path = item.get("path") if isinstance(item, dict) else item
        if not isinstance(path, str) or not path:
            raise malformed(f"'{field}' must be a file path or a list of paths, got {item!r:.80}")
        paths.append(path)
    return paths


def split_media(paths: list[str]) -> dict[str, list[str]]:
    """Paths sorted into images and videos by their suffix (.mp4, .mov, ... are videos)."""
    kinds: dict[str, list[str]] = {"image": [], "video": []}
    for path in paths:
        kinds["video" if Path(path).suffix.lower() in VIDEO_SUFFIXES else "image"].append(path)
    return kinds


def build_messages(
    messages: list[dict], media: dict[str, list[str]], media_root: Path, vision: VisionSettings
) -> list[dict]:
    """Checked messages -> sample messages, media parts with absolute paths and limits.

    Placeholders (`<image>` in text, or media parts without a path) take the entry's `media`
    in order; when a text has no placeholder of a kind, that kind's media go first in the first
    user turn. Every media file must exist.
    """
    contents = [_parts(message["content"], number) for number, message in enumerate(messages)]
    for kind in reversed(MEDIA_KINDS):  # so that prepended images come before videos
        slots = [
            part
            for parts in contents
            for part in parts
            if part["type"] == kind and kind not in part
        ]
        given = media.get(kind, [])
        if not slots and given:
            first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
            slots = [{"type": kind} for _ in given]
            contents[first_user][:0] = slots
        if len(slots) != len(given):
            raise malformed(
                f"{_count(len(slots), f'<{kind}> placeholder')} for {_count(len(given), kind)}"
            )
        for slot, path in zip(slots, given, strict=True):
            slot[kind] = path
    out = []
    for message, parts in zip(messages, contents, strict=True):
        content = message["content"]
        if not (isinstance(content, str) and parts == [{"type": "text", "text": content}]):
            content = [_finish_part(part, media_root, vision) for part in parts]
        kept = {key: value for key, value in message.items() if value is not None}
        out.append({**kept, "content": content})
    return out


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _parts(content: str | list, number: int) -> list[dict]:
    """A content as parts; placeholders become parts without a path (slots)."""
    if isinstance(content, str):
        pieces = _PLACEHOLDER.split(content)  # text, kind, text, kind, ..., text
        parts = []
        for index, piece in enumerate(pieces):
            if index % 2:
                parts.append({"type": piece})
            elif piece.strip():
                parts.append({"type": "text", "text": piece})
        return parts if len(pieces) > 1 else [{"type": "text", "text": content}]
    parts = []
    for part in content:
        part = {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) and part["text"]:
            parts.append(part)
        elif kind in MEDIA_KINDS:
            parts.append(_media_part(part, kind, number))
        else:
            raise malformed(
                f"turn {number} has part {part!r:.80}; expected {{'type': 'text', 'text': ...}} "
                "or {'type': 'image'|'video', 'image'|'video'|'path'|'url': ...}"
            )
    return parts


def _media_part(part: dict, kind: str, number: int) -> dict:
    """A media part with its file under the `kind` key (from "image"/"video", "path" or "url")."""
    part = dict(part)
    found = [part.pop(key) for key in (kind, "path", "url") if key in part]
    if not found:
        return part  # a slot: the entry's media fill it
    path = found[0]
    if not isinstance(path, str) or not path:
        raise malformed(f"turn {number}: {kind} part holds {path!r:.80}, expected a file path")
    path = path.removeprefix("file://")
    if re.match(r"[a-z][a-z0-9+.-]*://", path):
        raise malformed(f"turn {number}: {path} is remote; download it and give a local path")
    return {**part, kind: path}


def _finish_part(part: dict, media_root: Path, vision: VisionSettings) -> dict:
    kind = part["type"]
    if kind not in MEDIA_KINDS:
        return part
    path = absolute(part[kind], media_root)
    if not path.exists():
        raise EntryProblem(MISSING_MEDIA, f"missing media file {path}")
    own = {k: v for k, v in part.items() if k not in ("type", kind)}
    return {"type": kind, kind: str(path), **vision.limits(kind), **own}


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """`messages` with a system message of `system_prompt` first, unless it is empty or the
    conversation has its own system message."""
    if not system_prompt or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def make_sample(entry_id: str, messages: list[dict], extras: dict) -> dict:
    """The sample: id, messages, the last assistant turn's text as answer, then the extras."""
    last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    if not isinstance(last, str):  # its text parts
        last = "".join(part["text"] for part in last if part["type"] == "text")
    sample = {"id": entry_id, "messages": messages, "answer": last}
    sample.update((key, value) for key, value in extras.items() if key not in sample)
    return sample


# ----------------------------------------------------------------------------- rewards


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, wrapping quotes / ** / (...) and a final period off."""
    text = " ".join(str(text).split()).lower().strip(" *\"'`").rstrip(".").strip()
    if text.startswith("(") and text.endswith(")") and "(" not in text[1:]:
        text = text[1:-1].strip()
    return text


def answer_match_reward(completion: str, sample: dict, **kw: Any) -> float:
    """1.0 when the completion (its last <answer>...</answer> if any) equals the sample's
    normalized_answer, else its answer, both normalized; 0.0 otherwise."""
    reference = sample.get("normalized_answer") or sample.get("answer")
    if reference is None:
        raise KeyError("the sample has neither 'normalized_answer' nor 'answer'")
    tags = _ANSWER_TAG.findall(completion)
    got = normalize_answer(tags[-1] if tags else completion)
    return 1.0 if got == normalize_answer(reference) else 0.0
