"""A local Hugging Face chat dataset (saved with save_to_disk, or JSON/parquet files) -> Gantry
chat samples.

Each row has a messages column of role/content dicts, contents being strings or part lists:
    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                  {"role": "assistant", "content": "A."}],
     "images": ["imgs/0.jpg"],          # file paths (or {"path": ...}); optional "videos"
     "id": "q-0", "category": "charts"} # other columns are kept in the sample
Media parts without a path and `<image>` / `<video>` placeholders in text take the row's images
(videos) in order; a part may also name its own file ({"type": "image", "image": "x.jpg"}). When
a conversation has no placeholder, the media go first in the first user turn. Rows without an id
column get their index as id. A sample's "answer" is its last assistant turn. Images stored as
bytes inside the dataset are not supported: the media columns must hold file paths.

Only local paths are read (Gantry never downloads a dataset):
- a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk (`split` picks from a
  DatasetDict; `subset` names a sub-directory holding one such save);
- a JSON / JSONL / parquet / CSV / arrow file, or a directory of them (datasets.load_dataset;
  `subset` is then the dataset's config name). A single file is the "train" split.

Config:
    [custom.dataset]
    path = "/data/my_chat"            # relative to the current directory
    subset = ""                       # a sub-directory (or config name) of path
    split = "train"
    messages_column = "messages"      # a list of messages, or their JSON text (the
                                      # Cosmos-Reason1 HF recipe: "conversations")
    images_column = ""                # default: "images", else "image", when the column exists
    videos_column = ""                # default: "videos", else "video", when the column exists
    media_root = ""                   # relative media paths resolve here (default: path
                                      # itself if a directory, else the file's directory)
                                      # (media_path, the recipes' name, is the same key)
    # system_prompt = "You are ..."   # a system message first in every conversation
    on_bad_entry = "fail"             # or "skip": drop bad rows, warn, summarise
    # max_samples = 1000              # stop after this many good samples
    # val_split = "validation"        # the split [validation] uses
    # val_path = "/data/my_chat_val"  # where val_split lives (default: path)
    # val_max_samples = 200

    [custom.vision]                   # optional limits copied onto every media part
    max_pixels = 1003520

Run it with
    ./launch.sh --config sft.toml datasets/hf_chat.py
"""

import json
from pathlib import Path

import datasets
from pydantic import Field

from gantry.data.chat import (
    BadDatasetConfig,
    DatasetSettings,
    VisionSettings,
    absolute,
    answer_match_reward,
    build_messages,
    build_samples,
    chat_messages,
    load_settings,
    make_sample,
    malformed,
    media_paths,
    with_system_prompt,
)

_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


class HfChatSettings(DatasetSettings):
    ALIASES = {"media_path": "media_root"}  # the Cosmos-Reason1 recipes' name

    path: str = Field(
        description="a local dataset: a save_to_disk directory, or JSON/parquet file(s), e.g. "
        'path = "/data/my_chat"'
    )
    subset: str = Field("", description="a sub-directory (or config name) of path")
    split: str = Field("train", description="the split of a DatasetDict to train on")
    messages_column: str = Field("messages", description="the column of chat messages")
    images_column: str = Field("", description='column of image paths (default: "images")')
    videos_column: str = Field("", description='column of video paths (default: "videos")')
    media_root: str = Field("", description="directory of relative media paths")
    val_split: str = Field("", description="the validation split (needed by validation)")
    val_path: str = Field("", description="the dataset holding val_split (default: path)")


def get_dataset(config):
    settings, vision = load_settings(config, HfChatSettings)
    return load_chat(settings, vision, val=False)


def get_val_dataset(config):
    """The validation samples (custom.dataset.val_split must be set)."""
    settings, vision = load_settings(config, HfChatSettings)
    if not settings.val_split:
        raise BadDatasetConfig(
            "custom.dataset.val_split is not set; validation needs the split to validate on, "
            'e.g. val_split = "validation"'
        )
    return load_chat(settings, vision, val=True)


def load_chat(settings: HfChatSettings, vision: VisionSettings, *, val: bool) -> list[dict]:
    """The samples of the training (or validation) split."""
    key = "val_path" if val and settings.val_path else "path"
    location = absolute(getattr(settings, key))
    table = open_split(settings, location, key, "val_split" if val else "split")
    columns = table.column_names
    messages_column = _column(settings.messages_column, "messages_column", columns)
    images = _media_column(settings.images_column, "images_column", "image", columns)
    videos = _media_column(settings.videos_column, "videos_column", "video", columns)
    own = {messages_column, images, videos}
    if settings.media_root:
        root = absolute(settings.media_root)
    else:
        root = location if location.is_dir() else location.parent

    def build(row, row_id):
        messages = chat_messages(_decoded(row[messages_column], messages_column))
        media = {
            "image": media_paths(row.get(images), images or "images"),
            "video": media_paths(row.get(videos), videos or "videos"),
        }
        messages = build_messages(messages, media, root, vision)
        messages = with_system_prompt(messages, settings.system_prompt)
        return make_sample(row_id, messages, {k: v for k, v in row.items() if k not in own})

    return build_samples(
        _rows(table),
        location,
        build,
        on_bad_entry=settings.on_bad_entry,
        max_samples=settings.val_max_samples if val else settings.max_samples,
    )


def _decoded(value, column: str):
    """A messages cell: the list itself, or the list its JSON text holds."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise malformed(f"column {column!r} holds text that is not JSON messages ({exc})") from None


def open_split(settings, location: Path, key: str, split_key: str) -> datasets.Dataset:
    """The split `split_key` names, from the local dataset at `location` (custom.dataset.<key>)."""
    if not location.exists():
        raise BadDatasetConfig(
            f"custom.dataset.{key}: {location} does not exist; give a local directory saved "
            "with save_to_disk, or JSON/JSONL/parquet/CSV file(s) (Gantry never downloads "
            "datasets)"
        )
    subset = settings.subset or None
    if subset and (location / subset).is_dir():
        location, subset = location / subset, None
    try:
        data = _read(location, subset, key)
    except BadDatasetConfig:
        raise
    except (ValueError, OSError) as exc:  # a dataset the library cannot read: say which
        raise BadDatasetConfig(f"custom.dataset.{key}: cannot load {location}: {exc}") from None
    return _pick_split(data, location, getattr(settings, split_key), split_key, key)


def _read(location: Path, subset: str | None, key: str):
    """load_from_disk for a save_to_disk directory, else load_dataset on the data file(s)."""
    if _saved_to_disk(location):
        if subset:
            raise BadDatasetConfig(
                f"custom.dataset.subset: {location} has no sub-directory {subset!r}"
            )
        return datasets.load_from_disk(str(location))
    if location.is_file():
        builder = _BUILDERS.get(location.suffix.lower())
        if builder is None:
            raise BadDatasetConfig(
                f"custom.dataset.{key}: {location} is not a JSON, JSONL, parquet, CSV or arrow file"
            )
        return datasets.load_dataset(builder, data_files=str(location))
    return datasets.load_dataset(str(location), subset)


def _pick_split(data, location: Path, split: str, split_key: str, key: str) -> datasets.Dataset:
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise BadDatasetConfig(
                f"custom.dataset.{split_key}: {location} has no split {split!r}; it has: "
                f"{', '.join(data)}"
            )
        return data[split]
    if split_key == "val_split" and key == "path":
        raise BadDatasetConfig(
            f"custom.dataset.val_split: {location} holds one Dataset, without splits; save a "
            "DatasetDict with that split, or set custom.dataset.val_path to the validation data"
        )
    return data


def _saved_to_disk(location: Path) -> bool:
    return (location / "dataset_dict.json").is_file() or (location / "state.json").is_file()


def _column(name: str, key: str, columns: list[str]) -> str:
    if name not in columns:
        raise BadDatasetConfig(
            f"custom.dataset.{key}: no column {name!r}; the columns are {', '.join(columns)}"
        )
    return name


def _media_column(name: str, key: str, kind: str, columns: list[str]) -> str | None:
    """The configured column, else "<kind>s" or "<kind>" when present, else None."""
    if name:
        return _column(name, key, columns)
    return next((c for c in (kind + "s", kind) if c in columns), None)


def _rows(table: datasets.Dataset):
    """The rows as stored (media columns as paths, never decoded images)."""
    for batch in table.with_format("arrow").iter(batch_size=1024):
        yield from batch.to_pylist()


reward_fns = [answer_match_reward]
