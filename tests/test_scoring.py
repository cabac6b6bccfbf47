"""Scoring of evaluation records: answer extraction, per-record scores, the summary (checked
against values computed by hand), the JSON report and the text table."""

from __future__ import annotations

import json

import pytest

from gantry.data.scoring import (
    MULTIPLE_CHOICE,
    NUMERIC,
    TEXT,
    answer_type_of,
    extract_answer,
    extract_choice,
    extract_number,
    format_table,
    normalize_answer,
    parse_number,
    score_record,
    summarize,
    write_report,
)

# Twelve records in three categories. Expected scores, by hand, after each record:
# (exact, normalized, correct) and the numeric errors where they apply.
RECORDS = [
    # counting: numeric x3, multiple choice x1
    {
        "id": "c1",
        "category": "counting",
        "prediction": "<think>I count 2 cars, then 3 more</think>\n<answer>5</answer>",
        "reference": "5",
    },  # T T T, abs 0, rel 0
    {
        "id": "c2",
        "category": "counting",
        "prediction": "There are about 1,005 people.",
        "reference": "1000",
    },  # F F T, abs 5, rel 0.005
    {
        "id": "c3",
        "category": "counting",
        "prediction": "I cannot tell.",
        "reference": "7",
    },  # F F F, missing number
    {
        "id": "c4",
        "category": "counting",
        "prediction": "<think>hmm</think><answer>(B)</answer>",
        "reference": "B",
        "choices": ["three", "four", "five"],
    },  # F T T
    # science: multiple choice x3, numeric x1 (declared)
    {
        "id": "s1",
        "category": "science",
        "prediction": "The answer is (c)",
        "reference": "C",
        "choices": ["solid", "liquid", "gas"],
    },  # F T T
    {
        "id": "s2",
        "category": "science",
        "prediction": "Answer: A",
        "reference": "B",
        "choices": ["gravity", "magnetism"],
    },  # F F F
    {
        "id": "s3",
        "category": "science",
        "prediction": "It is magnetism.",
        "reference": "B",
        "choices": ["gravity", "magnetism"],
    },  # F F T (picked by option text)
    {
        "id": "s4",
        "category": "science",
        "prediction": "-2.5e3 joules",
        "reference": "-2500",
        "answer_type": "numeric",
    },  # F F T, abs 0, rel 0
    # trivia: text x3, numeric x1 with a reference of 0
    {
        "id": "t1",
        "category": "trivia",
        "prediction": "The Eiffel Tower!",
        "reference": "Eiffel Tower",
    },  # F T T
    {
        "id": "t2",
        "category": "trivia",
        "prediction": "<think>The capital of France...</think>\n<answer>Paris</answer>",
        "reference": "Paris",
    },  # T T T
    {
        "id": "t3",
        "category": "trivia",
        "prediction": "London",
        "reference": "Paris",
    },  # F F F
    {
        "id": "t4",
        "category": "trivia",
        "prediction": "<answer>0.5</answer>",
        "reference": "0",
    },  # F F F, abs 0.5, rel 0.5 (reference 0: rel = abs)
]


# --- extraction helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>let me see</think>\n<answer>B</answer>", "B"),
        ("<think>a\nb</think>  Paris  ", "Paris"),
        ("reasoning whose opening tag was in the prompt</think>\n42", "42"),
        ("<answer>first</answer> then <answer> second </answer>", "second"),
        ("<think>cut off while reasoning", ""),
        ("<think>x</think><answer>cut off", "cut off"),
        ("<think>maybe <answer>A</answer></think><answer>C</answer>", "C"),
        ("  plain text  ", "plain text"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An   apple,  please ", "apple please"),
        ("The answer is: Paris.", "paris"),
        ("Answer: Paris", "paris"),
        ("Final answer: 42", "42"),
        ("<think>the answer is London</think>\n<answer>The Paris</answer>", "paris"),
        ("Theatre", "theatre"),
        ("the answer", "answer"),
        ("A", "a"),
        ("(a).", "a"),
        ("The", "the"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "n_choices", "expected"),
    [
        ("B", 4, "B"),
        ("(B)", 4, "B"),
        ("B.", 4, "B"),
        ("b", 4, "B"),
        ("**A**", 4, "A"),
        ("Answer: B", 4, "B"),
        ("The answer is (c)", 4, "C"),
        ("the answer is d.", 4, "D"),
        ("The answer is option D", 4, "D"),
        ("B. Paris", 4, "B"),
        ("(C) gas", 4, "C"),
        ("I think the answer is (B) but wait, the answer is C", 4, "C"),
        ("<think>It could be A</think>\n<answer>C</answer>", 4, "C"),
        ("Looking at the image, (D) fits best", 4, "D"),
        ("E", 4, None),
        ("The answer is E", 4, None),
        ("the answer is a dog", 4, None),
        ("nothing to pick here", 4, None),
        ("<think>It is B</think>", 4, None),
    ],
)
def test_extract_choice_letters(prediction, n_choices, expected):
    assert extract_choice(prediction, n_choices) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Paris", "B"),
        ("the city of paris", "B"),
        ("It is Paris, I think.", "B"),
        ("Paris or London", None),
        ("Rome", None),
        ("C", None),  # two choices: C is out of range
    ],
)
def test_extract_choice_by_option_text(prediction, expected):
    assert extract_choice(prediction, choices=["London", "Paris"]) == expected


def test_extract_choice_rejects_bad_option_count():
    with pytest.raises(ValueError, match="between 1 and 26"):
        extract_choice("A", 27)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("1,234.5", 1234.5),
        ("-3", -3.0),
        ("x = -3", -3.0),
        ("5-3", 3.0),
        ("2.5e3", 2500.0),
        ("45%", 45.0),
        ("from 3 to 7 apples", 7.0),
        ("It is 42.", 42.0),
        ("$1,000,000 in total", 1_000_000.0),
        (".5", 0.5),
        ("1,2345", 2345.0),
        ("<think>maybe 12</think>\n<answer>13</answer>", 13.0),
        ("no numbers here", None),
        ("<think>it is 12</think>", None),
        ("1e999", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,234", 1234.0), (" $5 ", 5.0), ("45%", 45.0), ("-0.25", -0.25), ("5 apples", None)],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"reference": "B"}, MULTIPLE_CHOICE),
        ({"reference": "(C)"}, MULTIPLE_CHOICE),
        ({"reference": "b"}, TEXT),
        ({"reference": "b", "choices": ["x", "y"]}, MULTIPLE_CHOICE),
        ({"reference": "magnetism", "choices": ["gravity", "magnetism"]}, MULTIPLE_CHOICE),
        ({"reference": "Pluto", "choices": ["gravity", "magnetism"]}, TEXT),
        ({"reference": "1,000"}, NUMERIC),
        ({"reference": "Paris"}, TEXT),
        ({"reference": "42", "answer_type": "text"}, TEXT),
    ],
)
def test_answer_type_inference(record, expected):
    assert answer_type_of(record) == expected


# --- one record -------------------------------------------------------------------------------


def test_score_record_multiple_choice_with_answer_tag():
    scores = score_record(RECORDS[3])
    assert scores == {
        "answer_type": MULTIPLE_CHOICE,
        "exact": False,
        "normalized": True,
        "predicted_choice": "B",
        "reference_choice": "B",
        "choice_correct": True,
        "correct": True,
    }


def test_score_record_numeric_within_tolerance():
    scores = score_record(RECORDS[1])
    assert scores["answer_type"] == NUMERIC
    assert scores["predicted_number"] == 1005.0
    assert scores["reference_number"] == 1000.0
    assert scores["abs_error"] == 5.0
    assert scores["rel_error"] == pytest.approx(0.005)
    assert scores["numeric_correct"] is True
    assert scores["correct"] is True


def test_score_record_numeric_outside_tolerance():
    scores = score_record({"id": "n", "prediction": "The total is 1,020.", "reference": "1000"})
    assert scores["abs_error"] == 20.0
    assert scores["rel_error"] == pytest.approx(0.02)
    assert scores["numeric_correct"] is False


def test_score_record_missing_number():
    scores = score_record(RECORDS[2])
    assert scores["predicted_number"] is None
    assert scores["abs_error"] is None
    assert scores["rel_error"] is None
    assert scores["numeric_correct"] is False
    assert scores["correct"] is False


def test_score_record_zero_reference_uses_absolute_error():
    scores = score_record(RECORDS[11])
    assert scores["abs_error"] == 0.5
    assert scores["rel_error"] == 0.5
    assert scores["numeric_correct"] is False
    assert score_record({"prediction": "0.0000001", "reference": "0"})["numeric_correct"] is True


def test_score_record_text_exact_after_answer_tag():
    scores = score_record(RECORDS[9])
    assert scores == {"answer_type": TEXT, "exact": True, "normalized": True, "correct": True}


def test_score_record_letter_a_is_not_an_article():
    assert score_record({"prediction": "", "reference": "A"})["normalized"] is False
    assert score_record({"prediction": "Answer: a", "reference": "A"})["normalized"] is True


def test_score_record_reference_as_option_text():
    record = {"prediction": "B", "reference": "magnetism", "choices": ["gravity", "magnetism"]}
    scores = score_record(record)
    assert scores["reference_choice"] == "B"
    assert scores["choice_correct"] is True


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "x", "prediction": "A", "reference": "A", "answer_type": "mcq"}, "not one of"),
        (
            {"id": "x", "prediction": "A", "reference": "Pluto", "answer_type": "multiple_choice"},
            "neither an option letter",
        ),
        (
            {"id": "x", "prediction": "A", "reference": "D", "choices": ["p", "q"]},
            "names no option",
        ),
        (
            {"id": "x", "prediction": "1", "reference": "many", "answer_type": "numeric"},
            "not a number",
        ),
        ({"id": "x", "prediction": None, "reference": "A"}, "'prediction' must be a string"),
        ({"id": "x", "prediction": "A"}, "'reference' must be a string"),
    ],
)
def test_score_record_rejects_malformed_records(record, message):
    with pytest.raises(ValueError, match=message):
        score_record(record)


# --- summary, report, table -------------------------------------------------------------------


def test_summary_per_category_matches_hand_computed_values():
    categories = summarize(RECORDS)["categories"]
    assert list(categories) == ["counting", "science", "trivia"]
    assert categories["counting"] == pytest.approx(
        {
            "count": 4,
            "accuracy": 0.75,
            "exact_match": 0.25,
            "normalized_match": 0.5,
            "text_count": 0,
            "mc_count": 1,
            "mc_accuracy": 1.0,
            "numeric_count": 3,
            "numeric_accuracy": 2 / 3,
            "mean_abs_error": 2.5,
            "mean_rel_error": 0.0025,
            "missing_number": 1,
        }
    )
    assert categories["science"] == pytest.approx(
        {
            "count": 4,
            "accuracy": 0.75,
            "exact_match": 0.0,
            "normalized_match": 0.25,
            "text_count": 0,
            "mc_count": 3,
            "mc_accuracy": 2 / 3,
            "numeric_count": 1,
            "numeric_accuracy": 1.0,
            "mean_abs_error": 0.0,
            "mean_rel_error": 0.0,
            "missing_number": 0,
        }
    )
    trivia = categories["trivia"]
    assert trivia["mc_count"] == 0
    assert trivia["mc_accuracy"] is None
    assert {k: v for k, v in trivia.items() if k != "mc_accuracy"} == pytest.approx(
        {
            "count": 4,
            "accuracy": 0.5,
            "exact_match": 0.25,
            "normalized_match": 0.5,
            "text_count": 3,
            "mc_count": 0,
            "numeric_count": 1,
            "numeric_accuracy": 0.0,
            "mean_abs_error": 0.5,
            "mean_rel_error": 0.5,
            "missing_number": 0,
        }
    )


def test_summary_overall_matches_hand_computed_values():
    overall = summarize(RECORDS)["overall"]
    assert overall == pytest.approx(
        {
            "count": 12,
            "accuracy": 8 / 12,
            "exact_match": 2 / 12,
            "normalized_match": 5 / 12,
            "text_count": 3,
            "mc_count": 4,
            "mc_accuracy": 0.75,
            "numeric_count": 5,
            "numeric_accuracy": 0.6,
            "mean_abs_error": (0 + 5 + 0 + 0.5) / 4,
            "mean_rel_error": (0 + 0.005 + 0 + 0.5) / 4,
            "missing_number": 1,
        }
    )


def test_summary_missing_category_and_empty_input():
    summary = summarize([{"prediction": "x", "reference": "x"}, {**RECORDS[0], "category": None}])
    assert list(summary["categories"]) == ["uncategorized"]
    assert summary["categories"]["uncategorized"]["count"] == 2
    empty = summarize([])
    assert empty["categories"] == {}
    assert empty["overall"]["count"] == 0
    assert empty["overall"]["accuracy"] is None
    assert empty["overall"]["mean_abs_error"] is None


def test_summarize_does_not_modify_records():
    records = [dict(record) for record in RECORDS]
    summarize(records)
    assert records == RECORDS


def test_write_report_round_trip(tmp_path):
    summary = summarize(RECORDS)
    path = write_report(RECORDS, summary, tmp_path / "eval" / "report.json")
    assert path == tmp_path / "eval" / "report.json"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary left
    report = json.loads(path.read_text())
    assert report["summary"] == summary
    assert [r["id"] for r in report["records"]] == [r["id"] for r in RECORDS]
    c3 = report["records"][2]
    assert c3["prediction"] == "I cannot tell."
    assert c3["scores"]["numeric_correct"] is False
    assert c3["scores"]["abs_error"] is None
    assert report["records"][6]["scores"]["predicted_choice"] == "B"


def test_format_table_rows_and_values():
    table = format_table(summarize(RECORDS))
    lines = table.splitlines()
    assert lines[0].split() == [
        "category",
        "n",
        "accuracy",
        "exact",
        "normalized",
        "mc_acc",
        "num_acc",
        "mean_abs_err",
    ]
    assert set(lines[1]) == {"-", " "}
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["counting", "science", "trivia", "overall"]
    assert rows[0] == ["counting", "4", "75.0", "25.0", "50.0", "100.0", "66.7", "2.5"]
    assert rows[2] == ["trivia", "4", "50.0", "25.0", "50.0", "-", "0.0", "0.5"]
    assert rows[3] == ["overall", "12", "66.7", "16.7", "41.7", "75.0", "60.0", "1.375"]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_format_table_shows_dash_without_numeric_records():
    table = format_table(
        summarize([{"category": "qa", "prediction": "Paris", "reference": "paris"}])
    )
    qa = table.splitlines()[2].split()
    assert qa == ["qa", "1", "100.0", "0.0", "100.0", "-", "-", "-"]
