"""A meta.json index of media files and per-entry conversation files -> Gantry chat samples.

meta.json is a JSON list (or JSONL) of entries like
    {"id": "clip-7", "media": "videos/clip-7.mp4",        # or a list of images and videos
     "conversations": "text/clip-7.json",                  # a file of role/content messages
     "split": "hard"}                                      # extra fields are kept in the sample
and text/clip-7.json holds the conversation:
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
     {"role": "assistant", "content": "A ball rolls."}]
Paths are relative to meta.json's directory (media paths: to media_root when set). Media parts without a path ({"type": "image"}) and
`<image>` / `<video>` placeholders in text take the entry's media in order (images and videos
are told apart by suffix: .mp4, .mov, ... are videos); a part may also name its own file
({"type": "image", "image": "images/x.jpg"}). When the conversation has no placeholder, the
media go first in the first user turn. A missing or unparseable conversation file is a bad entry.
A sample's "answer" is its last assistant turn.

Config:
    [custom.dataset]
    meta_path = "data/meta.json"         # relative to the current directory (annotation_path,
                                         # the Cosmos-Reason1 recipes' name, is the same key)
    # media_root = "data/media"          # relative media paths resolve here (default: meta.json's
                                         # directory; media_path is the same key)
    # system_prompt = "You are ..."      # a system message first in every conversation
    on_bad_entry = "fail"                # or "skip": drop bad entries, warn, summarise
    # max_samples = 1000                 # stop after this many good samples
    # val_meta_path = "data/val_meta.json"   # what [validation] uses
    # val_max_samples = 200

    [custom.vision]                       # optional limits copied onto every media part
    max_pixels = 1003520
    max_frames = 64

Run it with
    ./launch.sh --config sft.toml datasets/meta_json.py
"""

import json
from pathlib import Path

from pydantic import Field

from gantry.data.chat import (
    BAD_CONVERSATION_FILE,
    BadDatasetConfig,
    DatasetSettings,
    EntryProblem,
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
    read_json_entries,
    split_media,
    with_system_prompt,
)

_OWN_FIELDS = ("id", "media", "conversations")


class MetaSettings(DatasetSettings):
    ALIASES = {  # the Cosmos-Reason1 recipes' names
        "annotation_path": "meta_path",
        "val_annotation_path": "val_meta_path",
        "media_path": "media_root",
    }

    meta_path: str = Field(
        description='the meta JSON list of entries, e.g. meta_path = "data/meta.json"'
    )
    media_root: str = Field(
        "", description="directory of relative media paths (default: the meta file's directory)"
    )
    val_meta_path: str = Field("", description="the validation meta file (needed by validation)")


def get_dataset(config):
    settings, vision = load_settings(config, MetaSettings)
    return load_meta(settings, vision, val=False)


def get_val_dataset(config):
    """The validation samples (custom.dataset.val_meta_path must be set)."""
    settings, vision = load_settings(config, MetaSettings)
    if not settings.val_meta_path:
        raise BadDatasetConfig(
            "custom.dataset.val_meta_path is not set; validation needs the meta file to "
            'validate on, e.g. val_meta_path = "val_meta.json"'
        )
    return load_meta(settings, vision, val=True)


def load_meta(settings: MetaSettings, vision: VisionSettings, *, val: bool) -> list[dict]:
    """The samples of the training (or validation) meta file."""
    key = "val_meta_path" if val else "meta_path"
    path = absolute(getattr(settings, key))
    entries = read_json_entries(path, key)
    return build_samples(
        entries,
        path,
        lambda entry, entry_id: meta_sample(entry, entry_id, path.parent, vision, settings),
        on_bad_entry=settings.on_bad_entry,
        max_samples=settings.val_max_samples if val else settings.max_samples,
    )


def meta_sample(
    entry, entry_id: str, root: Path, vision: VisionSettings, settings: MetaSettings | None = None
) -> dict:
    """The sample of one entry; conversation files resolve against `root` (meta.json's
    directory), media against settings.media_root when set, else `root` too."""
    if not isinstance(entry, dict):
        raise malformed(f"the entry is a {type(entry).__name__}, expected an object")
    conversation = entry.get("conversations")
    if isinstance(conversation, str) and conversation:
        conversation = read_conversation(absolute(conversation, root))
    elif not isinstance(conversation, list):
        raise malformed(f"'conversations' must name a conversation file, got {conversation!r:.80}")
    messages = chat_messages(conversation)
    media = split_media(media_paths(entry.get("media"), "media"))
    media_root = absolute(settings.media_root) if settings and settings.media_root else root
    messages = build_messages(messages, media, media_root, vision)
    messages = with_system_prompt(messages, settings.system_prompt if settings else "")
    extras = {key: value for key, value in entry.items() if key not in _OWN_FIELDS}
    return make_sample(entry_id, messages, extras)


def read_conversation(path: Path):
    """The messages a conversation file holds (a JSON list)."""
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EntryProblem(BAD_CONVERSATION_FILE, f"missing conversation file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EntryProblem(
            BAD_CONVERSATION_FILE, f"cannot read conversation file {path}: {exc}"
        ) from None
    if not isinstance(messages, list):
        raise EntryProblem(
            BAD_CONVERSATION_FILE,
            f"conversation file {path} holds a {type(messages).__name__}; "
            "it must hold a JSON list of messages",
        )
    return messages


reward_fns = [answer_match_reward]
