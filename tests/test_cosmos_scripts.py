"""cosmos-rl-shaped dataset scripts through gantry.data.plugin.load_dataset_script (gantry.cosmos)."""

import pickle
import sys
import textwrap

import pytest

from gantry.config import load_config
from gantry.data.plugin import DatasetScriptError, load_dataset_script, prompt_messages

GRPO_SCRIPT = '''
import argparse
import tomllib

from torch.utils.data import Dataset

from cosmos_rl.dispatcher.data.packer import DataPacker, DecoderOnlyLLMDataPacker
from cosmos_rl.launcher.worker_entry import main as launch_worker
from cosmos_rl.policy.config import Config
from cosmos_rl.policy.config import Config as CosmosConfig
from cosmos_rl.utils.logging import logger
from cosmos_rl.utils.util import basename_from_modelpath


class SumDataset(Dataset):
    def setup(self, config, tokenizer, *args, **kwargs):
        self.tokenizer = tokenizer
        n = config.custom.get("size", 6)
        self.items = [(i % 5, (i * 3) % 5) for i in range(n)]
        self.name = config.train.train_policy.dataset.name

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        a, b = self.items[idx]
        return [{"role": "user", "content": f"What is {a} + {b}?"}]

    def get_reference_answer(self, idx):
        a, b = self.items[idx]
        return str(a + b)


def exact(to_be_evaluated, reference, *args, **kwargs):
    assert kwargs["tokenizer"].encode("4") and "config" in kwargs and "prompt" in kwargs
    return float(to_be_evaluated.strip() == reference)


def short(to_be_evaluated, reference, config=None):
    return (0.5 if len(to_be_evaluated) <= config.custom["short"] else 0.0), {"len": 1}


class ForwardingPacker(DataPacker):
    """Forwards everything to the decoder-only packer."""

    def __init__(self):
        super().__init__()
        self.underlying = DecoderOnlyLLMDataPacker()

    def setup(self, config, tokenizer, *args, **kwargs):
        super().setup(config, tokenizer, *args, **kwargs)
        self.underlying.setup(config, tokenizer, *args, **kwargs)

    def get_rollout_input(self, item):
        return self.underlying.get_rollout_input(item)

    def rollout_collate_fn(self, items):
        return super().rollout_collate_fn(items)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=str, required=True)
    args = parser.parse_known_args()[0]
    with open(args.config, "rb") as f:
        config = tomllib.load(f)
    config = Config.from_dict(config)
    logger.info("model %s", basename_from_modelpath(config.policy.model_name_or_path))

    def get_dataset(config: CosmosConfig):
        return SumDataset()

    launch_worker(dataset=get_dataset, reward_fns=[exact, (short, 2.0)], data_packer=ForwardingPacker())
'''


def write(tmp_path, body, name="cosmos_script.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def grpo_config(tmp_path, *overrides):
    return load_config(
        "configs/quickstart-grpo.toml",
        ["custom.size=6", "custom.short=2", f"train.output_dir={tmp_path}", *overrides],
    )


def test_grpo_script_maps_items_references_and_rewards(tmp_path, tiny_model_dir):
    script = load_dataset_script(
        write(tmp_path, GRPO_SCRIPT), config=grpo_config(tmp_path), model_path=str(tiny_model_dir)
    )
    samples = script.load_samples({})
    assert len(samples) == 6
    assert prompt_messages(samples[1]) == [{"role": "user", "content": "What is 1 + 3?"}]
    assert samples[1]["reference"] == "4"
    assert script.score("4", samples[1], 1) == 1.0 + 2.0 * 0.5
    assert script.score("41 wrong", samples[1], 1) == 0.0
    assert script.get_val_dataset is None
    assert "cosmos_rl" not in sys.modules  # provided only while the script ran
    plain = pickle.loads(pickle.dumps(samples))  # SFT encoder processes get plain dicts
    assert plain == list(samples)


def test_reference_without_get_reference_answer_is_empty(tmp_path):
    body = """
    from cosmos_rl.launcher.worker_entry import main as launch_worker

    class Prompts:
        def __len__(self):
            return 2
        def __getitem__(self, idx):
            return f"say {idx}"

    def reward(to_be_evaluated, reference):
        return 1.0 if reference == "" else 0.0

    if __name__ == "__main__":
        launch_worker(dataset=Prompts(), reward_fns=[reward])
    """
    script = load_dataset_script(write(tmp_path, body), config=grpo_config(tmp_path))
    samples = script.load_samples({})
    assert prompt_messages(samples[0]) == [{"role": "user", "content": "say 0"}]
    assert script.score("x", samples[0], 0) == 1.0


SFT_SCRIPT = """
import cosmos_rl.launcher.worker_entry
import cosmos_rl.policy.config


class Conversations:
    def setup(self, config, *args, **kwargs):  # CURRENT style: setup(config)
        self.n = config.custom["size"]

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        return [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Echo {idx}"},
            {"role": "assistant", "content": str(idx)},
        ]


if __name__ == "__main__":
    cosmos_rl.launcher.worker_entry.main(dataset=Conversations())
"""


def test_sft_conversations_and_split_validation(tmp_path):
    config = load_config(
        "configs/quickstart-sft.toml", ["custom.size=20", f"train.output_dir={tmp_path}"]
    )
    script = load_dataset_script(write(tmp_path, SFT_SCRIPT), need_rewards=False, config=config)
    train = script.load_samples({})
    val = script.load_val_samples({})
    assert (len(train), len(val)) == (18, 2)  # cosmos-rl: the first 10% of the items
    assert train[0]["messages"][2] == {"role": "assistant", "content": "2"}
    assert val[1]["messages"][1]["content"] == "Echo 1"
    assert script.reward_fns == []


def test_config_values_reach_the_factory(tmp_path):
    source = tmp_path / "cosmos.toml"
    source.write_text('[train.train_policy.dataset]\nname = "nvidia/Data"\ntest_size = 3\n')
    out = tmp_path / "seen.txt"
    body = f"""
    from cosmos_rl.launcher.worker_entry import main as launch_worker

    def factory(config):
        values = [
            config.train.train_policy.dataset.name,
            config.policy.model_name_or_path,
            config.train.enable_validation,
            config.validation.enable,
            config.model_dump()["train"]["train_policy"]["dataset"]["test_size"],
            config.custom.size,
        ]
        open({str(out)!r}, "w").write(repr(values))
        return ["p0", "p1"]

    if __name__ == "__main__":
        launch_worker(dataset=factory, reward_fns=[lambda c, r: 0.0])
    """
    config = grpo_config(tmp_path, "validation.enable=true")
    script = load_dataset_script(write(tmp_path, body), config=config, config_source=source)
    script.load_samples({})
    assert out.read_text() == repr(["nvidia/Data", "gantry:tiny-qwen2", True, True, 3, 6])


TRANSFORMING = """
from cosmos_rl.dispatcher.data.packer import DataPacker
from cosmos_rl.launcher.worker_entry import main as launch_worker

class Upper(DataPacker):
    def get_rollout_input(self, item):
        return item.upper()

if __name__ == "__main__":
    launch_worker(dataset=["a"], reward_fns=[lambda c, r: 0.0], data_packer=Upper())
"""


def test_transforming_packer_is_refused_by_class_and_method(tmp_path):
    with pytest.raises(DatasetScriptError, match=r"Upper\.get_rollout_input"):
        load_dataset_script(write(tmp_path, TRANSFORMING), config=grpo_config(tmp_path))


def test_builtin_packer_subclass_without_overrides_is_accepted(tmp_path):
    body = TRANSFORMING.replace(
        "    def get_rollout_input(self, item):\n        return item.upper()\n", "    pass\n"
    )
    script = load_dataset_script(write(tmp_path, body), config=grpo_config(tmp_path))
    assert len(script.load_samples({})) == 1


@pytest.mark.parametrize("argument", ["dataloader", "sampler", "hook_fns", "filter_reward_fns"])
def test_unsupported_launch_worker_arguments_are_refused_by_name(tmp_path, argument):
    body = f"""
    from cosmos_rl.launcher.worker_entry import main as launch_worker

    if __name__ == "__main__":
        launch_worker(dataset=["a"], reward_fns=[lambda c, r: 0.0], {argument}=object())
    """
    with pytest.raises(DatasetScriptError, match=rf"launch_worker\({argument}=\.\.\.\)"):
        load_dataset_script(write(tmp_path, body), config=grpo_config(tmp_path))


def test_script_that_never_calls_launch_worker(tmp_path):
    body = "import cosmos_rl.launcher.worker_entry\n"
    with pytest.raises(DatasetScriptError, match="never called launch_worker"):
        load_dataset_script(write(tmp_path, body), config=grpo_config(tmp_path))


def test_unprovided_cosmos_module_names_itself(tmp_path):
    body = "from cosmos_rl.dispatcher.replica import Rollout\n"
    with pytest.raises(DatasetScriptError, match=r"cosmos_rl\.dispatcher\.replica is not provided"):
        load_dataset_script(write(tmp_path, body), config=grpo_config(tmp_path))


def test_unprovided_builtin_reward_names_what_is_provided(tmp_path):
    body = "from cosmos_rl.dispatcher.algo.reward import boxed_math_reward_fn\n"
    with pytest.raises(DatasetScriptError, match=r"boxed_math_reward_fn.*format_reward_fn"):
        load_dataset_script(write(tmp_path, body), config=grpo_config(tmp_path))


def test_grpo_without_reward_fns_is_refused(tmp_path):
    body = """
    from cosmos_rl.launcher.worker_entry import main as launch_worker

    if __name__ == "__main__":
        launch_worker(dataset=["a"])
    """
    with pytest.raises(DatasetScriptError, match="reward_fns"):
        load_dataset_script(write(tmp_path, body), config=grpo_config(tmp_path))


def test_prestart_check_runs_a_cosmos_script_in_a_child_process(tmp_path, tiny_model_dir):
    from gantry.data.script_check import check_dataset_script

    config = grpo_config(tmp_path)
    path, size = check_dataset_script(
        write(tmp_path, GRPO_SCRIPT),
        config=config,
        need_rewards=True,
        validation=False,
        model_path=str(tiny_model_dir),
    )
    assert (path.name, size) == ("cosmos_script.py", 6)
    with pytest.raises(DatasetScriptError, match=r"Upper\.get_rollout_input"):
        check_dataset_script(
            write(tmp_path, TRANSFORMING, "bad.py"),
            config=config,
            need_rewards=True,
            validation=False,
        )


def test_an_installed_cosmos_rl_is_replaced_for_the_script_and_put_back(
    tmp_path, monkeypatch, caplog
):
    real = tmp_path / "site" / "cosmos_rl"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import cosmos_rl  # the "installed" one

    body = """
    import cosmos_rl
    from cosmos_rl.launcher.worker_entry import main as launch_worker

    assert not hasattr(cosmos_rl, "REAL")
    if __name__ == "__main__":
        launch_worker(["a", "b"], None, [lambda c, r: 1.0])  # PINNED's positional order
    """
    monkeypatch.setattr("gantry.cosmos.modules._said_shadowed", False)
    with caplog.at_level("INFO", logger="gantry.cosmos"):
        script = load_dataset_script(write(tmp_path, body), config=grpo_config(tmp_path))
    assert "replaces it" in caplog.text
    assert sys.modules["cosmos_rl"] is cosmos_rl and cosmos_rl.REAL
    assert script.score("x", script.load_samples({})[1], 1) == 1.0
    monkeypatch.delitem(sys.modules, "cosmos_rl")


def test_a_cosmos_script_without_the_run_config_is_refused(tmp_path):
    """Without the run's config its Config would hold cosmos-rl's defaults, not the user's."""
    with pytest.raises(DatasetScriptError, match="load it with the run's config"):
        load_dataset_script(write(tmp_path, GRPO_SCRIPT))
