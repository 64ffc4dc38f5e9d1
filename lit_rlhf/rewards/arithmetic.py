"""Verifiable rewards for problems with an integer answer (``bundled:arithmetic``), as plain functions for
:class:`lit_rlhf.rewards.FunctionReward`::

    reward:
      class_path: lit_rlhf.rewards.FunctionReward
      init_args: {function: lit_rlhf.rewards.arithmetic:exact_answer}

    first_integer   the first integer written in a text (an optional minus sign, then digits), or None
    first_number    the same for a number with decimals ("3.5"), as a float
    exact_answer    1.0 where a response's first integer equals the row's ``answer``, else 0.0
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_INTEGER = re.compile(r"-?\d+")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
"""A number written in a text: an optional minus sign, digits, optional decimals."""


def first_integer(text: str) -> int | None:
    """The first integer in ``text`` ("357", " -12 apples" -> -12), or None when it has none."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def first_number(text: str) -> float | None:
    """The first number in ``text``, an integer or a decimal ("It is 3.5." -> 3.5; "1,358" reads 1), or None."""
    match = NUMBER.search(text)
    return float(match.group()) if match else None


def exact_answer(prompts: Sequence[str], responses: Sequence[str], answer: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 for each response whose first integer equals its row's ``answer`` (an int or its decimal text), 0.0
    otherwise (a wrong number, or none). A 0/1 reward: its mean over held-out prompts is the exact-match accuracy."""
    return [float(first_integer(str(r)) == int(str(a).strip())) for r, a in zip(responses, answer)]
