"""The exact-answer reward of the arithmetic recipe, against hand-written cases, alone and as a FunctionReward."""

import pytest
import torch

from lit_rlhf.rewards import FunctionReward
from lit_rlhf.rewards.arithmetic import exact_answer, first_integer


@pytest.mark.parametrize("text, value", [
    ("357", 357), ("357<|endoftext|>", 357), (" 42 apples, 7 pears", 42), ("-12", -12), ("x-3=", -3),
    ("0012", 12), ("", None), ("no number", None), ("1 2", 1),
])
def test_first_integer(text, value):
    assert first_integer(text) == value


def test_exact_answer_cases():
    responses = ["357", "3570", "35", " 357 and more", "", "357", "-5", "5"]
    answers = ["357", "357", "357", "357", "357", 357, "-5", "-5"]
    assert exact_answer(["p"] * 8, responses, answers) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_as_function_reward_it_reads_the_answer_column():
    reward = FunctionReward("lit_rlhf.rewards.arithmetic:exact_answer")
    assert reward.required_columns() == ["answer"] and reward.name == "exact_answer"
    scores = reward.compute(["1+2=", "9-4="], ["3", "4"], None, {"answer": ["3", "5"], "id": ["a", "b"]})
    assert torch.equal(scores, torch.tensor([1.0, 0.0], dtype=torch.float64))
