"""Arithmetic problems with a verifiable answer: ``bundled:arithmetic``, generated at load time.

    arithmetic_problem      (a, op, b) -> {"prompt": "12+345=", "answer": "357"}
    generate_problems       n distinct problems drawn from a seeded generator, none of a given set of prompts
    arithmetic_splits       the bundled train and test problems: one pool of distinct problems, shuffled and cut
                            in two (disjoint, the same distribution), as lists of rows
    load_bundled_arithmetic the same as a ``datasets.DatasetDict`` (``data.dataset: bundled:arithmetic``)
    tool_sft_rows           supervised turns of conversations with a calculator tool (the tool model's data)
    load_bundled_arithmetic_tools      those of the bundled splits (``bundled:arithmetic-tools``)
    load_bundled_arithmetic_questions  the bundled problems as ``question``s (``bundled:arithmetic-questions``)

A problem is an addition or a subtraction of two integers of 1 to ``max_digits`` digits (the digit count of each
operand drawn uniformly, then its value), written without spaces and ending with ``=``; a subtraction's first
operand is the larger one, so every answer is a non-negative integer. The answer is its decimal text. Nothing is
random beyond ``random.Random(seed)``: the same arguments give the same rows on every machine and Python version.
"""

from __future__ import annotations

import random

# `datasets` is imported where it is used (it takes ~1.5 s to import).

TRAIN_SIZE = 20000
"""Problems in the bundled train split."""
TEST_SIZE = 500
"""Problems in the bundled test split (none of them is a train problem)."""
MAX_DIGITS = 3
"""Longest operand, in digits."""
SEED = 0
"""Seed of the bundled splits."""


def arithmetic_problem(a: int, op: str, b: int) -> dict[str, str]:
    """The row of ``a op b``: ``prompt`` ("12+345=") and ``answer`` (its value as decimal text)."""
    if op not in ("+", "-"):
        raise ValueError(f"op must be '+' or '-', got {op!r}")
    value = a + b if op == "+" else a - b
    return {"prompt": f"{a}{op}{b}=", "answer": str(value)}


def _operand(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def generate_problems(
    n: int, seed: int, max_digits: int = MAX_DIGITS, exclude: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """``n`` distinct problems (by prompt), none of whose prompts is in ``exclude``, in the order drawn."""
    if max_digits < 1:
        raise ValueError(f"max_digits must be at least 1, got {max_digits}")
    space = 2 * (10**max_digits) ** 2  # an upper bound of the distinct problems
    if n > space // 4:
        raise ValueError(f"{n} problems of at most {max_digits} digits: too many to draw distinct ones; raise max_digits")
    rng = random.Random(seed)
    seen, rows = set(exclude), []
    while len(rows) < n:
        a, b, op = _operand(rng, max_digits), _operand(rng, max_digits), rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        row = arithmetic_problem(a, op, b)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def arithmetic_splits(
    train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE, seed: int = SEED, max_digits: int = MAX_DIGITS
) -> dict[str, list[dict[str, str]]]:
    """``train`` and ``test`` rows (``id``, ``prompt``, ``answer``), disjoint by prompt and of one distribution:
    ``train_size + test_size`` distinct problems, shuffled (``random.Random(seed + 1)``), the first ``test_size``
    the test split. (Drawn apart, the two would differ: the few distinct problems of small operands, e.g. the
    100 one-digit additions, fill a short test draw at their drawing rate but run out in a long train draw.)"""
    pool = generate_problems(train_size + test_size, seed, max_digits)
    random.Random(seed + 1).shuffle(pool)
    test, train = pool[:test_size], pool[test_size:]
    return {split: [{"id": f"{split}_{i}", **row} for i, row in enumerate(rows)]
            for split, rows in (("train", train), ("test", test))}


def load_bundled_arithmetic() -> datasets.DatasetDict:
    """``bundled:arithmetic``: :func:`arithmetic_splits` of this module's ``TRAIN_SIZE``, ``TEST_SIZE``, ``SEED`` and
    ``MAX_DIGITS`` (20,000 train and 500 test problems of up to 3-digit operands), columns ``id``, ``prompt``,
    ``answer`` (all text)."""
    import datasets

    splits = arithmetic_splits(TRAIN_SIZE, TEST_SIZE, SEED, MAX_DIGITS)  # read now: a test may make them smaller
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})


# ---------------------------------------------------------------------------------------------- with a tool

TOOL_FRACTION = 0.3
"""The share of ``bundled:arithmetic-tools``'s problems answered with the calculator (the others directly)."""


def tool_conversation(row: dict[str, str], tool: bool) -> list[dict[str, str]]:
    """A problem's conversation: the question, then (``tool``) a call of ``calc`` on it and the call's result,
    then the answer. ``{"prompt": "12+345=", "answer": "357"}`` -> user ``12+345=``, assistant
    ``<tool>calc(12+345)</tool>``, tool ``357``, assistant ``357`` (without ``tool``: user, assistant ``357``)."""
    conversation = [{"role": "user", "content": row["prompt"]}]
    if tool:
        call = f"<tool>calc({row['prompt'].removesuffix('=')})</tool>"
        conversation += [{"role": "assistant", "content": call}, {"role": "tool", "content": row["answer"]}]
    return conversation + [{"role": "assistant", "content": row["answer"]}]


def tool_sft_rows(rows: list[dict[str, str]], tool_fraction: float = TOOL_FRACTION, seed: int = SEED) -> list[dict]:
    """Supervised rows of ``rows``' conversations (:func:`tool_conversation`), a problem with the tool with
    probability ``tool_fraction`` (``random.Random(seed)``, one draw per problem in order): one row per assistant
    turn, ``messages`` the conversation up to and including it (the turn to learn is the last), with the
    problem's ``id`` (``<id>_<turn>``) and ``answer``."""
    rng, out = random.Random(seed), []
    for row in rows:
        conversation = tool_conversation(row, rng.random() < tool_fraction)
        turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        out += [{"id": f"{row.get('id', len(out))}_{j}", "messages": conversation[: i + 1], "answer": row["answer"]}
                for j, i in enumerate(turns)]
    return out


def load_bundled_arithmetic_tools() -> datasets.DatasetDict:
    """``bundled:arithmetic-tools``: :func:`tool_sft_rows` of the bundled train and test problems (each split its
    own draws, seed :data:`SEED`), columns ``id``, ``messages`` (a list of ``{role, content}``), ``answer``."""
    import datasets

    splits = arithmetic_splits(TRAIN_SIZE, TEST_SIZE, SEED, MAX_DIGITS)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(tool_sft_rows(rows, TOOL_FRACTION, SEED))
                                 for split, rows in splits.items()})


def load_bundled_arithmetic_questions() -> datasets.DatasetDict:
    """``bundled:arithmetic-questions``: the bundled problems with their ``prompt`` named ``question`` (columns
    ``id``, ``question``, ``answer``): the first user message of a ``model.environment`` (whose data module
    replaces a column named ``prompt`` with its rendered prompt)."""
    import datasets

    splits = arithmetic_splits(TRAIN_SIZE, TEST_SIZE, SEED, MAX_DIGITS)
    questions = {split: [{"id": r["id"], "question": r["prompt"], "answer": r["answer"]} for r in rows]
                 for split, rows in splits.items()}
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in questions.items()})
