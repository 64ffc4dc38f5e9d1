"""Environment and ToolEnvironment: the contract's defaults, the tool-call format, ``calc`` (no eval: only integer
arithmetic) and failed calls that become the tool's message instead of a crash."""

import pickle

import pytest

from lit_rlhf.rewards import Environment, ToolEnvironment, calc, parse_tool_call


def test_calc_computes_integer_arithmetic_and_refuses_everything_else():
    assert calc("37*41") == "1517"
    assert calc(" (2 + 3) * -4 ") == "-20"
    assert calc("12/4") == "3" and calc("7/2") == "3.5" and calc("10-3-2") == "5"
    for bad, why in [("__import__('os')", "not"), ("2**10", "not"), ("1.5+1", "not"), ("1/0", "division by zero"),
                     ("x+1", "not"), ("10000000*10000000", "beyond"), ("1+", "not an arithmetic")]:
        with pytest.raises(ValueError, match=why):
            calc(bad)


def test_parse_tool_call_reads_the_first_call():
    assert parse_tool_call("Let me see. <tool>calc(37*41)</tool> then") == ("calc", "37*41")
    assert parse_tool_call("<tool> calc ( (1+2)*3 ) </tool><tool>calc(5)</tool>") == ("calc", "(1+2)*3")
    assert parse_tool_call("The answer is 1517.") is None
    assert parse_tool_call("<tool>calc(1+2)") is None  # unclosed


def test_tool_environment_answers_calls_and_errors_and_scores_the_last_turn():
    env = ToolEnvironment(max_turns=3, prompt_column="question")
    row = {"question": "What is 37*41?", "answer": "1517"}
    first = env.reset(row)
    assert [m["role"] for m in first] == ["system", "user"] and first[1]["content"] == "What is 37*41?"
    assert "<tool>name(arguments)</tool>" in first[0]["content"] and "calc" in first[0]["content"]
    assert env.step(first, "<tool>calc(37*41)</tool>", row) == [{"role": "tool", "content": "1517"}]
    assert env.step(first, "<tool>calc(1/0)</tool>", row)[0]["content"] == "error: ValueError: division by zero"
    assert env.step(first, "<tool>calc(open('x'))</tool>", row)[0]["content"].startswith("error: ValueError")
    assert env.step(first, "<tool>search(cats)</tool>", row)[0]["content"].startswith("error: unknown tool 'search'")
    assert env.step(first, "It is 1517.", row) is None  # no call: the episode ends
    said = lambda text: first + [{"role": "assistant", "content": text}]  # noqa: E731
    assert env.reward(said("It is 1517."), row) == 1.0
    assert env.reward(said("It is 15170."), row) == 0.0 and env.reward(said("It is 1517.5"), row) == 0.0
    # only the turn's first number answers, and a turn that calls a tool answers nothing
    assert env.reward(said("1516 or 1517"), row) == 0.0 and env.reward(said("1,517"), row) == 0.0
    assert env.reward(said("<tool>calc(1517)</tool>"), row) == 0.0
    assert env.reward(said("Paris."), {"answer": "Paris"}) == 1.0 and env.reward(said("Parisian"), {"answer": "Paris"}) == 0.0
    with pytest.raises(ValueError, match="no column 'answer'"):
        env.reward(said("1517"), {"question": "?"})
    with pytest.raises(ValueError, match="no column 'question'.*'prompt' is the data module's rendered prompt"):
        env.reset({"text": "?"})
    copy = pickle.loads(pickle.dumps(env))  # the tools travel by their import paths
    assert copy.call("calc", "2*3") == "6"


def test_environment_defaults_and_settings_checks():
    env = Environment(max_turns=2, system_prompt="Be brief.")
    assert env.reset({"question": "Hi"}) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert env.step([], "anything", {}) is None
    with pytest.raises(NotImplementedError, match="reward"):
        env.reward([], {})
    with pytest.raises(ValueError, match="model.environment.max_turns must be >= 1"):
        Environment(max_turns=0)
    with pytest.raises(ValueError, match="model.environment.tools.calc"):
        ToolEnvironment(tools={"calc": "no_such_module_here:calc"})
    more = ToolEnvironment(tools={"neg": "operator:neg"})  # beside calc, not instead
    assert more.call("calc", "1+1") == "2" and sorted(more.tools) == ["calc", "neg"]
