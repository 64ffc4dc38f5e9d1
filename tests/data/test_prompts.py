"""PromptDataModule: prompts from a JSONL/CSV file (a column, a template over columns, chat messages), chat
templates, clear errors; DialogSumDataModule as its preset; the whole CLI on prompts without references."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lit_rlhf.cli import config_path, run
from lit_rlhf.data import DEFAULT_PROMPT_TEMPLATE, DialogSumDataModule, load_bundled_dialogsum
from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import resolve_model_path
from conftest import CHAT_TEMPLATE, END_OF_TURN, write_jsonl

# small files are converted into each test's folder, not the user's datasets cache
pytestmark = pytest.mark.usefixtures("datasets_cache")

MY_REWARDS = '''
def exact_answer(prompts, responses, answer):
    return [1.0 if r.strip().startswith(str(a)) else 0.0 for r, a in zip(responses, answer)]
'''


def arithmetic(n: int) -> list[dict]:
    return [{"prompt": f"{a} + {b} =", "answer": a + b} for a in range(n) for b in range(2)]


def ready(**kwargs) -> PromptDataModule:
    dm = PromptDataModule(**{"batch_size": 2, "eval_batch_size": 2, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


# -- sources, columns, templates ------------------------------------------------------------------------------


def test_jsonl_prompt_column_batches_carry_every_column(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", arithmetic(10))
    dm = ready(dataset=str(source))
    assert dm.summary() == {"source": 20, "kept": 20, "train": 16, "test": 4,
                            "prompts_cut": 0, "prompts_dropped": 0}
    tokenizer = dm.tokenizer
    batch = next(iter(dm.val_dataloader()))
    rows = dm.test_set.select(range(2))
    assert batch["prompt"] == rows["prompt"] and batch["reference"] is None
    assert batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist() == tokenizer(rows[0]["prompt"]).input_ids
    assert batch["columns"]["answer"] == rows["answer"] and batch["id"] == rows["id"]  # ids: row numbers
    assert set(batch["columns"]) == {"answer", "id"}  # the prompt itself comes as the reward's first argument
    # the held-out draw is seeded: the same seed, the same split; another seed, another one
    assert ready(dataset=str(source)).test_set["id"] == dm.test_set["id"]
    assert ready(dataset=str(source), split_seed=1).test_set["id"] != dm.test_set["id"]


def test_csv_template_over_two_columns_and_an_eval_split(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "train.csv").write_text("question,context,gold\n" + "".join(f"q{i},c{i},g{i}\n" for i in range(6)))
    (folder / "test.csv").write_text("question,context,gold\nqt,ct,gt\n")
    dm = ready(dataset=str(folder), template="Context: {context}\nQ: {question} {{A}}:", eval_split="test",
               reference_column="gold", filter_column="question", max_chars=2)
    assert dm.summary() == {"source": 6, "kept": 6, "train": 6, "test": 1,
                            "prompts_cut": 0, "prompts_dropped": 0}
    assert dm.train_set[0]["prompt"] == "Context: c0\nQ: q0 {A}:"
    batch = next(iter(dm.test_dataloader()))
    assert batch["prompt"] == ["Context: ct\nQ: qt {A}:"] and batch["reference"] == ["gt"]


def test_messages_go_through_the_chat_template(tmp_path, qwen_with_chat_template):
    conversations = [[{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
                     for i in range(6)]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    tokenizer = AutoTokenizer.from_pretrained(qwen_with_chat_template)
    dm = ready(model_name=str(qwen_with_chat_template), dataset=str(source), messages_column="messages",
               system_prompt="Be brief.", shuffle_split=False)
    for row, conversation in zip(dm.train_set, conversations):
        messages = [{"role": "system", "content": "Be brief."}, *conversation]
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert row["input_ids"] == expected
        assert row["prompt"].startswith("<|system|>Be brief.\n<|user|>What is") and row["prompt"].endswith("<|assistant|>")
    # SFT pairs: the last assistant turn is the completion, the turns before it the prompt
    sft = ready(model_name=str(qwen_with_chat_template), dataset=str(source), messages_column="messages",
                with_labels=True, shuffle_split=False)
    first = sft.train_set[0]
    assert first["input_ids"] == tokenizer.apply_chat_template(conversations[0][:1], add_generation_prompt=True)["input_ids"]
    assert first["summary_ids"] == tokenizer("1", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert next(iter(sft.val_dataloader()))["reference"] == list(sft.test_set["completion"])[:2]


def test_a_seq2seq_model_never_gets_a_chat_template(tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Hi {i}"}]}
                                                    for i in range(5)])
    folder = tmp_path / "t5-with-template"
    shutil.copytree(resolve_model_path("embedded:tiny-t5"), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    dm = ready(model_name=str(folder), dataset=str(source), messages_column="messages", shuffle_split=False)
    assert dm.train_set[0]["prompt"] == "Hi 0"  # the contents, no template
    with pytest.raises(ValueError, match="data.chat_template=true: .* encoder-decoder"):
        ready(model_name=str(folder), dataset=str(source), messages_column="messages", chat_template=True)


@pytest.mark.parametrize("setup, message", [
    (lambda d: write_jsonl(d / "p.jsonl", [{"text": "x"}] * 5), r"lacks the column\(s\) \['prompt'\]: it has \['text'\]"),
    (lambda d: d / "p.jsonl", "p.jsonl is empty"),  # the test writes it empty
    (lambda d: write_jsonl(d / "p.jsonl", [{"prompt": "x"}] * 5), r"lacks the column\(s\) \['topic'\]"),
])
def test_data_errors_are_one_line_and_leave_nothing_behind(tmp_path, monkeypatch, setup, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    source = setup(tmp_path)
    if not source.exists():
        source.write_text("")
    template = ["--data.template", "About {topic}:"] if "topic" in message else []
    with pytest.raises(ValueError, match=message) as info:
        run(["fit", "--config", config_path("prompts_jsonl.yaml"), "--data.dataset", str(source), *template,
             "--model.reward.function", "my_rewards:exact_answer", "--trainer.enable_progress_bar", "false"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "logs").exists() or not [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]


@pytest.mark.parametrize("kwargs, flag", [
    ({"template": "{a}", "messages_column": "m"}, "messages_column and data.template"),
    ({"template": "{0}"}, "data.template"),
    ({"chat_template": "sometimes"}, "data.chat_template"),
    ({"with_labels": True}, "data.with_labels"),
    ({"truncation": "left"}, "data.truncation"),
    ({"reserve_tokens": -1}, "data.reserve_tokens"),
])
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        PromptDataModule(**kwargs)


INSTRUCTION = "\nAnswer in one word:"


def test_long_prompts_are_cut_in_their_content_never_in_their_frame(tmp_path):
    # a template's longest field loses its end; the instruction after it stays whole
    rows = [{"topic": "cats", "text": " ".join(f"w{k}" for k in range(3 * i + 1))} for i in range(10)]
    source = write_jsonl(tmp_path / "p.jsonl", rows)
    template = "About {topic}: {text}" + INSTRUCTION
    whole = ready(dataset=str(source), template=template, test_size=0.2)
    lengths = {row["id"]: len(row["input_ids"]) for part in (whole.train_set, whole.test_set) for row in part}
    limit = sorted(lengths.values())[5]
    dm = ready(dataset=str(source), template=template, max_prompt_tokens=limit, test_size=0.2)
    fitted = [row for part in (dm.train_set, dm.test_set) for row in part]
    assert len(fitted) == 10 and max(len(row["input_ids"]) for row in fitted) <= limit
    assert all(row["query"].startswith("About cats: w0") and row["query"].endswith(INSTRUCTION) for row in fitted)
    long = {i for i, n in lengths.items() if n > limit}
    assert long and {row["id"] for row in fitted if row["prompt_fit"] == "cut"} == long
    assert all(row["prompt_fit"] == "whole" for row in fitted if row["id"] not in long)
    assert dm.summary()["prompts_cut"] == len(long) and dm.summary()["prompts_dropped"] == 0

    # drop: the long rows go, counted; the rest are whole
    dropped = ready(dataset=str(source), template=template, max_prompt_tokens=limit, truncation="drop",
                    test_size=0.2)
    kept = [row for part in (dropped.train_set, dropped.test_set) for row in part]
    assert {row["id"] for row in kept} == set(lengths) - long and all(row["prompt_fit"] == "whole" for row in kept)
    assert dropped.summary()["prompts_dropped"] == len(long) and dropped.summary()["prompts_cut"] == 0


def test_a_plain_prompt_loses_its_start_and_a_frame_too_long_is_dropped(tmp_path):
    # a prompt column has no frame of its own: its end (the question) is what stays
    rows = [{"prompt": " ".join(f"w{k}" for k in range(30)) + " what is the answer?"}] * 4
    dm = ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)), max_prompt_tokens=8, test_size=0.25)
    assert all(len(ids) <= 8 for ids in dm.train_set["input_ids"])
    assert all(q.endswith(" what is the answer?") and not q.startswith("w0") for q in dm.train_set["query"])
    # a system prompt longer than the limit leaves no content to cut: every row is dropped, and the error says so
    with pytest.raises(ValueError, match="4 were longer than data.max_prompt_tokens=8"):
        ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)), max_prompt_tokens=8, test_size=0.25,
              system_prompt="You are a helpful assistant who answers every question in one word")
    # a template without a field is all frame: too long, its rows are dropped (not an error inside datasets' map)
    with pytest.raises(ValueError, match="4 were longer than data.max_prompt_tokens=3"):
        ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)), max_prompt_tokens=3, test_size=0.25,
              template="Answer the question that everyone asks about everything")


def test_a_rollout_prompt_near_the_context_keeps_its_frame_through_generation(tmp_path, short_context_gpt2, caplog):
    # a decoder-only prompt leaves room for the longest response (data.reserve_tokens), so it is cut in its
    # content and the rollout's own fitting, which would cut its start, leaves it whole
    from lit_rlhf.models import Policy
    from lit_rlhf.rollout import generate_responses
    from lit_rlhf.settings import GenerationSettings, longest_response

    settings = GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 9), do_sample=False)
    rows = [{"prompt": " ".join(f"w{k}" for k in range(n))} for n in (20, 24, 28, 40)]
    dm = ready(model_name=str(short_context_gpt2), dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)),
               template="Q: {prompt}\nA:", system_prompt="Be brief.", test_size=0.5,
               reserve_tokens=longest_response(settings.max_new_tokens))
    assert dm.summary()["prompts_cut"] == 4 and dm.summary()["prompts_dropped"] == 0
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] + 8 <= 32  # the prompt and the longest response share the 32 positions
    policy = Policy(str(short_context_gpt2))
    with caplog.at_level("WARNING", logger="lit_rlhf"):
        generated = generate_responses(policy, batch, settings, torch.full((2,), 8))
    rows = generated.rows
    assert torch.equal(rows.query_ids, batch["input_ids"])  # the safety net did not fire
    assert not [r for r in caplog.records if "cut from the start" in r.getMessage()]
    for ids, mask in zip(rows.query_ids, rows.query_mask):
        query = dm.tokenizer.decode(ids[mask.bool()])
        assert query.startswith("Be brief.\nQ: w0") and query.endswith("\nA:")
    # a reserve that leaves a prompt no room is one clear error naming the settings
    with pytest.raises(ValueError, match="data.reserve_tokens=32 .* lower model.generation.max_new_tokens"):
        ready(model_name=str(short_context_gpt2), dataset=str(tmp_path / "p.jsonl"), template="Q: {prompt}\nA:",
              test_size=0.5, reserve_tokens=32)


def test_a_chat_prompt_keeps_its_system_prompt_and_generation_prompt(tmp_path, qwen_with_chat_template):
    turns = [{"role": "user", "content": "old question " + "x " * 20}, {"role": "assistant", "content": "old answer"},
             {"role": "user", "content": "new question " + "y " * 20}, {"role": "assistant", "content": "new answer"},
             {"role": "user", "content": "tell me a story " + "z " * 60 + "about a cat"}]
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": turns[:3]}, {"messages": turns}] * 2)
    kwargs = {"model_name": str(qwen_with_chat_template), "dataset": str(source), "messages_column": "messages",
              "system_prompt": "Be brief.", "test_size": 0.25}
    whole = ready(**kwargs)
    short, long = sorted({len(ids) for ids in whole.train_set["input_ids"]})
    dm = ready(**kwargs, max_prompt_tokens=short - 5)
    rows = list(dm.train_set) + list(dm.test_set)
    assert all(len(row["input_ids"]) <= short - 5 and row["prompt_fit"] == "cut" for row in rows)
    for row in rows:
        assert row["query"].startswith("<|system|>Be brief.\n<|user|>") and row["query"].endswith("<|assistant|>")
    # the short conversation: its oldest turn pair went whole; the long one: only the last user message is left,
    # cut from its start, its end ("about a cat") kept
    queries = {row["query"] for row in rows}
    assert "<|system|>Be brief.\n<|user|>new question " + "y " * 20 + "\n<|assistant|>" in queries
    last = [q for q in queries if "about a cat" in q]
    assert last and all("question" not in q and "story" not in q for q in last)


def test_a_chat_completion_ends_in_the_turn_end_its_template_writes(tmp_path, qwen_with_end_of_turn,
                                                                    qwen_with_chat_template):
    from lit_rlhf.data import end_of_turn

    conversation = [{"role": "user", "content": "2 + 2 ="}, {"role": "assistant", "content": "4"}]
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}] * 4)
    dm = ready(model_name=str(qwen_with_end_of_turn), dataset=str(source), messages_column="messages",
               with_labels=True, test_size=0.25)
    end = dm.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end != dm.tokenizer.eos_token_id and end_of_turn(dm.tokenizer, chat=True) == end
    assert all(ids[-1] == end for ids in dm.train_set["summary_ids"])
    assert dm.train_set[0]["query"].endswith("<|assistant|>")
    # a template whose turn ends in plain text (a newline), or no chat template at all: the tokenizer's eos
    plain = ready(model_name=str(qwen_with_chat_template), dataset=str(source), messages_column="messages",
                  with_labels=True, test_size=0.25)
    assert all(ids[-1] == plain.tokenizer.eos_token_id for ids in plain.train_set["summary_ids"])
    assert end_of_turn(dm.tokenizer, chat=False) == dm.tokenizer.eos_token_id


# -- the DialogSum preset -------------------------------------------------------------------------------------


def test_dialogsum_preset_first_batches_are_the_recipes():
    # computed here from the bundled rows, the recipe's filter and template, and the stream's seeded permutation
    dm = DialogSumDataModule(batch_size=8, eval_batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    kept = [r for r in load_bundled_dialogsum()["train"] if 200 < len(r["dialogue"]) <= 1000]
    assert dm.summary() == {"source": 12460, "kept": len(kept), "train": 8017, "test": 2005,
                            "prompts_cut": 0, "prompts_dropped": 0}
    order = torch.randperm(8017, generator=torch.Generator().manual_seed(0)).tolist()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-t5"))
    loader = iter(dm.train_dataloader())
    for step in range(2):
        batch = next(loader)
        rows = [kept[i] for i in order[8 * step : 8 * step + 8]]
        assert batch["id"] == [r["id"] for r in rows] and batch["reference"] == [r["summary"] for r in rows]
        prompts = [DEFAULT_PROMPT_TEMPLATE.replace("{dialogue}", r["dialogue"]) for r in rows]
        expected = tokenizer(prompts, padding=True, return_tensors="pt")  # T5: right padding, </s> last
        assert torch.equal(batch["input_ids"], expected.input_ids)
        assert torch.equal(batch["attention_mask"], expected.attention_mask)
    held_out = next(iter(dm.val_dataloader()))
    assert held_out["id"] == [r["id"] for r in kept[8017:8025]]


def test_the_cli_runs_the_dialogsum_preset_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run(["fit", "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: lit_rlhf.data.DialogSumDataModule" in printed and "prompt_template" in printed


# -- the whole command on prompts without references -------------------------------------------------------


def test_jsonl_prompts_without_references_fit_validate_test_predict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", arithmetic(10))
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    quick = ["--config", config_path("prompts_jsonl.yaml"), "--model.ppo_steps", "2", "--trainer.enable_progress_bar",
             "false", "--model.generation.max_new_tokens", "[3, 5]"]
    fit = run(["fit", *quick])
    assert type(fit.datamodule) is PromptDataModule and fit.model.ppo_step == 2
    run_dir = Path(fit.trainer.log_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert "rouge1" not in report["before"] and "rouge1_before" not in report["per_prompt"]
    markdown = (run_dir / "report.md").read_text()
    assert "ROUGE" not in markdown.split("\n\n")[1] and "No ROUGE: the held-out prompts have no references" in markdown
    assert "DialogSum" not in markdown and "that data.test_size holds out of PPO rollouts" in markdown
    last = next(run_dir.rglob("last.ckpt"))
    validate = run(["validate", "--ckpt_path", str(last), *quick])
    assert torch.isfinite(validate.trainer.callback_metrics["val/reward_mean"])
    test = run(["test", "--ckpt_path", str(last), *quick])
    assert torch.isfinite(test.trainer.callback_metrics["test/reward_mean"])
    new = write_jsonl(tmp_path / "new.jsonl", [{"prompt": "7 + 1 =", "answer": 8}, {"prompt": "2 + 2 =", "answer": 4}])
    predict = run(["predict", "--config", config_path("prompts_jsonl.yaml"), "--ckpt_path", str(last),
                   "--data.predict_path", str(new), "--trainer.enable_progress_bar", "false"])
    records = [json.loads(line) for line in Path(predict.trainer.log_dir, "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prompt"]) for r in records] == [("0", "7 + 1 ="), ("1", "2 + 2 =")]
    assert all(isinstance(r["response"], str) and r["score"] in (0.0, 1.0) for r in records)
