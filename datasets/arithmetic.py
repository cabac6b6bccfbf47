"""Single-digit addition: the quickstart's toy GRPO task.

Each prompt asks "What is 3 + 4? Reply with only the number." with operands drawn from
0..max_operand. Two rewards, summed:
  correct_reward  1.0 when the first integer in the reply equals a + b
  format_reward   0.1 when the reply begins with a number (of at most the answer's length),
                  as the prompt asks
The small format credit gives a randomly initialised model something to learn before it
ever gets a sum right; with real models it hardly matters.

Each sample is the question and its answer as an assistant turn: GRPO prompts with the
question, SFT (configs/quickstart-sft.toml) trains on the answer. Run it with
    ./launch.sh --config configs/quickstart-grpo.toml datasets/arithmetic.py
Knobs come from the config's [custom] section: seed, size, max_operand.
"""

import random
import re

_INTEGER = re.compile(r"-?\d+")


def get_dataset(config):
    rng = random.Random(config.get("seed", 0))
    top = config.get("max_operand", 4)
    samples = []
    for _ in range(config.get("size", 1000)):
        a, b = rng.randint(0, top), rng.randint(0, top)
        question = f"What is {a} + {b}? Reply with only the number."
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": str(a + b)},  # the reference: SFT trains on it
        ]
        samples.append({"messages": messages, "answer": str(a + b)})
    return samples


def get_val_dataset(config):
    """Held-out questions for SFT validation and evaluation (another seed)."""
    return get_dataset({**config, "seed": config.get("seed", 0) + 1, "size": 64})


def first_integer(text):
    """The first integer in `text` ("The sum is 7." -> 7), or None."""
    match = _INTEGER.search(text)
    return int(match.group()) if match and len(match.group()) <= 20 else None


def correct_reward(completion, sample, **kw):
    return 1.0 if first_integer(completion) == int(sample["answer"]) else 0.0


def format_reward(completion, sample, **kw):
    match = _INTEGER.match(completion.strip())
    # No longer than the answer: "5555..." is digit spam, not a well-formed sum.
    return 0.1 if match and len(match.group().lstrip("-")) <= len(sample["answer"]) else 0.0


reward_fns = [correct_reward, format_reward]
