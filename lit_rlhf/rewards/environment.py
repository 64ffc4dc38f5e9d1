"""Multi-turn environments: plain Python that answers each of the model's turns (``model.environment``).

Contract (subclass :class:`Environment`; the PPO rollout calls it, one instance for every episode)::

    reset(row)                  -> the first messages of an episode ([{"role": ..., "content": ...}, ...])
    step(messages, turn, row)   -> messages to append after the model's turn (tool or user turns), or None:
                                   the episode ends
    reward(messages, row)       -> the episode's score (a float), once it ended

``row``: the prompt's source columns by name (one data row). ``messages``: the conversation so far, the model's
turns included as ``assistant`` messages (their text decoded from the model's own tokens); ``turn``: the
model's last turn's text. The rollout renders what ``step`` returns through the tokenizer's chat template and
appends those tokens after the model's own (which are never re-tokenized); they are in the sequence the model
reads but out of the loss and the KL. :class:`ToolEnvironment` is a ready one: the model calls Python
functions as ``<tool>name(args)</tool>``.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from typing import Any

from lit_rlhf.rewards.arithmetic import NUMBER, first_number

Message = dict[str, Any]


class Environment:
    """The base of a multi-turn environment (``model.environment``; see the module docstring for the contract).

    The default ``reset`` asks the row's ``prompt_column`` as one user message (after ``system_prompt``); the
    default ``step`` ends the episode after the model's first turn; ``reward`` has no default."""

    def __init__(self, max_turns: int = 4, prompt_column: str = "question", system_prompt: str | None = None) -> None:
        """
        Args:
            max_turns: The most model turns of one episode; the episode ends after that many (or when the model's
                context is full: then the environment's last messages are not appended), and is scored.
            prompt_column: The data column whose text is the first user message (the default ``reset``). Not
                ``prompt``: the data module replaces a column of that name with its rendered prompt.
            system_prompt: A system message before it (None: none).
        """
        if max_turns < 1:
            raise ValueError(f"model.environment.max_turns must be >= 1, got {max_turns}")
        self.max_turns, self.prompt_column, self.system_prompt = max_turns, prompt_column, system_prompt

    def describe(self) -> str:
        return type(self).__name__

    def required_columns(self) -> list[str]:
        """Data columns ``reward`` reads, checked against the data before the first step (``predict`` on rows
        without them writes the episodes unscored); the base class cannot know: none."""
        return []

    def needs_references(self) -> bool:
        return False

    def reset(self, row: dict[str, Any]) -> list[Message]:
        """The episode's first messages: the system prompt, if any, then the row's prompt as a user message."""
        if self.prompt_column not in row:
            raise ValueError(f"{self.describe()}: the data has no column {self.prompt_column!r} (model.environment."
                             f"prompt_column); its columns: {sorted(row)} (a column named 'prompt' is the data "
                             "module's rendered prompt, not carried: name it otherwise, e.g. question)")
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": str(row[self.prompt_column])}]

    def step(self, messages: list[Message], turn: str, row: dict[str, Any]) -> list[Message] | None:
        """The messages to append after the model's ``turn`` (None or []: the episode ends)."""
        return None

    def reward(self, messages: list[Message], row: dict[str, Any]) -> float:
        """The finished episode's score."""
        raise NotImplementedError(f"{self.describe()} must implement reward(messages, row) -> float")


# ---------------------------------------------------------------------------------------------- tools

TOOL_CALL = re.compile(r"<tool>\s*([A-Za-z_]\w*)\s*\((.*?)\)\s*</tool>", re.DOTALL)
"""A tool call in a model's turn: ``<tool>name(args)</tool>`` (the first one of a turn is run)."""

_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
CALC_LIMIT = 10**12
"""The largest magnitude ``calc`` computes with (operands and results): bigger ones are an error, not a hang."""


def calc(expression: str) -> str:
    """Integer arithmetic with ``+ - * /`` and parentheses, read as a syntax tree (never ``eval``): ``37*41`` ->
    ``1517``; an exact division gives an integer, another a decimal (``7/2`` -> ``3.5``). Anything else (names,
    calls, powers, numbers beyond :data:`CALC_LIMIT`, division by zero) raises a ValueError."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from err
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _bounded(_OPERATORS[type(node.op)](left, right))
    raise ValueError(f"calc takes integers, + - * / and parentheses, not {ast.unparse(node)!r}")


def _bounded(value: int | float) -> int | float:
    if abs(value) > CALC_LIMIT:
        raise ValueError(f"a number beyond {CALC_LIMIT:.0e}")
    return value


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """``(name, argument text)`` of the first ``<tool>name(args)</tool>`` in ``text``; None without one."""
    match = TOOL_CALL.search(text)
    return None if match is None else (match.group(1), match.group(2).strip())


class ToolEnvironment(Environment):
    """The model calls Python functions; each call's result comes back as a ``tool`` message.

    A turn holding ``<tool>name(args)</tool>`` gets the function's result (its ``str``) as the next message,
    role ``tool``, rendered by the chat template; a call that fails (unknown name, bad arguments, the function
    raised) gets ``error: ...`` as its result instead, never a crash. A turn without a call ends the episode,
    whose reward is 1.0 when its last turn, without a tool call, answers the row's ``answer_column`` value: a
    numeric answer must be the turn's first number ("357 or 358" answers 357), another answer a whole word or
    phrase of it; else 0.0. ``tools`` maps names to import paths (``module:function``, as ``FunctionReward``),
    beside ``calc`` (``+ - * /`` on integers, always there unless ``tools`` names its own ``calc``); a function
    takes the argument text (one string) and returns the result."""

    def __init__(
        self, max_turns: int = 4, prompt_column: str = "question", system_prompt: str | None = None,
        answer_column: str = "answer", tools: dict[str, str] | None = None,
    ) -> None:
        """
        Args:
            max_turns: The most model turns of one episode (see ``Environment``).
            prompt_column: The data column whose text is the first user message.
            system_prompt: A system message before it; None: one that documents the tools and the call format.
            answer_column: The data column holding each row's expected answer (the reward).
            tools: Name -> ``module:function`` of each tool the model may call besides ``calc``
                (``lit_rlhf.rewards.environment:calc``; a tool named ``calc`` here replaces it).
        """
        from lit_rlhf.rewards.function import import_function

        self.tool_paths = {"calc": "lit_rlhf.rewards.environment:calc", **(tools or {})}
        self.tools = {name: import_function(path, f"model.environment.tools.{name}")
                      for name, path in self.tool_paths.items()}
        if system_prompt is None:
            system_prompt = ("You can call a tool by writing <tool>name(arguments)</tool>; its result comes back "
                             f"as the next message. Tools: {', '.join(self.tools)}. Give the final answer without a "
                             "tool call.")
        super().__init__(max_turns, prompt_column, system_prompt)
        self.answer_column = answer_column

    def required_columns(self) -> list[str]:
        return [self.answer_column]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "tools"}  # functions travel by their import path

    def __setstate__(self, state: dict[str, Any]) -> None:
        from lit_rlhf.rewards.function import import_function

        self.__dict__.update(state)
        self.tools = {name: import_function(path) for name, path in self.tool_paths.items()}

    def call(self, name: str, arguments: str) -> str:
        """The tool's result, or ``error: ...`` (an unknown tool, or the function raised)."""
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r} (tools: {', '.join(self.tools)})"
        try:
            return str(tool(arguments))
        except Exception as err:  # any failure of the call is the model's to read, not the run's to crash on
            return f"error: {type(err).__name__}: {err}"

    def step(self, messages: list[Message], turn: str, row: dict[str, Any]) -> list[Message] | None:
        call = parse_tool_call(turn)
        if call is None:
            return None
        return [{"role": "tool", "content": self.call(*call)}]

    def reward(self, messages: list[Message], row: dict[str, Any]) -> float:
        if self.answer_column not in row:
            raise ValueError(f"{self.describe()}: the data has no column {self.answer_column!r} (model.environment."
                             f"answer_column); its columns: {sorted(row)}")
        last = str(next((m["content"] for m in reversed(messages) if m.get("role") == "assistant"), ""))
        answer = str(row[self.answer_column]).strip()
        if parse_tool_call(last) is not None:  # an episode cut at max_turns mid-call gave no answer
            return 0.0
        if NUMBER.fullmatch(answer):  # the turn's first number is its answer
            return 1.0 if first_number(last) == float(answer) else 0.0
        return 1.0 if re.search(rf"(?<![\w.-]){re.escape(answer)}(?![\w]|\.\d)", last) else 0.0
