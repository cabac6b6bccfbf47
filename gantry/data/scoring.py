"""Scoring and reporting for the evaluation command: compares model predictions with reference
answers, aggregates per-category metrics, and writes the JSON report and the text table.
Pure Python (no torch, no vLLM): the command runs inference, then hands this module a list of
records, one per validation sample:

    {"id": "q1", "category": "counting", "prediction": "<think>...</think><answer>B</answer>",
     "reference": "B", "choices": ["two", "three"], "answer_type": "multiple_choice"}

`category` defaults to "uncategorized"; `choices` (option texts for A, B, C, ...) and
`answer_type` ("text", "multiple_choice" or "numeric") are optional. Without `answer_type` the
type is inferred: multiple choice when the reference is a single capital letter or names one of
the `choices`, numeric when the reference is a number, text otherwise.

Every prediction is first reduced to its answer: a `<think>...</think>` block is dropped and the
content of an `<answer>...</answer>` tag is kept when there is one (Cosmos-Reason outputs).
A numeric prediction is correct when `abs_error <= ABS_TOL` or `rel_error <= REL_TOL` (1%).

Usage, from the evaluation command:
    summary = summarize(records)
    write_report(records, summary, run_dir / "eval.json")
    print(format_table(summary))
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from gantry.run.checkpoints import write_json_atomic

TEXT = "text"
MULTIPLE_CHOICE = "multiple_choice"
NUMERIC = "numeric"
ANSWER_TYPES = (TEXT, MULTIPLE_CHOICE, NUMERIC)
UNCATEGORIZED = "uncategorized"
LETTERS = string.ascii_uppercase

REL_TOL = 1e-2  # a numeric answer within 1% of the reference is correct ...
ABS_TOL = 1e-6  # ... and so is one within 1e-6 of it (the only way to match a reference of 0)

# --- answer extraction ------------------------------------------------------------------------

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_LEADING_PHRASE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is\b\s*:?|:)\s*")
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def extract_answer(text: str) -> str:
    """The answer part of a model output: without <think> blocks, the content of the last
    <answer> tag when there is one, stripped. An unclosed <think> (a generation cut off while
    reasoning) drops everything after it; an unclosed <answer> keeps everything after it."""
    text = _THINK_BLOCK.sub(" ", text)
    lowered = text.lower()
    if "</think>" in lowered:  # the opening tag was part of the prompt
        text = text[lowered.rindex("</think>") + len("</think>") :]
    elif "<think>" in lowered:
        text = text[: lowered.index("<think>")]
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lowered = text.lower()
    if "<answer>" in lowered:
        return text[lowered.rindex("<answer>") + len("<answer>") :].strip()
    return text.strip()


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization of the answer part of `text`: lowercase, no leading
    "answer:" / "the answer is", no punctuation, no articles (unless the answer is nothing
    but articles), single spaces."""
    text = extract_answer(text).lower()
    text = _LEADING_PHRASE.sub("", text)
    words = text.translate(_PUNCTUATION).split()
    content = [word for word in words if word not in _ARTICLES]
    return " ".join(content or words)  # "A" stays "a": option A is an answer, not an article


# --- multiple choice --------------------------------------------------------------------------

_LONE_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?[.:)]?")
# "Answer: B", "the answer is (c)", "The answer is option C", "answer: b." (a lowercase letter
# only in parentheses or at the end, so that "the answer is a dog" picks nothing)
_ANSWER_PHRASE_LETTER = re.compile(
    r"(?i:answer\s*(?:is|:)\s*:?\s*(?:(?:option|choice)\s*)?)"
    r"(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z])|([a-z])[.)]?\s*$)"
)
_LEADING_LETTER = re.compile(r"^\(?([A-Z])[.):](?:\s|$)")  # "B. Paris", "(B) Paris"
_PARENTHESIZED_LETTER = re.compile(r"\(([A-Z])\)")


def extract_choice(
    prediction: str, n_choices: int | None = None, choices: Sequence[str] | None = None
) -> str | None:
    """The option letter ("A", "B", ...) a prediction picks, or None when it picks none.

    Tried in order on the answer part of the prediction: a lone letter ("B", "(B)", "b."),
    the last "answer is X" / "Answer: X", a leading "B." or "(B)", the full text of one of
    `choices` (equal after normalization, or the only one contained in the answer), the last
    "(B)" anywhere. Only the first `n_choices` letters count (default: len(choices), else 26).
    """
    allowed = _allowed_letters(n_choices, choices)
    answer = extract_answer(prediction).strip("*`_ \t\n")
    for find in (_find_lone_letter, _find_answer_phrase_letter, _find_leading_letter):
        letter = find(answer, allowed)
        if letter is not None:
            return letter
    if choices:
        letter = _find_choice_text(answer, choices)
        if letter is not None:
            return letter
    return _last_in(allowed, [m.group(1) for m in _PARENTHESIZED_LETTER.finditer(answer)])


def _allowed_letters(n_choices: int | None, choices: Sequence[str] | None) -> str:
    n = n_choices if n_choices is not None else (len(choices) if choices else len(LETTERS))
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"n_choices must be between 1 and 26, got {n}")
    return LETTERS[:n]


def _last_in(allowed: str, letters: Iterable[str]) -> str | None:
    found = [letter.upper() for letter in letters if letter.upper() in allowed]
    return found[-1] if found else None


def _find_lone_letter(answer: str, allowed: str) -> str | None:
    match = _LONE_LETTER.fullmatch(answer)
    return _last_in(allowed, [match.group(1)]) if match else None


def _find_answer_phrase_letter(answer: str, allowed: str) -> str | None:
    letters = [next(g for g in m.groups() if g) for m in _ANSWER_PHRASE_LETTER.finditer(answer)]
    return _last_in(allowed, letters)


def _find_leading_letter(answer: str, allowed: str) -> str | None:
    match = _LEADING_LETTER.match(answer)
    return _last_in(allowed, [match.group(1)]) if match else None


def _find_choice_text(answer: str, choices: Sequence[str]) -> str | None:
    normalized = normalize_answer(answer)
    options = [normalize_answer(choice) for choice in choices]
    equal = [i for i, option in enumerate(options) if option and option == normalized]
    if equal:
        return LETTERS[equal[0]]
    padded = f" {normalized} "
    contained = [i for i, option in enumerate(options) if option and f" {option} " in padded]
    return LETTERS[contained[0]] if len(contained) == 1 else None


def reference_choice(reference: str, choices: Sequence[str] | None = None) -> str | None:
    """The option letter a reference answer names: a lone letter ("B", "(b)") or, when
    `choices` are given, the text of one of them. None when it names none."""
    answer = extract_answer(reference)
    match = _LONE_LETTER.fullmatch(answer)
    if match:
        return match.group(1).upper()
    if choices:
        normalized = normalize_answer(answer)
        for i, choice in enumerate(choices):
            if normalize_answer(choice) == normalized:
                return LETTERS[i]
    return None


# --- numbers ----------------------------------------------------------------------------------

# A sign only where it cannot be a minus between two terms ("5-3"); "1,234" only with full
# groups of three; an optional exponent and percent sign.
_NUMBER = (
    r"(?:(?<![\w)])[-+])?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:[eE][-+]?\d+)?%?"
)
_NUMBER_ANYWHERE = re.compile(_NUMBER)
_NUMBER_ONLY = re.compile(rf"\s*\$?{_NUMBER}\s*")


def _to_float(token: str) -> float | None:
    value = float(token.replace(",", "").rstrip("%"))
    return value if math.isfinite(value) else None


def extract_number(text: str) -> float | None:
    """The last number in the answer part of `text` ("1,234.5", "-3", "2.5e3", "45%" -> 45.0),
    or None when there is none (non-finite values such as "1e999" count as none)."""
    tokens = _NUMBER_ANYWHERE.findall(extract_answer(text))
    return _to_float(tokens[-1]) if tokens else None


def parse_number(text: str) -> float | None:
    """`text` as a number when it is one and nothing else (an optional "$" aside), else None."""
    answer = extract_answer(text)
    if not _NUMBER_ONLY.fullmatch(answer):
        return None
    return _to_float(_NUMBER_ANYWHERE.findall(answer)[0])


# --- one record -------------------------------------------------------------------------------


def answer_type_of(record: dict) -> str:
    """The record's `answer_type`, or the one inferred from its reference and choices."""
    declared = record.get("answer_type")
    if declared is not None:
        if declared not in ANSWER_TYPES:
            raise ValueError(
                f"record {record.get('id')!r}: answer_type {declared!r} is not one of "
                f"{ANSWER_TYPES}; fix it or leave it out to infer it from the reference"
            )
        return declared
    reference = _text_field(record, "reference")
    choices = record.get("choices")
    if choices and reference_choice(reference, choices) is not None:
        return MULTIPLE_CHOICE
    if re.fullmatch(r"\(?[A-Z]\)?", extract_answer(reference)):
        return MULTIPLE_CHOICE
    if parse_number(reference) is not None:
        return NUMERIC
    return TEXT


def score_record(record: dict) -> dict:
    """Scores of one record.

    Always: answer_type, exact (answers equal after stripping), normalized (equal after
    normalize_answer), correct (the primary metric: choice_correct, numeric_correct or
    normalized, by answer type). Multiple choice adds predicted_choice, reference_choice,
    choice_correct. Numeric adds predicted_number, reference_number, abs_error, rel_error
    (abs_error / |reference|, or abs_error when the reference is 0) and numeric_correct;
    a prediction without a number has predicted_number and both errors None and is incorrect.
    """
    prediction = _text_field(record, "prediction")
    reference = _text_field(record, "reference")
    answer_type = answer_type_of(record)
    scores = {
        "answer_type": answer_type,
        "exact": extract_answer(prediction) == extract_answer(reference),
        "normalized": normalize_answer(prediction) == normalize_answer(reference),
    }
    if answer_type == MULTIPLE_CHOICE:
        scores |= _choice_scores(record, prediction, reference)
        scores["correct"] = scores["choice_correct"]
    elif answer_type == NUMERIC:
        scores |= _numeric_scores(record, prediction, reference)
        scores["correct"] = scores["numeric_correct"]
    else:
        scores["correct"] = scores["normalized"]
    return scores


def _text_field(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(
            f"record {record.get('id')!r}: {key!r} must be a string, got {type(value).__name__}; "
            "the evaluation command should store the model output as 'prediction' and the "
            "dataset answer as 'reference'"
        )
    return value


def _choice_scores(record: dict, prediction: str, reference: str) -> dict:
    choices = record.get("choices") or None
    expected = reference_choice(reference, choices)
    if expected is None:
        raise ValueError(
            f"record {record.get('id')!r}: multiple-choice reference {reference!r} is neither "
            "an option letter nor the text of one of its choices"
        )
    if choices and expected not in LETTERS[: len(choices)]:
        raise ValueError(
            f"record {record.get('id')!r}: reference {expected!r} names no option; the record "
            f"has {len(choices)} choices (A to {LETTERS[min(len(choices), 26) - 1]})"
        )
    predicted = extract_choice(prediction, choices=choices)
    return {
        "predicted_choice": predicted,
        "reference_choice": expected,
        "choice_correct": predicted == expected,
    }


def _numeric_scores(record: dict, prediction: str, reference: str) -> dict:
    expected = parse_number(reference)
    if expected is None:
        raise ValueError(
            f"record {record.get('id')!r}: numeric reference {reference!r} is not a number"
        )
    predicted = extract_number(prediction)
    if predicted is None:
        abs_error = rel_error = None
        correct = False
    else:
        abs_error = abs(predicted - expected)
        rel_error = abs_error / abs(expected) if expected != 0 else abs_error
        correct = abs_error <= ABS_TOL or rel_error <= REL_TOL
    return {
        "predicted_number": predicted,
        "reference_number": expected,
        "abs_error": abs_error,
        "rel_error": rel_error,
        "numeric_correct": correct,
    }


def scored_records(records: Iterable[dict]) -> list[dict]:
    """Copies of the records, each with its scores under "scores"."""
    return [{**record, "scores": score_record(record)} for record in records]


# --- summary and report -----------------------------------------------------------------------


def category_of(record: dict) -> str:
    return record.get("category") or UNCATEGORIZED


def summarize(records: Iterable[dict]) -> dict:
    """{"overall": metrics, "categories": {name: metrics}} with categories sorted by name.

    Metrics of a group: count, accuracy (mean of the per-record primary metric), exact_match,
    normalized_match, text_count, mc_count, mc_accuracy, numeric_count, numeric_accuracy,
    mean_abs_error, mean_rel_error (over numeric records with a number), missing_number
    (numeric records whose prediction has none). Rates are fractions in [0, 1]; a rate or
    mean over no records is None.
    """
    scored = scored_records(records)
    by_category: dict[str, list[dict]] = {}
    for record in scored:
        by_category.setdefault(category_of(record), []).append(record["scores"])
    return {
        "overall": group_metrics([record["scores"] for record in scored]),
        "categories": {name: group_metrics(by_category[name]) for name in sorted(by_category)},
    }


def group_metrics(scores: Sequence[dict]) -> dict:
    """Aggregate metrics of a group of score_record results (see summarize)."""
    mc = [s for s in scores if s["answer_type"] == MULTIPLE_CHOICE]
    numeric = [s for s in scores if s["answer_type"] == NUMERIC]
    measured = [s for s in numeric if s["abs_error"] is not None]
    return {
        "count": len(scores),
        "accuracy": _mean(s["correct"] for s in scores),
        "exact_match": _mean(s["exact"] for s in scores),
        "normalized_match": _mean(s["normalized"] for s in scores),
        "text_count": sum(s["answer_type"] == TEXT for s in scores),
        "mc_count": len(mc),
        "mc_accuracy": _mean(s["choice_correct"] for s in mc),
        "numeric_count": len(numeric),
        "numeric_accuracy": _mean(s["numeric_correct"] for s in numeric),
        "mean_abs_error": _mean(s["abs_error"] for s in measured),
        "mean_rel_error": _mean(s["rel_error"] for s in measured),
        "missing_number": len(numeric) - len(measured),
    }


def _mean(values: Iterable[float]) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def write_report(records: Iterable[dict], summary: dict, path: str | Path) -> Path:
    """Write {"summary": summary, "records": [record + "scores"]} as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"summary": summary, "records": scored_records(records)})
    return path


TABLE_COLUMNS = (
    "category",
    "n",
    "accuracy",
    "exact",
    "normalized",
    "mc_acc",
    "num_acc",
    "mean_abs_err",
)


def format_table(summary: dict) -> str:
    """An aligned plain-text table: one row per category, sorted, then "overall"; rates as
    percentages with one decimal, "-" where a metric does not apply."""
    rows = [_table_row(name, summary["categories"][name]) for name in sorted(summary["categories"])]
    rows.append(_table_row("overall", summary["overall"]))
    table = [list(TABLE_COLUMNS), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _table_row(name: str, metrics: dict) -> list[str]:
    return [
        name,
        str(metrics["count"]),
        _percent(metrics["accuracy"]),
        _percent(metrics["exact_match"]),
        _percent(metrics["normalized_match"]),
        _percent(metrics["mc_accuracy"]),
        _percent(metrics["numeric_accuracy"]),
        "-" if metrics["mean_abs_error"] is None else f"{metrics['mean_abs_error']:.4g}",
    ]


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}"
