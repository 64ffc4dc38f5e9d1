"""A scripted environment for the multi-turn PPO tests: a fixed tool reply after each of the model's turns, a
reward that prefers short last turns (a signal a tiny random model can follow)."""

from lit_rlhf.rewards import Environment


class ScriptedEnvironment(Environment):
    """After the model's n-th turn: ``result <n>`` (a ``tool`` message); the reward: minus the last turn's length
    in characters / 10."""

    def __init__(self, max_turns: int = 3, prompt_column: str = "question") -> None:
        super().__init__(max_turns, prompt_column)

    def step(self, messages, turn, row):
        n = sum(m["role"] == "assistant" for m in messages)
        return [{"role": "tool", "content": f"result {n}"}]

    def reward(self, messages, row):
        return -len(messages[-1]["content"]) / 10.0


def questions(n: int) -> list[dict]:
    return [{"question": f"What is {i}*{i + 3}?", "answer": str(i * (i + 3))} for i in range(n)]
