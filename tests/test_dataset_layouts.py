"""datasets/llava_json.py, meta_json.py and hf_chat.py on small fixtures, loaded by path as Gantry
loads them: exact samples, bad entries ("fail" and "skip"), config errors, the shared reward, and
the Cosmos-Reason1 recipes' [custom.dataset] / [custom.vision] keys."""

import json
import logging
from pathlib import Path

import datasets
import pytest
from PIL import Image

from gantry.data.chat import (
    MALFORMED,
    MISSING_MEDIA,
    BadEntries,
    BadEntryError,
    EntryProblem,
    answer_match_reward,
    build_samples,
    malformed,
)
from gantry.data.plugin import DatasetScriptError, load_dataset_script

SCRIPTS = Path(__file__).resolve().parents[1] / "datasets"
VISION = {"min_pixels": 64, "max_pixels": 4096, "fps": 2.0, "max_frames": 8}
IMAGE_LIMITS = {"min_pixels": 64, "max_pixels": 4096}


def load(name: str, custom: dict, *, val: bool = False) -> list[dict]:
    script = load_dataset_script(SCRIPTS / name, need_rewards=False)
    return script.load_val_samples(custom) if val else script.load_samples(custom)


def write(path: Path, value) -> Path:
    """A tiny PNG for *.png, a dummy file for *.mp4 (only existence is checked), else JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    else:
        path.write_text("not a real video" if path.suffix == ".mp4" else json.dumps(value))
    return path


def media(root: Path, *names: str) -> list[Path]:
    return [write(root / name, None) for name in names]


def image(path, **limits):
    """The part the scripts make for a media file (a video for .mp4)."""
    kind = "video" if str(path).endswith(".mp4") else "image"
    return {"type": kind, kind: str(path), **limits}


def text(value):
    return {"type": "text", "text": value}


def turn(speaker, value):
    return {"from": speaker, "value": value}


def user(*parts):
    return {"role": "user", "content": parts[0] if isinstance(parts[0], str) else list(parts)}


def assistant(value):
    return {"role": "assistant", "content": value}


QA = [turn("human", "q"), turn("gpt", "a")]


def failure(name: str, custom: dict, *, val: bool = False) -> str:
    """The message of the BadEntryError / BadDatasetConfig a script's get_dataset raised."""
    with pytest.raises(DatasetScriptError) as info:
        load(name, custom, val=val)
    return str(info.value.__cause__)


@pytest.fixture
def llava_dir(tmp_path):
    media(tmp_path / "data", "imgs/a.png", "imgs/b.png", "clips/v.mp4")
    return tmp_path / "data"


def test_llava_samples(llava_dir):
    entries = [
        {"id": "e1", "image": "imgs/a.png", "category": "shapes", "normalized_answer": "square",
         "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "A square.")]},
        {"id": 7, "image": ["imgs/a.png", "imgs/b.png"], "conversations": [
            turn("system", "Be brief."), turn("human", "Compare <image> and <image>."),
            turn("gpt", "Same."), turn("human", "Sure?"), turn("gpt", "Yes.")]},
        {"id": "e3", "image": "imgs/b.png",
         "conversations": [turn("human", "Describe."), turn("gpt", "Red.")]},
        {"id": "e4", "conversations": [turn("human", "2+2?"), turn("gpt", "4")]},
        {"id": "e5", "video": "clips/v.mp4", "image": "imgs/a.png", "conversations": [
            turn("human", "<video>\nWhat happens?"), turn("gpt", "It rolls.")]},
    ]  # fmt: skip
    path = write(llava_dir / "train.json", entries)
    samples = load("llava_json.py", {"dataset": {"annotation_path": str(path)}, "vision": VISION})
    a, b = (image(llava_dir / f"imgs/{name}.png", **IMAGE_LIMITS) for name in "ab")
    clip = image(llava_dir / "clips/v.mp4", **VISION)
    assert samples == [
        {"id": "e1", "messages": [user(a, text("What is it?")), assistant("A square.")],
         "answer": "A square.", "category": "shapes", "normalized_answer": "square"},
        {"id": "7", "messages": [
            {"role": "system", "content": "Be brief."},
            user(text("Compare "), a, text(" and "), b, text(".")), assistant("Same."),
            user("Sure?"), assistant("Yes.")], "answer": "Yes."},
        {"id": "e3", "messages": [user(b, text("Describe.")), assistant("Red.")], "answer": "Red."},
        {"id": "e4", "messages": [user("2+2?"), assistant("4")], "answer": "4"},
        {"id": "e5", "messages": [user(a, clip, text("What happens?")), assistant("It rolls.")],
         "answer": "It rolls."},
    ]  # fmt: skip


def test_llava_relative_paths_media_root_max_samples_validation(llava_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [elsewhere] = media(tmp_path, "pics/c.png")
    entry = {"id": "x", "image": "c.png", "conversations": [
        turn("human", "<image>"), turn("gpt", "Red.")]}  # fmt: skip
    write(llava_dir / "train.json", [entry, {**entry, "id": "y"}])
    custom = {"dataset": {"annotation_path": "data/train.json", "media_root": "pics"}}
    samples = load("llava_json.py", custom)
    assert [s["id"] for s in samples] == ["x", "y"]
    assert samples[0]["messages"][0] == user(image(elsewhere))
    custom["dataset"]["max_samples"] = 1
    assert [s["id"] for s in load("llava_json.py", custom)] == ["x"]
    message = failure("llava_json.py", custom, val=True)
    assert message.startswith("custom.dataset.val_annotation_path is not set")
    write(llava_dir / "val.json", [entry] * 3)  # its media resolve against media_root too
    custom["dataset"] |= {"val_annotation_path": "data/val.json", "val_max_samples": 2}
    assert [s["id"] for s in load("llava_json.py", custom, val=True)] == ["x", "x"]


LLAVA_BAD = {
    "no-file": ({"image": "imgs/nope.png", "conversations": [turn("human", "<image>"),
                 turn("gpt", "x")]}, "missing media file {data}/imgs/nope.png"),
    "no-convs": ({"image": "imgs/a.png"}, "malformed: no 'conversations' list"),
    "str-convs": ({"conversations": "hi"}, "malformed: the conversation must be a non-empty"),
    "bad-from": ({"conversations": [turn("bot", "x"), turn("gpt", "y")]}, "malformed: turn 0 is"),
    "empty": ({"conversations": [turn("human", " "), turn("gpt", "y")]},
              "malformed: turn 0 (user) has no content"),
    "bad-image": ({"image": 3, "conversations": QA},
                  "malformed: 'image' must be a file path"),
    "no-gpt": ({"conversations": [turn("human", "q")]}, "no assistant turn"),
    "count": ({"image": "imgs/a.png", "conversations": [turn("human", "<image> <image>"),
               turn("gpt", "a")]}, "malformed: 2 <image> placeholders for 1 image"),
}  # fmt: skip


@pytest.mark.parametrize("entry_id", list(LLAVA_BAD))
def test_llava_bad_entry_fails_naming_file_and_entry(llava_dir, entry_id):
    entry, problem = LLAVA_BAD[entry_id]
    good = {"id": "ok", "conversations": QA}
    path = write(llava_dir / "train.json", [good, {"id": entry_id, **entry}])
    message = failure("llava_json.py", {"dataset": {"annotation_path": str(path)}})
    assert message.startswith(f"{path}: entry {entry_id}: {problem.format(data=llava_dir)}")
    assert 'on_bad_entry = "skip"' in message


def test_llava_skip_keeps_good_entries_and_summarises(llava_dir, caplog):
    good = {"id": "ok", "image": "imgs/a.png", "conversations": QA}
    entries = [good] + [{"id": key, **entry} for key, (entry, _) in LLAVA_BAD.items()] + ["junk"]
    path = write(llava_dir / "train.json", entries)
    custom = {"dataset": {"annotation_path": str(path), "on_bad_entry": "skip"}}
    with caplog.at_level(logging.WARNING, logger="gantry.data"):
        samples = load("llava_json.py", custom)
    assert [s["id"] for s in samples] == ["ok"]
    lines = [r.getMessage() for r in caplog.records if r.name == "gantry.data"]
    assert len(lines) == len(LLAVA_BAD) + 2  # one per bad entry, then the summary
    junk = "entry 9: malformed: the entry is a str, expected an object (skipped)"
    assert lines[-2] == f"{path}: {junk}"
    kinds = "1 missing media, 7 malformed, 1 without an assistant turn"
    assert lines[-1] == f"skipped 9 of 10 entries of {path}: {kinds}"
    write(path, ["junk"])  # nothing left: an error, not an empty dataset
    message = failure("llava_json.py", custom)
    assert message == f"no usable entries: skipped 1 of 1 entries of {path}: 1 malformed"


@pytest.mark.parametrize(
    "custom, message",
    [
        ({"dataset": {"annotation_path": "t.json", "media_rot": "x"}},
         "custom.dataset.media_rot: unknown key; did you mean media_root?"),
        ({"dataset": {}}, "custom.dataset.annotation_path: required"),
        ({"dataset": {"annotation_path": "t.json", "on_bad_entry": "ignore"}},
         "custom.dataset.on_bad_entry: Input should be 'fail' or 'skip', got 'ignore'"),
        ({"dataset": {"annotation_path": "t.json", "max_samples": 0}},
         "custom.dataset.max_samples: Input should be greater than 0"),
        ({"dataset": "t.json"}, "custom.dataset must be a table"),
        ({"dataset": {"annotation_path": "t.json"}, "vision": {"max_pixel": 5}},
         "custom.vision.max_pixel: unknown key; did you mean max_pixels?"),
        ({"dataset": {"annotation_path": "t.json"}, "vision": {"min_pixels": 9, "max_pixels": 4}},
         "custom.vision: min_pixels is above max_pixels"),
        ({"dataset": {"annotation_path": "nowhere.json"}},
         "custom.dataset.annotation_path: {cwd}/nowhere.json does not exist"),
        ({"dataset": {"annotation_path": "t.json", "media_path": "a", "media_root": "b"}},
         "custom.dataset: media_path = 'a' and media_root = 'b' are two spellings of one setting"),
        ({"dataset": {"annotation_path": "t.json"}, "vision": {"nframes": 8}},
         "custom.vision: nframes is not supported by Gantry; sample videos with fps"),
        ({"dataset": {"annotation_path": "t.json"}, "vision": {"total_pixels": 8}},
         "custom.vision: total_pixels is not supported by Gantry; limit each image"),
        ({"dataset": {"annotation_path": "t.json"}, "vision": {"resized_height": 8}},
         "custom.vision: resized_height and resized_width go together"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path, monkeypatch, custom, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "t.json", [{"id": "a", "conversations": QA}])
    assert failure("llava_json.py", custom).startswith(message.format(cwd=tmp_path))


def test_the_cosmos_reason1_llava_recipe_keys_are_honoured(llava_dir, tmp_path, monkeypatch):
    """[custom.dataset] annotation_path / media_path / system_prompt and [custom.vision] fps /
    resized_width / resized_height, as the LLaVA guide and the warehouse recipe write them."""
    from gantry.data.media import load_media

    monkeypatch.chdir(tmp_path)
    entry = {"id": "w", "image": "imgs/a.png", "conversations": QA}
    write(llava_dir / "train_llava.json", [entry])
    vision = {"fps": 1, "resized_width": 90, "resized_height": 50}
    custom = {"dataset": {"annotation_path": "data/train_llava.json", "media_path": "data/",
                          "system_prompt": "Be brief."}, "vision": vision}  # fmt: skip
    [sample] = load("llava_json.py", custom)
    part = image(llava_dir / "imgs/a.png", resized_height=50, resized_width=90)
    assert sample["messages"] == [
        {"role": "system", "content": "Be brief."},
        user(part, text("q")),
        assistant("a"),
    ]
    assert load_media(sample["messages"]).images[0].size == (84, 56)  # smart_resize(50, 90)
    custom["dataset"]["media_root"] = "data/"  # both spellings, one value: accepted
    assert load("llava_json.py", custom) == [sample]
    custom["dataset"]["system_prompt"] = ""  # the guide's default: no system message
    assert load("llava_json.py", custom)[0]["messages"][0]["role"] == "user"


def test_meta_and_hf_accept_the_recipe_keys(meta_dir, tmp_path):
    [elsewhere] = media(tmp_path / "pool", "images/a.png")
    meta = write(meta_dir / "meta.json", [
        {"id": "a", "media": "images/a.png", "conversations": "text/a.json"}])  # fmt: skip
    custom = {"dataset": {"annotation_path": str(meta), "media_path": str(tmp_path / "pool"),
                          "system_prompt": "Look."}}  # fmt: skip
    [sample] = load("meta_json.py", custom)
    assert sample["messages"][:2] == [
        {"role": "system", "content": "Look."},
        user(image(elsewhere), text("What?")),
    ]
    rows = [
        {"conversations": json.dumps([user("<image>Q?"), assistant("A.")]), "images": ["a.png"]}
    ]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "hf")
    custom = {"dataset": {"path": str(tmp_path / "hf"), "messages_column": "conversations",
                          "media_path": str(tmp_path / "pool/images")}}  # fmt: skip
    [row] = load("hf_chat.py", custom)
    assert row["messages"] == [user(image(elsewhere), text("Q?")), assistant("A.")]


def test_build_samples_counts_bad_entries_by_kind():
    def build(entry, entry_id):
        if entry != "ok":
            raise malformed("bad") if entry == "bad" else EntryProblem(MISSING_MEDIA, "gone")
        return {"id": entry_id}

    bad = BadEntries("skip")
    samples = build_samples(["ok", "bad", "gone", "bad", "ok"], "f.json", build, bad=bad)
    assert samples == [{"id": "0"}, {"id": "4"}]
    assert bad.counts == {MALFORMED: 2, MISSING_MEDIA: 1}
    bad.report("f.json", "x", "odd")  # a plain string counts as malformed
    kinds = "1 missing media, 3 malformed"
    assert bad.summary("f.json", 6) == f"skipped 4 of 6 entries of f.json: {kinds}"
    with pytest.raises(BadEntryError, match=r"^f\.json: entry 1: malformed: bad"):
        build_samples(["ok", "bad"], "f.json", build)


@pytest.fixture
def meta_dir(tmp_path):
    data = tmp_path / "meta"
    media(data, "images/a.png", "images/b.png", "videos/v.mp4")
    write(data / "text/a.json", [user({"type": "image"}, text("What?")), assistant("Red.")])
    write(data / "text/b.json", [user("<image>\n<video>\nDescribe."), assistant("Rolls.")])
    write(data / "text/c.json", [
        {"role": "system", "content": "Look closely."},
        user({"type": "image", "path": "images/b.png", "max_pixels": 100}, text("And?")),
        assistant([text("Also "), text("red.")])])  # fmt: skip
    write(data / "text/d.json", [user("Describe."), assistant("Red.")])
    write(data / "text/none.json", [user("<image>")])
    write(data / "text/two.json", [user("<image><image>"), assistant("x")])
    (data / "text/broken.json").write_text("[{")
    return data


def test_meta_samples(meta_dir):
    entries = [
        {"id": "a", "media": "images/a.png", "conversations": "text/a.json", "level": 2},
        {"id": "b", "media": ["images/a.png", "videos/v.mp4"], "conversations": "text/b.json"},
        {"id": "c", "conversations": "text/c.json"},
        {"id": "d", "media": ["videos/v.mp4", "images/b.png"], "conversations": "text/d.json"},
    ]
    meta = write(meta_dir / "meta.json", entries)
    samples = load("meta_json.py", {"dataset": {"meta_path": str(meta)}, "vision": VISION})
    a, b = (image(meta_dir / f"images/{name}.png", **IMAGE_LIMITS) for name in "ab")
    clip = image(meta_dir / "videos/v.mp4", **VISION)
    assert samples == [
        {"id": "a", "messages": [user(a, text("What?")), assistant("Red.")], "answer": "Red.",
         "level": 2},
        {"id": "b", "messages": [user(a, clip, text("Describe.")), assistant("Rolls.")],
         "answer": "Rolls."},
        {"id": "c", "messages": [
            {"role": "system", "content": "Look closely."}, user({**b, "max_pixels": 100}, text("And?")),
            assistant([text("Also "), text("red.")])], "answer": "Also red."},
        {"id": "d", "messages": [user(b, clip, text("Describe.")), assistant("Red.")],
         "answer": "Red."},
    ]  # fmt: skip


META_BAD = {
    "lost": ("text/lost.json", "images/a.png", "missing conversation file {data}/text/lost.json"),
    "broken": ("text/broken.json", None, "cannot read conversation file {data}/text/broken.json"),
    "nomedia": ("text/a.json", "images/zz.png", "missing media file {data}/images/zz.png"),
    "noanswer": ("text/none.json", "images/a.png", "no assistant turn"),
    "count": ("text/two.json", "images/a.png", "malformed: 2 <image> placeholders for 1 image"),
    "noconv": (None, "images/a.png", "malformed: 'conversations' must name a conversation file"),
}


@pytest.mark.parametrize("entry_id", list(META_BAD))
def test_meta_bad_entry_fails_naming_file_and_entry(meta_dir, entry_id):
    conversation, files, problem = META_BAD[entry_id]
    entries = [{"id": "ok", "conversations": "text/d.json"},
               {"id": entry_id, "conversations": conversation, "media": files}]  # fmt: skip
    meta = write(meta_dir / "meta.json", entries)
    message = failure("meta_json.py", {"dataset": {"meta_path": str(meta)}})
    assert message.startswith(f"{meta}: entry {entry_id}: {problem.format(data=meta_dir)}")


def test_meta_skip_summary(meta_dir, caplog):
    entries = [{"id": "ok", "conversations": "text/d.json"}]
    entries += [{"id": k, "conversations": c, "media": m} for k, (c, m, _) in META_BAD.items()]
    meta = write(meta_dir / "meta.json", entries)
    custom = {"dataset": {"meta_path": str(meta), "on_bad_entry": "skip"}}
    with caplog.at_level(logging.WARNING, logger="gantry.data"):
        samples = load("meta_json.py", custom)
    assert [s["id"] for s in samples] == ["ok"]
    assert caplog.records[-1].getMessage() == (
        f"skipped 6 of 7 entries of {meta}: 1 missing media, 2 malformed, "
        "1 without an assistant turn, 2 with an unreadable conversation file"
    )
    assert failure("meta_json.py", custom, val=True).startswith("custom.dataset.val_meta_path is")


def hf_rows(images_dir: Path) -> list[dict]:
    media(images_dir, "a.png")
    # Arrow cannot mix string and list contents in one column: all are part lists here.
    red = assistant([text("Red.")])
    q = [user({"type": "image"}, text("Colour?")), red]
    explicit = [user({"type": "image", "image": "a.png"}, text("Hue?")), red]
    return [
        {"id": "r0", "messages": q, "images": [str(images_dir / "a.png")], "source": "s1"},
        {"id": "r1", "messages": explicit, "images": [], "source": "s2"},
    ]


def expected_hf(images_dir: Path, limits: dict) -> list[dict]:
    a = image(images_dir / "a.png", **limits)
    return [
        {"id": "r0", "messages": [user(a, text("Colour?")), assistant([text("Red.")])],
         "answer": "Red.", "source": "s1"},
        {"id": "r1", "messages": [user(a, text("Hue?")), assistant([text("Red.")])],
         "answer": "Red.", "source": "s2"},
    ]  # fmt: skip


def test_hf_saved_dataset(tmp_path):
    rows = hf_rows(tmp_path / "imgs")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    custom = {"dataset": {"path": str(tmp_path / "saved"), "media_root": str(tmp_path / "imgs")},
              "vision": {"max_pixels": 4096}}  # fmt: skip
    assert load("hf_chat.py", custom) == expected_hf(tmp_path / "imgs", {"max_pixels": 4096})
    assert failure("hf_chat.py", custom, val=True).startswith("custom.dataset.val_split is not")
    custom["dataset"]["val_split"] = "validation"
    message = failure("hf_chat.py", custom, val=True)
    assert message.startswith(f"custom.dataset.val_split: {tmp_path}/saved holds one Dataset")


def test_hf_dataset_dict_splits_and_subset(tmp_path):
    rows = hf_rows(tmp_path / "sets")  # relative paths resolve against `path`, not the subset
    splits = {"train": rows, "validation": rows[:1]}
    splits = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    splits.save_to_disk(tmp_path / "sets" / "chat")
    custom = {"dataset": {"path": str(tmp_path / "sets"), "subset": "chat"}}
    assert load("hf_chat.py", custom) == expected_hf(tmp_path / "sets", {})
    custom["dataset"] |= {"path": str(tmp_path / "sets" / "chat"), "subset": ""}
    custom["dataset"] |= {"media_root": str(tmp_path / "sets"), "val_split": "validation"}
    assert load("hf_chat.py", custom, val=True) == expected_hf(tmp_path / "sets", {})[:1]
    custom["dataset"]["split"] = "test"
    message = failure("hf_chat.py", custom).replace(str(tmp_path), "<tmp>")
    assert message.startswith("custom.dataset.split: <tmp>/sets/chat has no split 'test'")
    assert message.endswith("it has: train, validation")


def test_hf_json_file_placeholders_and_bad_rows(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    media(tmp_path, "a.png")
    rows = [
        {"messages": [user("<image>\nColour?"), assistant("Red.")], "image": "a.png"},
        {"messages": [user("<image>\nColour?"), assistant("Red.")], "image": "gone.png"},
        {"messages": [user("Hi")], "image": None},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    custom = {"dataset": {"path": str(path), "on_bad_entry": "skip"}}
    with caplog.at_level(logging.WARNING, logger="gantry.data"):
        samples = load("hf_chat.py", custom)
    assert samples == [{"id": "0", "messages": [user(image(tmp_path / "a.png"), text("Colour?")),
                                                assistant("Red.")], "answer": "Red."}]  # fmt: skip
    assert caplog.records[-1].getMessage() == (
        f"skipped 2 of 3 entries of {path}: 1 missing media, 1 without an assistant turn"
    )
    custom["dataset"]["on_bad_entry"] = "fail"
    assert failure("hf_chat.py", custom).startswith(f"{path}: entry 1: missing media file")


@pytest.mark.parametrize(
    "dataset, message",
    [
        ({"path": "{tmp}/nowhere"}, "custom.dataset.path: {tmp}/nowhere does not exist"),
        ({"path": "{tmp}/saved", "subset": "other"},
         "custom.dataset.subset: {tmp}/saved has no sub-directory 'other'"),
        ({"path": "{tmp}/saved", "messages_column": "chat"},
         "custom.dataset.messages_column: no column 'chat'; the columns are id, messages"),
        ({"path": "{tmp}/saved", "split_name": "x"}, "custom.dataset.split_name: unknown key"),
    ],
)  # fmt: skip
def test_hf_config_errors_name_the_key(tmp_path, dataset, message):
    rows = [{"id": "a", "messages": [user("q"), assistant("a")]}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    dataset = {key: value.format(tmp=tmp_path) for key, value in dataset.items()}
    assert failure("hf_chat.py", {"dataset": dataset}).startswith(message.format(tmp=tmp_path))


def test_answer_match_reward_through_each_script(tmp_path):
    sample = {"answer": "The answer is B.", "normalized_answer": "b"}
    assert answer_match_reward("<think>hmm</think><answer> (B) </answer>", sample) == 1.0
    assert answer_match_reward("b.", sample) == 1.0
    assert answer_match_reward("The answer is B.", sample) == 0.0
    assert answer_match_reward("  A  Red   square. ", {"answer": "a red square"}) == 1.0
    assert answer_match_reward("<answer>x</answer> then <answer>y</answer>", {"answer": "Y"}) == 1.0
    for name in ("llava_json.py", "meta_json.py", "hf_chat.py"):
        script = load_dataset_script(SCRIPTS / name)
        assert script.reward_fns == [answer_match_reward]
        assert script.score("<answer>**B**</answer>", sample, 0) == 1.0
