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
