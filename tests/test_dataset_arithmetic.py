"""datasets/arithmetic.py: the quickstart's dataset script, loaded by path as Gantry does."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "datasets" / "arithmetic.py"


@pytest.fixture(scope="module")
def arithmetic():
    spec = importlib.util.spec_from_file_location("gantry_user_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gantry_user_dataset"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gantry_user_dataset", None)


def total(module, completion, sample):
    return sum(fn(completion, sample) for fn in module.reward_fns)


def test_dataset_size_shape_and_answers(arithmetic):
    samples = arithmetic.get_dataset({"size": 50, "max_operand": 4})
    assert len(samples) == 50
    for sample in samples:
        message, reply = sample["messages"]
        assert message["role"] == "user"
        assert reply == {"role": "assistant", "content": sample["answer"]}
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\? .*", message["content"]).groups())
        assert 0 <= a <= 4 and 0 <= b <= 4
        assert sample["answer"] == str(a + b)


def test_dataset_defaults_and_determinism(arithmetic):
    default = arithmetic.get_dataset({})
    assert len(default) == 1000
    assert default == arithmetic.get_dataset({})
    assert default != arithmetic.get_dataset({"seed": 1})
    wide = arithmetic.get_dataset({"size": 500, "max_operand": 9})
    assert max(int(s["answer"]) for s in wide) > 8


def test_rewards_on_hand_written_completions(arithmetic):
    sample = {"messages": [{"role": "user", "content": "What is 3 + 4?"}], "answer": "7"}
    assert total(arithmetic, "7", sample) == pytest.approx(1.1)
    assert total(arithmetic, " 7\n", sample) == pytest.approx(1.1)
    assert total(arithmetic, "7 is the sum", sample) == pytest.approx(1.1)
    # Correct but not answered first: no format credit.
    assert total(arithmetic, "The sum is 7.", sample) == pytest.approx(1.0)
    # Wrong but well formed: format credit only.
    assert total(arithmetic, "8", sample) == pytest.approx(0.1)
    assert total(arithmetic, "-7", sample) == pytest.approx(0.1)
    # Digit spam is neither correct nor well formed.
    assert total(arithmetic, "7777", sample) == 0.0
    assert total(arithmetic, "77", sample) == 0.0
    # Malformed and empty.
    assert total(arithmetic, "seven", sample) == 0.0
    assert total(arithmetic, "", sample) == 0.0
    assert total(arithmetic, "   ", sample) == 0.0
    assert total(arithmetic, "9" * 5000, sample) == 0.0


def test_two_digit_answers(arithmetic):
    sample = {"messages": [{"role": "user", "content": "What is 9 + 9?"}], "answer": "18"}
    assert total(arithmetic, "18", sample) == pytest.approx(1.1)
    assert total(arithmetic, "1", sample) == pytest.approx(0.1)
    assert total(arithmetic, "181", sample) == 0.0


def test_rewards_are_floats(arithmetic):
    sample = arithmetic.get_dataset({"size": 1})[0]
    for fn in arithmetic.reward_fns:
        for completion in ["", sample["answer"], "x"]:
            assert type(fn(completion, sample)) is float
