"""Multi-turn episodes (``lit_rlhf.models.episodes`` through ``rollout.collect``): the model's tokens kept as
sampled, the environment's tokens rendered by the chat template between them, the mask of the model's own
tokens, log-probs equal to a plain forward over the whole conversation, the context limit."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoTokenizer

from lit_rlhf import rollout as ro
from lit_rlhf.models import Policy
from lit_rlhf.models.episodes import appended_text, closing_text, turn_end
from lit_rlhf.rewards import Environment
from lit_rlhf.settings import GenerationSettings

SETTINGS = GenerationSettings(min_new_tokens=1, max_new_tokens=(3, 6))


class Scripted(Environment):
    """Deterministic replies: ``result <n>`` after the model's n-th turn; a row asking "Hi" ends after one turn."""

    def step(self, messages, turn, row):
        n = sum(m["role"] == "assistant" for m in messages)
        return None if row["question"] == "Hi" else [{"role": "tool", "content": f"result {n}"}]

    def reward(self, messages, row):
        return float(len(messages))


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return Policy("embedded:tiny-gpt2", value_head=False)


def batch(questions):
    n = len(questions)
    return {"input_ids": torch.zeros(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long),
            "query": questions, "columns": {"question": questions}}


def test_env_tokens_sit_between_the_model_turns_and_the_mask_covers_exactly_the_model_tokens(policy, monkeypatch):
    turns = []  # every generate call's responses, as sampled
    original = policy.generate

    def recording(*args, **kwargs):
        ids, mask = original(*args, **kwargs)
        turns.append([row[m.bool()].tolist() for row, m in zip(ids, mask)])
        return ids, mask

    monkeypatch.setattr(policy, "generate", recording)
    torch.manual_seed(1)
    env = Scripted(max_turns=3, prompt_column="question")
    g = ro.collect(policy, None, batch(["What is 2+3?", "Hi"]), SETTINGS, torch.tensor([5, 3, 4, 5]), repeats=2,
                   environment=env)
    assert [len(t) for t in turns] == [4, 2, 2]  # the "Hi" episodes ended after their first turn
    tok = policy.tokenizer
    for row, episode_turns in ((0, [turns[0][0], turns[1][0], turns[2][0]]), (1, [turns[0][1], turns[1][1], turns[2][1]]),
                               (2, [turns[0][2]]), (3, [turns[0][3]])):
        ids = g.rows.response_ids[row][g.rows.response_mask[row].bool()].tolist()
        own = g.action_mask[row][: len(ids)].tolist()
        expected, expected_own = [], []
        for n, turn in enumerate(episode_turns, start=1):
            expected += turn
            expected_own += [1] * len(turn)
            if n < len(episode_turns):  # the template's text for the tool's reply, then the generation prompt
                between = tok(f"\n<|tool|>result {n}\n<|assistant|>", add_special_tokens=False).input_ids
                expected += between
                expected_own += [0] * len(between)
        assert ids == expected and own == expected_own
        assert g.action_mask[row][len(ids):].sum() == 0  # nothing of the padding is the model's
    assert g.scores.tolist() == [6.0, 6.0, 2.0, 2.0]  # the environment's rewards: user + 3 assistant + 2 tool messages
    prompt = tok.decode(g.rows.query_ids[0][g.rows.query_mask[0].bool()])
    assert prompt == "<|user|>What is 2+3?\n<|assistant|>"


def test_logprobs_of_the_model_tokens_equal_a_plain_forward_over_the_whole_conversation(policy):
    torch.manual_seed(2)
    env = Scripted(max_turns=3, prompt_column="question")
    g = ro.collect(policy, None, batch(["What is 2+3?", "Hi", "Why?"]), SETTINGS, torch.tensor([5, 3, 4]),
                   environment=env)
    scores = policy.score(g.rows, [torch.arange(3)], values=False, reference=True)
    for row in range(3):
        q = g.rows.query_ids[row][g.rows.query_mask[row].bool()]
        n = int(g.rows.response_mask[row].sum())
        full = torch.cat([q, g.rows.response_ids[row][:n]])
        with torch.no_grad(), policy.mode(dropout=False):  # one unpadded sequence, the adapter at its initial zero
            logits = policy.model(input_ids=full[None]).logits[0].float()
        expected = torch.log_softmax(logits[len(q) - 1:-1], -1).gather(1, full[len(q):, None]).squeeze(1)
        own = g.action_mask[row][:n].bool()
        assert_close(scores.logprobs[row][:n][own], expected[own], rtol=1e-5, atol=1e-5)
        assert (scores.logprobs[row][:n] - scores.ref_logprobs[row][:n]).abs().max() == 0  # KL 0 at the start


def test_an_episode_stops_where_the_context_is_full(policy, monkeypatch):
    monkeypatch.setattr(policy, "max_positions", lambda: 64)
    torch.manual_seed(3)
    g = ro.collect(policy, None, batch(["What is 2+3?"]), SETTINGS, torch.tensor([5]),
                   environment=Scripted(max_turns=50, prompt_column="question"))
    episode = g.episodes[0]
    assert episode.truncated and 1 < episode.turns < 50
    assert len(episode.prompt_ids) + len(episode.ids) <= 64
    assert g.action_mask[0][int(g.rows.response_mask[0].sum()) - 1] == 1  # the model's turn is last


def test_the_template_closes_a_turn_the_model_ended_or_that_was_cut(qwen_with_end_of_turn):
    tok = AutoTokenizer.from_pretrained(qwen_with_end_of_turn)
    end = turn_end(tok)
    assert end == "<|end|>\n"
    eot = tok.convert_tokens_to_ids("<|end|>")
    said = tok("4", add_special_tokens=False).input_ids
    assert closing_text(tok, end, said + [eot], (eot,)) == "\n"  # the model ended its turn: only the newline
    assert closing_text(tok, end, said, (eot,)) == "<|end|>\n"  # cut by its limit: the template closes it
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert appended_text(tok, messages, [{"role": "tool", "content": "ok"}]) == "<|tool|>ok<|end|>\n<|assistant|>"
