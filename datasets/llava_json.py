"""LLaVA-style JSON annotations -> Gantry chat samples (SFT, GRPO, evaluation).

The annotation file is a JSON list (or JSONL) of entries like
    {"id": "000001", "image": "coco/000001.jpg",          # or a list of paths; optional "video"
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}],
     "category": "animals"}                                # extra fields are kept in the sample
Each `<image>` / `<video>` placeholder becomes a media part at its position (the entry's files in
order); a text without placeholders gets the media first in the first user turn. Roles: human ->
user, gpt -> assistant, system -> system. A sample's "answer" is its last assistant turn.

Config:
    [custom.dataset]
    annotation_path = "data/train.json"   # relative to the current directory
    media_root = "data/images"            # relative media paths resolve here (default: the
                                          # annotation file's directory); media_path, the
                                          # Cosmos-Reason1 recipes' name, is the same key
    # system_prompt = "You are ..."       # a system message first in every conversation
    on_bad_entry = "fail"                 # or "skip": drop bad entries, warn, summarise
    # max_samples = 1000                  # stop after this many good samples
    # val_annotation_path = "data/val.json"   # what [validation] uses
    # val_media_root = "data/val_images"      # default: media_root, else val file's directory
    # val_max_samples = 200

    [custom.vision]                        # optional limits copied onto every media part
    max_pixels = 1003520                   # also: min_pixels, resized_height + resized_width,
    fps = 2.0                              # min_frames, max_frames

Run it with
    ./launch.sh --config sft.toml datasets/llava_json.py
"""

from pathlib import Path

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
    read_json_entries,
    with_system_prompt,
)

_OWN_FIELDS = ("id", "image", "video", "conversations")


class LlavaSettings(DatasetSettings):
    ALIASES = {"media_path": "media_root"}  # the Cosmos-Reason1 LLaVA and warehouse recipes

    annotation_path: str = Field(
        description='the LLaVA JSON list (or JSONL) file, e.g. annotation_path = "train.json"'
    )
    media_root: str = Field(
        "", description="directory of relative media paths (default: the annotation's directory)"
    )
    val_annotation_path: str = Field(
        "", description="the validation annotation file (needed by validation)"
    )
    val_media_root: str = Field(
        "", description="media directory for validation (default: media_root, else its file's)"
    )


def get_dataset(config):
    settings, vision = load_settings(config, LlavaSettings)
    return load_llava(settings, vision, val=False)


def get_val_dataset(config):
    """The validation samples (custom.dataset.val_annotation_path must be set)."""
    settings, vision = load_settings(config, LlavaSettings)
    if not settings.val_annotation_path:
        raise BadDatasetConfig(
            "custom.dataset.val_annotation_path is not set; validation needs the annotation "
            'file to validate on, e.g. val_annotation_path = "val.json"'
        )
    return load_llava(settings, vision, val=True)


def load_llava(settings: LlavaSettings, vision: VisionSettings, *, val: bool) -> list[dict]:
    """The samples of the training (or validation) annotation file."""
    key = "val_annotation_path" if val else "annotation_path"
    path = absolute(getattr(settings, key))
    entries = read_json_entries(path, key)
    root = (settings.val_media_root if val else "") or settings.media_root
    root = absolute(root) if root else path.parent
    return build_samples(
        entries,
        path,
        lambda entry, entry_id: llava_sample(entry, entry_id, root, vision, settings.system_prompt),
        on_bad_entry=settings.on_bad_entry,
        max_samples=settings.val_max_samples if val else settings.max_samples,
    )


def llava_sample(
    entry, entry_id: str, media_root: Path, vision: VisionSettings, system_prompt: str = ""
) -> dict:
    if not isinstance(entry, dict):
        raise malformed(f"the entry is a {type(entry).__name__}, expected an object")
    if "conversations" not in entry:
        raise malformed("no 'conversations' list")
    messages = chat_messages(entry["conversations"])
    media = {"image": media_paths(entry.get("image"), "image")}
    media["video"] = media_paths(entry.get("video"), "video")
    messages = with_system_prompt(
        build_messages(messages, media, media_root, vision), system_prompt
    )
    extras = {key: value for key, value in entry.items() if key not in _OWN_FIELDS}
    return make_sample(entry_id, messages, extras)


reward_fns = [answer_match_reward]
