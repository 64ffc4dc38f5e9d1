"""Preference pairs (prompt, chosen response, rejected response) as rows and batches.

    pair_texts            rows -> the prompt's messages, the two response texts, why a row is skipped (if it is)
    encode_pairs          pair texts -> prompt ids (fit to the limits), response ids (end-of-turn last)
    classifier_sides      encoded pairs -> the ids a reward model reads of each side (``classifier_inputs``)
    encode_scored         predict rows (prompt, response) -> the prompt's ids and the classifier's ids
    PreferenceCollator    rows -> a padded preference batch
    ScoringCollator       predict rows (prompt, response) -> a padded batch of the classifier's texts

A row is either text columns (``prompt_column``, ``chosen_column``, ``rejected_column``) or two conversations
in ``chosen_column``/``rejected_column`` (lists of ``{role, content}``, as hub preference datasets store them):
their shared leading turns are the prompt, each last (assistant) turn is a response.

A batch holds ``prompt_input_ids``/``prompt_attention_mask`` (LongTensor [B, P], padded on the policy's side: right
for encoder-decoder models, left for decoder-only ones), ``chosen_ids``/``chosen_mask`` [B, Tc] and
``rejected_ids``/``rejected_mask`` [B, Tr] (the responses alone, right-padded, ending in the chat template's
end-of-turn token, else in eos when the tokenizer has one), with ``classifier_inputs`` (a reward model reads the
batch) ``chosen_input_ids``/``chosen_attention_mask`` and
``rejected_input_ids``/``rejected_attention_mask`` (query + newline + response, or the response alone with
``classifier_text="response"``, encoded by ``rewards.classifier_input_ids``: the response whole, the query cut from
its start to ``classifier_max_length``; padded on the tokenizer's side: what a sequence classifier reads, exactly
as ``ClassifierReward(text=...)`` reads it in a rollout), lists ``prompt``, ``query`` (the prompt ids decoded, as
rollouts give it to rewards), ``chosen``, ``rejected``, ``id``, and with ``margin_column`` a FloatTensor ``margin``
[B].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.batching import pad
from lit_rlhf.data.formats import PromptFormat, encode_prompts, end_of_turn, rows_of
from lit_rlhf.data.sources import is_blank
from lit_rlhf.rewards import TextField, classifier_input_ids

PROMPT_MESSAGES = "prompt_messages"
"""The derived column of each row's prompt as a conversation (a text prompt is one user turn)."""


@dataclass(frozen=True)
class PairColumns:
    """Where a row's pair lives (the data module's ``*_column`` settings)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = None


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "content" in m for m in value):
        raise ValueError(f"data.{column}: conversation pairs need both responses as lists of {{role, content}} "
                         f"messages, got {type(value).__name__}")
    return [{"role": str(m.get("role")), "content": str(m["content"] or "")} for m in value]


def _split_conversations(chosen: Any, rejected: Any, cols: PairColumns) -> tuple[list[dict[str, str]], str, str]:
    """(shared prompt turns, chosen reply, rejected reply) from two conversations that differ in the last turn."""
    c, r = _messages(chosen, "chosen_column"), _messages(rejected, "rejected_column")
    for conv, setting in ((c, f"chosen_column={cols.chosen!r}"), (r, f"rejected_column={cols.rejected!r}")):
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError(f"data.{setting}: a conversation does not end with an assistant turn (the response)")
    if c[:-1] != r[:-1]:
        raise ValueError(f"data.chosen_column={cols.chosen!r} and data.rejected_column={cols.rejected!r}: a pair's "
                         "conversations differ before their last turn, so they do not share one prompt")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def pair_texts(batch: dict[str, list], cols: PairColumns, conversations: bool) -> dict[str, list]:
    """Each row's prompt as messages, its two response texts, and ``skip``: "" for a usable pair, "identical"
    (chosen == rejected: no preference to learn) or "empty" (an empty prompt or response)."""
    out: dict[str, list] = {PROMPT_MESSAGES: [], "chosen_text": [], "rejected_text": [], "skip": []}
    for row in rows_of(batch):
        if conversations:
            prompt, chosen, rejected = _split_conversations(row[cols.chosen], row[cols.rejected], cols)
        else:
            text = "" if row[cols.prompt] is None else str(row[cols.prompt])
            prompt = [{"role": "user", "content": text}] if text.strip() else []
            chosen, rejected = (str(row[c] or "") for c in (cols.chosen, cols.rejected))
        if cols.margin is not None:
            margin = row[cols.margin]
            if not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise ValueError(f"data.margin_column={cols.margin!r}: row {row.get('id')!r} has margin {margin!r}; "
                                 "every pair needs a finite number")
        empty = is_blank(prompt) or is_blank(chosen) or is_blank(rejected)  # the rule of ``sources.RowTexts``
        out[PROMPT_MESSAGES].append(prompt)
        out["chosen_text"].append(chosen)
        out["rejected_text"].append(rejected)
        out["skip"].append("empty" if empty else "identical" if chosen == rejected else "")
    return out


def _response_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase, end_id: int | None) -> list[list[int]]:
    """Response token ids, ``end_id`` last (the end-of-turn token; none when None), with no prompt and no decoder
    start token."""
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    return ids if end_id is None else [row + [end_id] for row in ids]


def encode_pairs(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat) -> dict[str, list]:
    """The prompt as ``encode_prompts`` renders and fits it (chat template, system prompt; cut in its content so
    that it fits beside the longer response) and both responses' ids (ending in the chat template's end-of-turn
    token, else eos)."""
    end = end_of_turn(tokenizer, fmt.chat)
    responses = {side: _response_ids(batch[f"{side}_text"], tokenizer, end) for side in ("chosen", "rejected")}
    reserved = [max(len(c), len(r)) for c, r in zip(responses["chosen"], responses["rejected"])]
    out = encode_prompts(batch, tokenizer, fmt, reserved)
    for side in ("chosen", "rejected"):
        out[f"{side}_ids"] = responses[side]
    return out


def classifier_sides(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, classifier_text: TextField,
                     classifier_limit: int | None) -> dict[str, list]:
    """A reward model's ids of each encoded pair's ``query + "\\n" + response`` (or of the response alone,
    ``classifier_text="response"``) in at most ``classifier_limit`` tokens, with ``<side>_cut`` when a response alone
    is longer: the query is the prompt as PPO's rewards receive it (its ids decoded, special tokens such as T5's
    ``</s>`` included) and ``classifier_input_ids`` encodes it as ``ClassifierReward(text=classifier_text)`` does in a
    rollout, so a reward model trains on what it scores there."""
    out: dict[str, list] = {}
    for side in ("chosen", "rejected"):
        inputs = classifier_input_ids(tokenizer, classifier_text, batch["query"], batch[f"{side}_text"],
                                      classifier_limit)
        out[f"{side}_input_ids"], out[f"{side}_cut"] = inputs
    return out


def encode_scored(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat,
                  prompt_column: str, response_column: str, classifier_text: TextField,
                  classifier_limit: int | None = None) -> dict[str, list]:
    """Predict rows: the prompt rendered as for pairs (one user turn, chat template, system prompt; fit to
    ``fmt``'s limits in its content, as any prompt) and the classifier's ids of query + newline + response (or of
    the response alone), as ``classifier_sides`` makes them. ``prompt`` stays the row's own text."""
    responses = [str(r) for r in batch[response_column]]
    prompts = [str(p or "") for p in batch[prompt_column]] if prompt_column in batch else [""] * len(responses)
    out = encode_prompts({PROMPT_MESSAGES: [[{"role": "user", "content": p}] for p in prompts]}, tokenizer, fmt)
    out["prompt"], out["response"] = prompts, responses
    out["classifier_ids"] = classifier_input_ids(tokenizer, classifier_text, out["query"], responses,
                                                 classifier_limit).input_ids
    return out


@dataclass(frozen=True)
class PreferenceCollator:
    """Pads rows into a preference batch (see the module docstring for the keys).

    ``padding_side``: the prompt's (the policy's: right for encoder-decoder, left for decoder-only models);
    ``classifier``: whether the rows carry a reward model's inputs (``classifier_sides``) to pad;
    ``classifier_padding_side``: the tokenizer's own, for the classifier's sequences.
    ``margin_column``: the row value that becomes ``margin`` (None: the batch has none)."""

    pad_token_id: int
    padding_side: Literal["left", "right"]
    classifier: bool = False
    classifier_padding_side: Literal["left", "right"] = "right"
    margin_column: str | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        ids, mask = pad([row["input_ids"] for row in rows], self.pad_token_id, self.padding_side)
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = ids, mask
        for side in ("chosen", "rejected"):
            ids, mask = pad([row[f"{side}_ids"] for row in rows], self.pad_token_id, "right")
            batch[f"{side}_ids"], batch[f"{side}_mask"] = ids, mask
            if self.classifier:
                ids, mask = pad([row[f"{side}_input_ids"] for row in rows], self.pad_token_id,
                                self.classifier_padding_side)
                batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = ids, mask
        if self.margin_column is not None:
            batch["margin"] = torch.tensor([float(row[self.margin_column]) for row in rows], dtype=torch.float32)
        batch["prompt"] = [row["prompt"] for row in rows]
        batch["query"] = [row["query"] for row in rows]
        batch["chosen"] = [row["chosen_text"] for row in rows]
        batch["rejected"] = [row["rejected_text"] for row in rows]
        batch["id"] = [str(row["id"]) for row in rows]
        return batch


@dataclass(frozen=True)
class ScoringCollator:
    """Pads predict rows into ``input_ids``/``attention_mask`` (the classifier's text, on the tokenizer's padding
    side) with lists ``id``, ``prompt``, ``response``."""

    pad_token_id: int
    padding_side: Literal["left", "right"] = "right"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad([row["classifier_ids"] for row in rows], self.pad_token_id, self.padding_side)
        return {"input_ids": ids, "attention_mask": mask, "id": [str(row["id"]) for row in rows],
                "prompt": [row["prompt"] for row in rows], "response": [row["response"] for row in rows]}
