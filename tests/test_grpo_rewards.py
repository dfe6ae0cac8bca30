"""Reward extraction and matching on hand-written cases (llava.train.rewards), incl. non-matches."""

import pytest

from llava.train.rewards import (
    REWARDS,
    answers_match,
    box_iou,
    combined_rewards,
    exact_match,
    extract_answer,
    format_reward,
    iou_reward,
    named_answer,
)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Red.", "Red."),
        ("It is round. So the answer is circle.", "circle"),
        ("<think>\nthree squares\n</think>\nThe answer is 3.", "3"),
        ("We get \\boxed{12} in the end", "12"),
        ("the answer is 2. Wait, the answer is 4.", "4"),
        ("Answer: \\boxed{B} because the answer is C", "B"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("predicted", "truth", "fmt", "match"),
    [
        ("12", "2", "number", False),
        ("2", "12", "number", False),
        ("3.0", "3", "number", True),
        ("1,000", "1000", "number", True),
        ("three", "3", "number", False),
        ("(A)", "A", "multiple_choice", True),
        ("A.", "a", "multiple_choice", True),
        ("A cat", "A", "multiple_choice", False),
        ("(A)", "A cat", "short", False),
        ("B", "A", "multiple_choice", False),
        ("Red.", "red", "short", True),
        ("a red", "red", "short", True),
        ("dark red", "red", "short", False),
        ("", "", "short", False),
    ],
)
def test_answers_match(predicted, truth, fmt, match):
    assert answers_match(predicted, truth, fmt) is match


def test_unknown_format_fails():
    with pytest.raises(ValueError, match="answer_format"):
        answers_match("1", "1", "essay")


def test_exact_match_and_format_on_records():
    records = [{"answer": "3", "answer_format": "number"}, {"answer": "red", "answer_format": "short"}]
    assert exact_match(["So the answer is 3.", "Blue."], records) == [1.0, 0.0]
    assert exact_match(["the answer is 13", "Red."], records) == [0.0, 1.0]
    assert format_reward(["So the answer is 3.", "I think maybe it is\nblue or green or red"], records) == [
        1.0,
        0.0,
    ]


def test_iou():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    records = [{"box": [0, 0, 2, 2]}, {"box": [0, 0, 2, 2]}]
    assert iou_reward(["It is at [0, 0, 2, 2].", "no box"], records) == [1.0, 0.0]


def test_combined_weights_and_errors():
    records = [{"answer": "3", "answer_format": "number"}]
    total, parts = combined_rewards(["exact_match", "format"], [1.0, 0.5], ["The answer is 3."], records)
    assert total == [1.5] and parts == {"exact_match": [1.0], "format": [1.0]}
    with pytest.raises(ValueError, match="unknown reward"):
        combined_rewards(["nope"], None, ["x"], records)
    with pytest.raises(ValueError, match="weights"):
        combined_rewards(["format"], [1.0, 2.0], ["x"], records)
    assert set(REWARDS) >= {"exact_match", "format", "iou"}


def test_named_answer_reads_the_answer_as_the_world_benchmark_does():
    colour = {"id": "c", "answer": "red", "answer_values": ["red", "blue", "green"]}
    count = {"id": "n", "answer": 2, "answer_format": "number", "answer_values": ["1", "2", "3", "12"]}
    cases = [
        (
            "The square is red.",
            colour,
            1.0,
        ),  # Stage 1b's sentence answer; exact_match reads the whole sentence
        ("The square is blue.", colour, 0.0),
        ("Red blue green.", colour, 1.0),  # only the first value named counts ...
        ("Blue, red, green.", colour, 0.0),  # ... so naming them all is not rewarded
        ("The red one? No: the answer is green.", colour, 0.0),  # "answer is" wins
        ("reddish", colour, 0.0),  # whole words only
        ("There are 12 stars.", count, 0.0),  # "12" is not "2"
        ("There are 2 stars.", count, 1.0),
    ]
    completions, records, expected = zip(*cases)
    assert named_answer(list(completions), list(records)) == list(expected)
    assert exact_match(["The square is red."], [colour]) == [0.0]
    with pytest.raises(ValueError, match="record 'x'.*answer_values"):
        named_answer(["red"], [{"id": "x", "answer": "red"}])
    assert "named_answer" in REWARDS
