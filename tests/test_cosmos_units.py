"""gantry.cosmos pieces: the Config tree, packer forwarding checks, reward signatures, detection."""

import ast
import textwrap
import tomllib

import pytest

from gantry.cosmos.config import ConfigNode, config_class, cosmos_tree, to_toml
from gantry.cosmos.packers import _method_problem
from gantry.cosmos.samples import CosmosData, CosmosError
from gantry.cosmos.script import is_cosmos_script


def test_tree_layers_raw_under_resolved_and_fills_moved_keys():
    raw = {"train": {"enable_validation": True, "validation_step": 7, "cp_rotate": "x"}}
    resolved = {"train": {"epoch": 2}, "validation": {"batch_size": 4}}
    tree = cosmos_tree(resolved, raw)
    assert tree["train"]["cp_rotate"] == "x"  # kept, though Gantry does not use it
    assert tree["validation"]["enable"] is True and tree["validation"]["freq"] == 7
    assert tree["train"]["validation_batch_per_replica"] == 4  # CURRENT value, PINNED name
    assert tree["rollout"]["val_batch_size"] == 4
    assert tree["train"]["train_policy"]["dataset"]["name"] == ""  # cosmos-rl default


def test_policy_type_is_inferred_as_cosmos_rl_does_when_absent():
    assert (
        cosmos_tree(None, {"train": {"train_policy": {"kl_beta": 0.1}}})["train"]["train_policy"][
            "type"
        ]
        == "grpo"
    )
    assert cosmos_tree(None, {"custom": {}})["train"]["train_policy"]["type"] == "sft"
    sft = cosmos_tree({"train": {"train_policy": {"type": "sft", "kl_beta": 0.0}}})
    assert sft["train"]["train_policy"]["type"] == "sft"


def test_config_node_attribute_access_and_dump():
    config = ConfigNode(cosmos_tree({"custom": {"a": {"b": 1}}}))
    assert config.custom.a.b == 1 and config.custom["a"]["b"] == 1
    assert config.custom.get("missing", 3) == 3
    with pytest.raises(AttributeError, match="config has no key custom.nope"):
        _ = config.custom.nope
    dump = config.model_dump()
    dump["custom"]["a"]["b"] = 2
    assert config.custom.a.b == 1  # a copy


def test_from_dict_sets_timestamp_and_run_directory_as_cosmos_rl():
    config = config_class(cosmos_tree({"train": {"output_dir": "out"}})).from_dict({})
    assert config.train.timestamp and config.train.output_dir == f"out/{config.train.timestamp}"
    fixed = config_class(cosmos_tree(None)).from_dict({"train": {"timestamp": "t"}})
    assert fixed.train.output_dir == "./outputs"


def test_to_toml_round_trips():
    tree = {"a": 1, "b": {"c": [1.5, float("inf")], "d": {"e": "x\ny"}}, "n": None}
    assert tomllib.loads(to_toml(tree)) == {
        "a": 1,
        "b": {"c": [1.5, float("inf")], "d": {"e": "x\ny"}},
    }


def method(source):
    return ast.parse(textwrap.dedent(source)).body[0]


@pytest.mark.parametrize(
    "source",
    [
        "def get_rollout_input(self, item):\n    return self.under.get_rollout_input(item)\n",
        "def f(self, a, *args, **kw):\n    '''doc'''\n    return super().f(a, *args, **kw)\n",
        "def rollout_collate_fn(self, items):\n    return items\n",
        "def setup(self, c, t):\n    super().setup(c, t)\n    self.u = Qwen2_5_VLM_DataPacker()\n",
    ],
)
def test_forwarding_methods_pass(source):
    assert _method_problem(method(source)) == ""


@pytest.mark.parametrize(
    "source",
    [
        "def get_rollout_input(self, item):\n    return self.under.get_rollout_input(item[1:])\n",
        "def get_rollout_input(self, item):\n    return super().other(item)\n",
        "def setup(self, c, t):\n    self.template = 'x'\n",
        "def rollout_collate_fn(self, items):\n    items.sort()\n    return items\n",
    ],
)
def test_transforming_methods_fail(source):
    assert _method_problem(method(source))


def data(fn, grpo=True):
    tree = cosmos_tree({"train": {"train_policy": {"type": "grpo" if grpo else "sft"}}})
    args = {"dataset": ["p"], "reward_fns": [fn], "data_packer": "PACKER"}
    return CosmosData("s.py", ConfigNode(tree), "", args, grpo)


def test_reward_gets_only_the_keywords_it_accepts():
    seen = {}

    def narrow(to_be_evaluated, reference, prompt=None, data_packer=None):
        seen.update(prompt=prompt, packer=data_packer)
        return 1

    total = data(narrow).reward_fns()[0]("c", {"reference": "r", "cosmos_prompt": "p"})
    assert total == 1.0 and seen == {"prompt": "p", "packer": "PACKER"}


def test_tokenizer_is_loaded_only_when_used():
    def wide(to_be_evaluated, reference, **kwargs):
        return 0.0

    def uses_it(to_be_evaluated, reference, tokenizer=None):
        return float(len(tokenizer.encode(to_be_evaluated)))

    assert data(wide).reward_fns()[0]("c", {"reference": "r"}) == 0.0
    with pytest.raises(CosmosError, match="model_path"):
        data(uses_it).reward_fns()[0]("c", {"reference": "r"})


def test_reward_returning_text_is_refused():
    with pytest.raises(CosmosError, match="return a float"):
        data(lambda c, r: "1").reward_fns()[0]("c", {"reference": "r"})


def test_reward_infos_are_merged_and_kept_as_cosmos_rl_does():
    def accuracy(to_be_evaluated, reference):
        return 1.0, {"accuracy": 1.0, "shared": "a"}

    def fmt(to_be_evaluated, reference):
        return 0.5, {"format_ok": 0.0, "shared": "b"}

    tree = cosmos_tree({"train": {"train_policy": {"type": "grpo"}}})
    args = {"dataset": ["p"], "reward_fns": [accuracy, (fmt, 2.0)]}
    reward = CosmosData("s.py", ConfigNode(tree), "", args, True).reward_fns()[0]
    assert reward("c", {"reference": "r"}) == (
        2.0,
        {"accuracy": 1.0, "format_ok": 0.0, "shared": "b"},
    )
    assert data(lambda c, r: 0.25).reward_fns()[0]("c", {"reference": "r"}) == 0.25  # no info
    with pytest.raises(CosmosError, match="must be a dict"):
        data(lambda c, r: (1.0, [1])).reward_fns()[0]("c", {"reference": "r"})


def test_detection_reads_imports_without_running(tmp_path):
    path = tmp_path / "s.py"
    path.write_text("raise SystemExit\nimport cosmos_rl.utils.util as util\n")
    assert is_cosmos_script(path)
    path.write_text("from cosmos_rlx import y\nimport os\n")
    assert not is_cosmos_script(path)


@pytest.mark.parametrize(
    ("completion", "reference", "single_choice", "format_"),
    [
        ("<think>A or B</think>\n\n<answer>B</answer>", "B", 1.0, 1.0),
        ("<think>x</think>\n\n<answer> b </answer>", "<answer>B</answer>", 1.0, 1.0),
        ("<think>x</think>\n<answer>B</answer>", "B", 1.0, 0.0),  # one newline: bad format
        ("<think>a<think>b</think>\n\n<answer>C</answer>", "B", 0.0, 0.0),  # nested think
        ("B", "B", 1.0, 0.0),  # no tags: the whole text is the answer
        ("<think>x</think>\n\n<answer>A</answer> trailing", "A", 1.0, 0.0),
        ("<answer>A</answer>", None, 0.0, 0.0),  # no reference
    ],
)
def test_builtin_rewards_the_cosmos_reason1_script_imports(
    completion, reference, single_choice, format_
):
    from gantry.cosmos.rewards import format_reward_fn, single_choice_reward_fn

    assert single_choice_reward_fn(completion, reference, config=None) == single_choice
    assert format_reward_fn(completion, reference) == format_


def test_text_only_content_parts_become_one_string_for_text_models():
    from gantry.cosmos.samples import _text_parts_joined

    image = {"type": "image", "image": "a.png"}
    messages = [
        {"role": "system", "content": ""},
        {
            "role": "user",
            "content": [{"type": "text", "text": "1 + "}, {"type": "text", "text": "2"}],
        },
        {"role": "user", "content": [image, {"type": "text", "text": "what?"}]},
    ]
    joined = _text_parts_joined(messages)
    assert joined[1] == {"role": "user", "content": "1 + 2"}
    assert joined[0] == messages[0] and joined[2] == messages[2]  # media parts stay parts
    assert isinstance(messages[1]["content"], list)  # the dataset's own item is not changed
