"""FunctionReward: a Python function as the reward, the batch's columns passed by name, clear errors; GRPO learns
a rule-based reward over arithmetic prompts."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.modules import PPOModule

from lit_rlhf.settings import PPOSettings
from lit_rlhf.data import PromptDataModule
from lit_rlhf.cli import one_line_errors
from lit_rlhf.rewards import (
    CompositeReward, FunctionReward, NonFiniteRewardError, ReferenceSimilarityReward, RewardFunctionError,
    check_reward_inputs,
)
from lit_rlhf.settings import GenerationSettings, LoraSettings

from conftest import MetricsRecorder, write_jsonl

REWARDS_SOURCE = '''
def exact_answer(prompts, responses, answer):
    return [1.0 if r.strip().startswith(str(a)) else 0.0 for r, a in zip(responses, answer)]


def brief_answer(prompts, responses, **columns):
    """Rule-based: 1 for the right answer, less 0.05 per character (the answer and nothing else)."""
    return [(1.0 if str(a) in r.split() else 0.0) - len(r) / 20.0 for r, a in zip(responses, columns["answer"])]


def seen(prompts, responses, **columns):
    global last_columns
    last_columns = columns
    return [0.0] * len(responses)


def too_few(prompts, responses, **columns):
    return [0.0] * (len(responses) - 1)


def not_a_number(prompts, responses, **columns):
    return [float("nan")] + [0.0] * (len(responses) - 1)


def text(prompts, responses, **columns):
    return "1.0"


def one_argument(responses):
    return [0.0] * len(responses)


def parse_int(prompts, responses, **columns):
    return [int(r) for r in responses]


def reads_a_key(prompts, responses, **columns):
    return [float(columns["score"][i]) for i in range(len(responses))]


def parse_json(prompts, responses, **columns):
    import json

    return [json.loads(r)["score"] for r in responses]


value = 3
'''


@pytest.fixture
def rewards_file(tmp_path, monkeypatch) -> Path:
    """``my_rewards.py`` in the current directory (a fresh one per test)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_SOURCE)
    monkeypatch.delitem(__import__("sys").modules, "my_rewards", raising=False)
    return path


def test_columns_reach_the_function_by_name(rewards_file):
    reward = FunctionReward("my_rewards:exact_answer")
    assert reward.required_columns() == ["answer"] and reward.name == "exact_answer"
    scores = reward(["1+1=", "2+2="], [" 2 apples", "5"], columns={"answer": [2, 4], "id": ["a", "b"]})
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))
    # **columns gets every column; a file path works as well as a module name
    reward = FunctionReward(f"{rewards_file}:seen")
    reward(["p"], ["r"], columns={"answer": [1], "id": ["x"]})
    assert reward.fn.__globals__["last_columns"] == {"answer": [1], "id": ["x"]}
    assert reward.required_columns() == []


def test_inside_a_composite_reward(rewards_file):
    composite = CompositeReward([FunctionReward("my_rewards:exact_answer"), ReferenceSimilarityReward()], [2.0, 1.0])
    assert composite.required_columns() == ["answer"] and composite.needs_references()
    scores = composite(["1+1="], ["2"], references=["2"], columns={"answer": ["2"]})
    torch.testing.assert_close(scores, torch.tensor([3.0]))
    assert set(composite.last_components) == {"exact_answer", "rouge1_fmeasure"}


@pytest.mark.parametrize("path, message", [
    ("my_rewards", "must be 'module:function'"),
    ("no_such_module:f", "no module named 'no_such_module'"),
    ("my_rewards:missing", "has no attribute 'missing'"),
    ("my_rewards:value", "has a non-callable 'value'"),
    ("missing_file.py:f", "no such file"),
    ("broken:f", "importing 'broken' failed: ZeroDivisionError"),
    ("my_rewards:one_argument", "must take \\(prompts, responses, \\*\\*columns\\)"),
])
def test_import_errors_are_one_clear_line(rewards_file, path, message):
    (rewards_file.parent / "broken.py").write_text("1 / 0\n")
    with pytest.raises(ValueError, match=message) as info:
        FunctionReward(path)
    assert "\n" not in str(info.value) and "function=" in str(info.value)


@pytest.mark.parametrize("function, error, message", [
    ("too_few", ValueError, "returned 1 scores for 2 responses"),
    ("not_a_number", NonFiniteRewardError, r"returned non-finite scores at positions \[0\]"),
    ("text", TypeError, "returned str"),
])
def test_bad_return_values_are_clear_errors(rewards_file, function, error, message):
    with pytest.raises(error, match=f"FunctionReward\\(my_rewards:{function}\\) {message}"):
        FunctionReward(f"my_rewards:{function}")(["a", "b"], ["c", "d"], columns={"answer": [1, 2]})


def line_of(text: str) -> int:
    """The line of my_rewards.py that holds ``text``."""
    return next(i for i, line in enumerate(REWARDS_SOURCE.splitlines(), 1) if text in line)


@pytest.mark.parametrize("function, raised, line", [
    ("parse_int", "ValueError: invalid literal for int() with base 10: 'seven'", "[int(r) for r in responses]"),
    ("reads_a_key", "KeyError: 'score'", 'columns["score"]'),
    # raised deep inside json: the line named is the user's own call
    ("parse_json", "JSONDecodeError: Expecting value: line 1 column 1 (char 0)", "json.loads(r)"),
])
def test_a_raising_function_is_one_line_naming_it_and_where(rewards_file, function, raised, line, capsys,
                                                           monkeypatch):
    reward = FunctionReward(f"my_rewards:{function}")
    expected = f"FunctionReward(my_rewards:{function}) raised {raised} (my_rewards.py:{line_of(line)})"

    def score():
        reward(["p"], ["seven"], columns={"id": ["a"]})

    with pytest.raises(RewardFunctionError) as info:
        score()
    assert str(info.value) == expected
    # the commands print it as one line; LIT_RLHF_DEBUG=1 keeps the traceback of the user's own exception
    monkeypatch.delenv("LIT_RLHF_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        one_line_errors("lit-rlhf", score)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"lit-rlhf: error: {expected}" in err
    monkeypatch.setenv("LIT_RLHF_DEBUG", "1")
    with pytest.raises(RewardFunctionError) as info:
        one_line_errors("lit-rlhf", score)
    assert type(info.value.__cause__).__name__ == raised.split(":")[0]


def test_a_missing_column_or_reference_names_the_reward_and_what_is_missing(rewards_file):
    reward = FunctionReward("my_rewards:exact_answer")
    with pytest.raises(ValueError, match=r"FunctionReward\(my_rewards:exact_answer\) reads the column\(s\) \['answer'\]"
                                         r".*its columns: \['id', 'prompt'\]"):
        check_reward_inputs(reward, ["id", "prompt"], has_references=True)
    with pytest.raises(ValueError, match=r"FunctionReward\(my_rewards:exact_answer\) reads .*\['answer'\].*batch lacks"):
        reward(["p"], ["r"], columns={"id": ["x"]})
    with pytest.raises(ValueError, match="rouge1 fmeasure .* compares responses with references.*data.reference_column"):
        check_reward_inputs(ReferenceSimilarityReward(), ["id", "prompt"], has_references=False)
    check_reward_inputs(CompositeReward([reward]), ["answer"], has_references=False)  # nothing missing


def test_a_column_without_a_value_in_some_rows_names_the_column_and_a_row(rewards_file, tmp_path, datasets_cache):
    """A row without the column (absent from its JSON line, or null) handed None to the function."""
    rows = arithmetic_rows(5) + [{"id": "no-answer", "prompt": "1 + 1 ="}]
    dm = PromptDataModule(dataset=str(write_jsonl(tmp_path / "a.jsonl", rows)), batch_size=2, test_size=0.2)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"FunctionReward\(my_rewards:exact_answer\) reads the column 'answer', which "
                                         r"row 'no-answer' of the data has no value in"):
        check_reward_inputs(FunctionReward("my_rewards:exact_answer"), *dm.reward_inputs("fit"))
    check_reward_inputs(FunctionReward("my_rewards:seen"), *dm.reward_inputs("fit"))  # reads no column


def arithmetic_rows(n: int) -> list[dict]:
    return [{"prompt": f"{a} + {b} =", "answer": a + b} for a in range(n) for b in range(2)]


def test_grpo_learns_a_rule_based_function_reward(rewards_file, tmp_path):
    torch.manual_seed(0)
    data_file = tmp_path / "arithmetic.jsonl"
    write_jsonl(data_file, arithmetic_rows(20))
    data = PromptDataModule(model_name="embedded:tiny-gpt2", dataset=str(data_file), batch_size=4,
                            eval_batch_size=4)
    ppo = PPOSettings(advantage_estimator="grpo", init_kl_coef=0.01, ppo_epochs=2)
    module = PPOModule(
        model_name="embedded:tiny-gpt2", reward=FunctionReward("my_rewards:brief_answer"), ppo=ppo, samples_per_prompt=4,
        generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(6, 8)), rollout_batch_size=4,
        mini_batch_size=4, learning_rate=1e-2, lora=LoraSettings(target_modules=["c_attn", "lm_head"]),
        log_samples_every=0, export_adapter=False, ppo_steps=9,
    )
    history = MetricsRecorder()
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[history])
    trainer.fit(module, data)
    rewards = [s["reward"] for s in history.history]
    assert abs(history.history[0]["kl"]) < 1e-5  # LoRA starts at zero: the policy is the reference
    assert all(math.isfinite(r) for r in rewards)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards  # the reward of the last third rose
