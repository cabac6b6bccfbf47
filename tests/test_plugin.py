"""Dataset scripts: loading by path, and errors that name the script, function and sample."""

import textwrap

import pytest

from gantry.data.plugin import DatasetScriptError, load_dataset_script, prompt_messages


def script(tmp_path, body: str):
    path = tmp_path / "my_dataset.py"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
def get_dataset(config):
    return [{"prompt": f"say {i}", "answer": str(i)} for i in range(config.get("n", 3))]

def exact(completion, sample, **kw):
    return float(completion.strip() == sample["answer"])

reward_fns = [exact]
"""


def test_plain_objects_script_loads_and_scores(tmp_path):
    loaded = load_dataset_script(script(tmp_path, GOOD))
    samples = loaded.load_samples({"n": 4})
    assert len(samples) == 4
    assert loaded.score(" 2 ", samples[2], 2) == 1.0
    assert loaded.score("x", samples[2], 2) == 0.0
    assert prompt_messages(samples[1]) == [{"role": "user", "content": "say 1"}]


def test_missing_file(tmp_path):
    with pytest.raises(DatasetScriptError, match="does not exist"):
        load_dataset_script(tmp_path / "nope.py")


def test_import_error_names_the_script(tmp_path):
    path = script(tmp_path, "import not_a_module_anywhere\n")
    with pytest.raises(DatasetScriptError, match="my_dataset.py.*ModuleNotFoundError"):
        load_dataset_script(path)


def test_missing_get_dataset_and_rewards(tmp_path):
    with pytest.raises(DatasetScriptError, match="get_dataset"):
        load_dataset_script(script(tmp_path, "reward_fns = []\n"))
    no_rewards = script(tmp_path, "def get_dataset(config):\n    return [{'prompt': 'a'}]\n")
    with pytest.raises(DatasetScriptError, match="reward_fns"):
        load_dataset_script(no_rewards)
    assert load_dataset_script(no_rewards, need_rewards=False).reward_fns == []


def test_reward_that_raises_names_function_and_sample(tmp_path):
    body = GOOD.replace('return float(completion.strip() == sample["answer"])', "return 1 / 0")
    loaded = load_dataset_script(script(tmp_path, body))
    samples = loaded.load_samples({})
    with pytest.raises(DatasetScriptError) as info:
        loaded.score("1", samples[1], 1)
    text = str(info.value)
    assert "my_dataset.py" in text and "reward function exact" in text
    assert "ZeroDivisionError" in text and "sample 1" in text and "'say 1'" in text


def test_reward_must_return_a_number(tmp_path):
    body = GOOD.replace('return float(completion.strip() == sample["answer"])', 'return "yes"')
    loaded = load_dataset_script(script(tmp_path, body))
    with pytest.raises(DatasetScriptError, match="returned 'yes'"):
        loaded.score("1", loaded.load_samples({})[0], 0)


@pytest.mark.parametrize("value", ["float('inf')", "-float('inf')", "float('nan')"])
def test_a_non_finite_reward_is_refused_naming_function_and_sample(tmp_path, value):
    """One inf reward would make the advantages, the loss and then every weight NaN."""
    from gantry.run.runtime import is_deterministic

    body = GOOD.replace('return float(completion.strip() == sample["answer"])', f"return {value}")
    loaded = load_dataset_script(script(tmp_path, body))
    with pytest.raises(DatasetScriptError, match="finite float") as info:
        loaded.score("1", loaded.load_samples({})[1], 1)
    assert "reward function exact" in str(info.value) and "sample 1" in str(info.value)
    assert is_deterministic(info.value, started=True)  # the run ends, no restart


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("[]", "no samples"),
        ("[{'text': 'x'}]", "'messages'"),
        ("42", "no len"),
        ("{'a': {'prompt': 'x'}}", "returned a dict; return a list of samples"),
        ("'say 1'", "returned a str"),
        ("1/0", "ZeroDivisionError"),
    ],
)
def test_bad_datasets(tmp_path, dataset, message):
    body = f"def get_dataset(config):\n    return {dataset}\n\nreward_fns = [lambda c, s: 0.0]\n"
    loaded = load_dataset_script(script(tmp_path, body))
    with pytest.raises(DatasetScriptError, match=message):
        loaded.load_samples({})


# ---- a run's rewards: weights, batched, async, (value, info), overlong (gantry.data.rewards)

REWARDS = """
import asyncio

def get_dataset(config):
    return [{"prompt": "p", "answer": "ab"}]

def exact(completion, sample):
    return float(completion == sample["answer"]), {"chars": len(completion)}

def longest(completions, sample):  # batched: compares the group's completions
    top = max(len(c) for c in completions)
    return [float(len(c) == top) for c in completions]
longest.batched = True

CALLS = []

async def slow_judge(completion, sample):
    CALLS.append(completion)
    await asyncio.sleep(0.3)  # the group's calls overlap: n x 0.3 s would be far longer
    return 0.5 if "b" in completion else 0.0

reward_fns = [exact, longest, slow_judge]
"""


def reward_set(tmp_path, body=REWARDS, max_len=100, **policy):
    from gantry.config.training import TrainPolicyConfig
    from gantry.data.rewards import RewardSet

    loaded = load_dataset_script(script(tmp_path, body))
    return RewardSet(loaded, TrainPolicyConfig(**policy), max_len), loaded.load_samples({})[0]


def test_weights_batched_async_and_info_against_hand_computed_values(tmp_path):
    import time

    rewards, sample = reward_set(
        tmp_path, reward_function={"exact": 2.0, "longest": 0.5, "slow_judge": 1.0}
    )
    assert rewards.names == ["exact", "longest", "slow_judge"]
    started = time.perf_counter()
    scored = rewards.score_group(["ab", "a", "abb", "b"], [2, 1, 3, 1], sample, 0)
    assert time.perf_counter() - started < 0.9  # 4 async calls of 0.3 s ran concurrently
    # ab: 2*1 + 0.5*0 + 0.5 ; a: 0 ; abb: 0 + 0.5*1 + 0.5 ; b: 0 + 0 + 0.5
    assert [total for total, _, _ in scored] == [2.5, 0.0, 1.0, 0.5]
    assert [parts for _, parts, _ in scored][2] == [0.0, 1.0, 0.5]  # unweighted parts
    assert [info for _, _, info in scored] == [
        {"chars": 2},
        {"chars": 1},
        {"chars": 3},
        {"chars": 1},
    ]


def test_reward_function_names_resolve_or_fail_in_one_line(tmp_path):
    rewards, _ = reward_set(tmp_path, reward_function=["exact", "longest", "slow_judge"])
    assert rewards.weights == [1.0, 1.0, 1.0]
    with pytest.raises(DatasetScriptError, match="names 'accuracy', which is no reward function"):
        reward_set(tmp_path, reward_function="accuracy")
    with pytest.raises(DatasetScriptError, match="gives no weight to 'longest'"):
        reward_set(tmp_path, reward_function={"exact": 1.0, "slow_judge": 0.0})


def test_overlong_penalty_rises_linearly_in_the_buffer_zone(tmp_path):
    from gantry.config.rewards import overlong_penalty

    # max 100 tokens, buffer 40: no penalty up to 60 tokens, then -(len - 60) / 40 * 2
    assert overlong_penalty(60, 100, 40, 2.0) == 0.0
    assert overlong_penalty(70, 100, 40, 2.0) == -0.5
    assert overlong_penalty(100, 100, 40, 2.0) == -2.0
    rewards, sample = reward_set(
        tmp_path,
        max_len=100,
        overlong_reward={
            "enable_overlong_penalty": True,
            "buffer_length": 40,
            "penalty_factor": 2.0,
        },
        reward_function={"exact": 1.0, "longest": 0.0, "slow_judge": 0.0},
    )
    assert rewards.names[-1] == "overlong" and rewards.weights[-1] == 1.0
    scored = rewards.score_group(["ab", "x"], [50, 90], sample, 0)
    assert [total for total, _, _ in scored] == [1.0, -1.5]
    with pytest.raises(DatasetScriptError, match="buffer_length = 4096 is longer than"):
        reward_set(tmp_path, max_len=100, overlong_reward={"enable_overlong_penalty": True})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def bad(cs, sample): return [1.0]\nbad.batched = True", "must return a list of 2 floats"),
        ("def bad(cs, sample): return [1.0, float('nan')]\nbad.batched = True", "finite float"),
        ("async def bad(c, sample): return 'high'", "returned 'high'"),
        ("def bad(c, sample): return 1.0, 'note'", "must be a dict"),
        ("async def bad(c, sample): raise KeyError('label')", "bad raised KeyError"),
    ],
)
def test_a_wrong_batched_or_async_reward_is_refused_naming_it(tmp_path, body, message):
    text = (
        "def get_dataset(config):\n    return [{'prompt': 'p'}]\n" + body + "\nreward_fns = [bad]\n"
    )
    rewards, sample = reward_set(tmp_path, text)
    with pytest.raises(DatasetScriptError, match=message):
        rewards.score_group(["a", "b"], [1, 1], sample, 0)


def test_cosmos_overlong_reward_fn_reads_the_run_config(tmp_path):
    from types import SimpleNamespace

    from gantry.config import load_config
    from gantry.cosmos.rewards import overlong_reward_fn

    config = load_config(
        None,
        [
            "rollout.max_response_length=10",
            "train.train_policy.overlong_reward.buffer_length=4",
            "train.train_policy.overlong_reward.penalty_factor=2.0",
        ],
    )
    chars = SimpleNamespace(encode=lambda text, add_special_tokens: list(text))  # a token a char
    # 6 = 10 - 4 tokens free; 8 tokens: -(8 - 6) / 4 * 2 = -1
    assert overlong_reward_fn("abcdef", "x", config=config, tokenizer=chars) == 0.0
    assert overlong_reward_fn("abcdefgh", "x", config=config, tokenizer=chars) == -1.0
