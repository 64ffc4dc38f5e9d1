"""The arithmetic problems behind ``bundled:arithmetic``: deterministic, correct answers, disjoint splits."""

from collections import Counter

import pytest

from lit_rlhf.data.arithmetic import TEST_SIZE, TRAIN_SIZE, arithmetic_problem, arithmetic_splits, generate_problems
from lit_rlhf.data.sources import load_source

pytestmark = pytest.mark.usefixtures("datasets_cache")


def evaluate(prompt: str) -> int:
    """The problem's value by hand: "a+b=" or "a-b=" (operands are non-negative)."""
    body = prompt.removesuffix("=")
    op = "+" if "+" in body else "-"
    a, b = body.split(op)
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_problem_rows():
    assert arithmetic_problem(12, "+", 345) == {"prompt": "12+345=", "answer": "357"}
    assert arithmetic_problem(345, "-", 12) == {"prompt": "345-12=", "answer": "333"}
    with pytest.raises(ValueError, match="op must be"):
        arithmetic_problem(1, "*", 2)


def test_generation_is_deterministic_distinct_and_correct():
    rows = generate_problems(300, seed=3)
    assert rows == generate_problems(300, seed=3) and rows != generate_problems(300, seed=4)
    assert len({r["prompt"] for r in rows}) == 300
    for r in rows:
        assert int(r["answer"]) == evaluate(r["prompt"]) >= 0
        assert all(len(x) <= 3 for x in r["prompt"][:-1].replace("-", "+").split("+"))
    excluded = {r["prompt"] for r in rows[:100]}
    assert not excluded & {r["prompt"] for r in generate_problems(300, seed=3, exclude=excluded)}
    with pytest.raises(ValueError, match="too many"):
        generate_problems(100, seed=0, max_digits=1)


def test_bundled_splits_are_disjoint_and_load():
    splits = arithmetic_splits()
    assert [len(splits["train"]), len(splits["test"])] == [TRAIN_SIZE, TEST_SIZE]
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["test"]}
    assert splits["test"][:2] == [{"id": "test_0", "prompt": "989-39=", "answer": "950"},
                                  {"id": "test_1", "prompt": "172+340=", "answer": "512"}]  # fixed from now on
    loaded = load_source("bundled:arithmetic")
    assert {name: len(rows) for name, rows in loaded.items()} == {"train": TRAIN_SIZE, "test": TEST_SIZE}
    assert loaded["test"][1] == splits["test"][1]


def test_the_test_split_is_drawn_from_the_train_splits_distribution():
    # each kind of problem (operation, digits of each operand) is about as common in both splits: a test split
    # drawn apart from the train split had 5.6% one-digit additions against 0.4% in train
    splits = arithmetic_splits()

    def shares(rows):
        kinds = Counter()
        for row in rows:
            body = row["prompt"].removesuffix("=")
            op = "+" if "+" in body else "-"
            kinds[(op, *map(len, body.split(op)))] += 1
        return {kind: n / len(rows) for kind, n in kinds.items()}

    train, test = shares(splits["train"]), shares(splits["test"])
    assert len(train) == 15  # 1-3 digits each, + and - (a subtraction's first operand is the longer or equal)
    assert max(abs(test.get(kind, 0.0) - share) for kind, share in train.items()) < 0.025


def test_bundled_tool_conversations_and_questions(monkeypatch):
    import lit_rlhf.data.arithmetic as arithmetic

    monkeypatch.setattr(arithmetic, "TRAIN_SIZE", 50)
    monkeypatch.setattr(arithmetic, "TEST_SIZE", 20)
    questions = load_source("bundled:arithmetic-questions")
    assert questions["test"][0] == {"id": "test_0", "question": "112-8=", "answer": "104"}
    assert (len(questions["train"]), questions.column_names["train"]) == (50, ["id", "question", "answer"])
    tools = load_source("bundled:arithmetic-tools")
    assert tools["train"].column_names == ["id", "messages", "answer"] and len(tools["train"]) > 50
    first = tools["test"][0]  # the held-out problem 112-8=, its first assistant turn
    assert first["id"] == "test_0_0" and first["messages"][0] == {"role": "user", "content": "112-8="}
