"""The embedded tool model: its tokenizer and chat template, its supervised data (the text the multi-turn rollout
feeds the model at the same point), and the shipped model playing an episode with the calculator."""

import torch
import transformers

from lit_rlhf.data.arithmetic import tool_conversation, tool_sft_rows
from lit_rlhf.data.formats import PromptFormat, encode_prompts
from lit_rlhf.models import resolve_model_path, run_episodes
from lit_rlhf.models.arithmetic import build_tool_tokenizer
from lit_rlhf.rewards import ToolEnvironment

PROBLEMS = [{"id": "p0", "prompt": "12+345=", "answer": "357"}, {"id": "p1", "prompt": "90-7=", "answer": "83"}]


def test_tokenizer_whole_tokens_and_template():
    tokenizer = build_tool_tokenizer()
    text = tokenizer.apply_chat_template(tool_conversation(PROBLEMS[0], tool=True), tokenize=False)
    assert text == ("<|user|>12+345=<|assistant|><tool>calc(12+345)</tool><|endoftext|><|tool|>357<|assistant|>357"
                    "<|endoftext|>")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 30 and ids.count(tokenizer.eos_token_id) == 2  # roles, <tool>, </tool>, calc: one token each
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12+345=<tool>calc(12+345)</tool>357357"
    assert tokenizer("x", add_special_tokens=False).input_ids == [tokenizer.unk_token_id] != [0]


def test_sft_rows_are_deterministic_one_per_assistant_turn():
    rows = [{"id": f"t{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(200)]
    first, again = tool_sft_rows(rows, 0.3, seed=0), tool_sft_rows(rows, 0.3, seed=0)
    assert first == again and first != tool_sft_rows(rows, 0.3, seed=1)
    tooled = {r["id"].rsplit("_", 1)[0] for r in first if r["id"].endswith("_1")}
    assert len(first) == 200 + len(tooled) and 40 <= len(tooled) <= 80  # about 30% with the tool
    assert all(r["messages"][-1]["role"] == "assistant" for r in first)
    assert tool_sft_rows(rows[:1], 1.0)[0]["messages"][-1]["content"] == "<tool>calc(0+1)</tool>"


def scripted(turns: list[list[int]]):
    """A generate that answers every row's n-th turn with ``turns[n]`` (then eos)."""
    calls = iter(turns)

    def generate(ids, mask, limits):
        turn = next(calls) + [0]
        return torch.tensor([turn] * len(ids)), torch.ones(len(ids), len(turn), dtype=torch.long)

    return generate


def test_sft_text_is_what_the_episode_feeds_the_model():
    """Each supervised row's prompt ids are the episode's ids before that turn, its completion the turn's ids."""
    tokenizer = build_tool_tokenizer()
    rows = tool_sft_rows(PROBLEMS[:1], tool_fraction=1.0)
    fmt = PromptFormat(messages_column="messages", chat=True, with_labels=True)
    sft = encode_prompts({key: [r[key] for r in rows] for key in rows[0]}, tokenizer, fmt)
    turns = [ids[:-1] for ids in sft["summary_ids"]]  # the completions without their end of turn (eos)
    environment = ToolEnvironment(max_turns=2, prompt_column="question", system_prompt="")
    episode, = run_episodes(tokenizer, environment, [{"question": "12+345=", "answer": "357"}], torch.tensor([14]),
                            scripted(turns), (0,), 0, 64)
    assert episode.messages == rows[1]["messages"] and environment.reward(episode.messages, episode.row) == 1.0
    sequence = episode.prompt_ids + episode.ids
    for prompt, completion in zip(sft["input_ids"], sft["summary_ids"]):
        assert sequence[:len(prompt) + len(completion)] == prompt + completion
    assert sft["summary_ids"][0][-1] == 0 and sft["summary_ids"][1][-1] == 0  # the turn ends in eos


def test_shipped_model_plays_an_episode_with_the_tool():
    path = resolve_model_path("embedded:arithmetic-tools")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    def greedy(ids, mask, limits):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=14,
                                 pad_token_id=0)[:, ids.shape[1]:]
        return out, (torch.cumsum((out == 0).long(), 1) - (out == 0).long() == 0).long()

    environment = ToolEnvironment(max_turns=2, prompt_column="question", system_prompt="")
    rows = [{"question": "854-691=", "answer": "163"}, {"question": "63-4=", "answer": "59"}]  # held-out, train
    episodes = run_episodes(tokenizer, environment, rows, torch.tensor([14, 14]), greedy, (0,), 0, 64)
    assert all(e.done and 1 <= e.turns <= 2 for e in episodes)
    assert [m["content"] for m in episodes[0].messages[1:]] == ["<tool>calc(854-691)</tool>", "163", "163"]
    assert environment.reward(episodes[0].messages, rows[0]) == 1.0


class LongAnswer(ToolEnvironment):
    """The tool answers the first question at length (an error message): that conversation nears the context."""

    def step(self, messages, turn, row):
        return [{"role": "tool", "content": "9" * 40 if row["question"] == "1+1=" else "2"}]


def test_a_turn_never_runs_a_row_past_the_context():
    """One batched generate runs every row to the batch's longest limit: a conversation near the context's end is
    generated in a call of its own, with no longer limit than its room (else a learnt-position model fails)."""
    tokenizer, calls = build_tool_tokenizer(), []

    def generate(ids, mask, limits):
        assert bool(mask[:, 0].any())  # no column of padding only
        calls.append((mask.sum(1) + limits.max()).tolist())  # each row's length after the call's longest turn
        turn = [22, 24, 14, 2, 15, 23, 0]  # <tool>calc(1)</tool> eos
        return torch.tensor([turn] * len(ids)), torch.ones(len(ids), len(turn), dtype=torch.long)

    rows = [{"question": "1+1=", "answer": "2"}, {"question": "2+2=", "answer": "4"}]
    episodes = run_episodes(tokenizer, LongAnswer(max_turns=2, system_prompt=""), rows, torch.tensor([14, 14]),
                            generate, (0,), 0, 64)
    assert len(calls) == 3 and all(n <= 64 for call in calls for n in call), calls  # turn 2: one call per row
    assert [e.turns for e in episodes] == [2, 2] and not any(e.truncated for e in episodes)
