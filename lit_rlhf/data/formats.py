"""How a row becomes a prompt: its format, the prompt's fit to its token limits, and the encoding.

    PromptFormat           how a row becomes a prompt (column, template, messages, chat template, labels, limits)
    fit_prompt             a prompt over its token limit, cut in its content (never its frame) or marked too long
    encode_prompts         rows -> prompt text, its token ids, the query decoded from them (datasets.map)
    tokenize_completions   supervised labels: each completion's ids, end-of-turn last
    with_string_ids        rows with an ``id`` column of strings (row numbers where absent)
    check_prompt_settings  the ``data.*`` settings of ``PromptDataModule`` that cannot work
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Literal

from transformers import PreTrainedTokenizerBase

from lit_rlhf.models import position_limit

ChatTemplate = bool | Literal["auto"]
Truncation = Literal["content", "drop"]

DERIVED_COLUMNS = ("prompt", "input_ids", "query", "summary_ids", "completion", "prompt_fit")
"""Columns the module adds to each row (never carried to rewards as source columns)."""


# ---------------------------------------------------------------------------------------------- formatting


@dataclass(frozen=True)
class PromptFormat:
    """How a row becomes a prompt, resolved from the data module's settings (see ``PromptDataModule``)."""

    prompt_column: str | None = None
    template: str | None = None
    messages_column: str | None = None
    chat: bool = False
    """Apply the tokenizer's chat template (with the generation prompt)."""
    system_prompt: str | None = None
    max_prompt_tokens: int | None = None
    completion_column: str | None = None
    with_labels: bool = False
    max_completion_tokens: int | None = None
    truncation: Truncation = "content"
    """What a prompt over its limit becomes: cut in its content (``fit_prompt``), or ``too_long`` (dropped)."""
    max_context_tokens: int | None = None
    """The model's context (``context_tokens``): a prompt's limit, less its response's tokens when ``decoder_only``."""
    decoder_only: bool = True
    response_tokens: int = 0
    """The response's tokens a decoder-only prompt leaves room for when its row has no completion of its own
    (rollout prompts: the longest response generated), so the rollout never cuts the prompt's start."""

    def needed_columns(self) -> list[str]:
        """The source columns this format reads."""
        if self.messages_column is not None:
            names = [self.messages_column]
        elif self.template is not None:
            names = template_fields(self.template)
        else:
            names = [self.prompt_column]
        if self.with_labels and self.completion_column is not None:
            names.append(self.completion_column)
        return list(dict.fromkeys(n for n in names if n is not None))


def template_fields(template: str) -> list[str]:
    """The column names a template's ``{placeholders}`` use, in order (``{{``/``}}`` are literal braces)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"data.template={template!r} is not a valid template ({err}); write literal braces as "
                         "{{ and }}") from err
    fields = [name for _, name, _, _ in parsed if name is not None]
    if any(not name or not name.isidentifier() for name in fields):
        raise ValueError(f"data.template={template!r}: placeholders must name a column, as in '{{dialogue}}'")
    return list(dict.fromkeys(fields))


def _plain_text(messages: list[dict[str, Any]]) -> str:
    """Messages without a chat template: their contents, one per line."""
    return "\n".join(str(m["content"]) for m in messages)


def rows_of(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A ``datasets`` batch (column -> values) as rows (column -> value)."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _split_completion(messages: list[dict[str, Any]], column: str) -> tuple[list[dict[str, Any]], str]:
    """(the prompt's messages, the last assistant turn's content): an SFT pair from a conversation."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"data.with_labels: a conversation in data.messages_column={column!r} does not end with an "
                         "assistant turn (the completion); give data.completion_column instead")
    return messages[:-1], str(messages[-1]["content"])


# ---------------------------------------------------------------------------------------------- fitting


PROMPT_FIT = "prompt_fit"
"""The derived column saying how each prompt met its token limit: ``whole``, ``cut`` (its content was cut) or
``too_long`` (over the limit and not cut: dropped by the data modules)."""


def context_tokens(config: Any, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most tokens the model reads in one sequence (``lm.position_limit``): a decoder-only model's limit,
    shared by prompt and response; an encoder-decoder model's learnt positions (BART-style, one limit for the
    prompt and one for the response). None: no limit (T5's relative positions)."""
    # An encoder-decoder's tokenizer limit is left out: T5 tokenizers state a 512 that their relative positions
    # do not have (transformers warns that it is wrong), and prompts beyond it work
    return position_limit(config, None if config.is_encoder_decoder else tokenizer)


def end_of_turn(tokenizer: PreTrainedTokenizerBase, chat: bool) -> int | None:
    """The token that ends a response: for a chat template, the special token it appends after an assistant
    message (Gemma's ``<end_of_turn>``, Llama-3's ``<|eot_id|>``, Qwen's ``<|im_end|>``), else the tokenizer's
    eos. Rendering an assistant turn and reading what follows its content finds it, whatever the template."""
    eos = tokenizer.eos_token_id
    if not chat:
        return eos
    mark = "\u2063lit-rlhf-response\u2063"  # text no conversation holds
    try:
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # a template that renders no assistant turn alone: the tokenizer's eos
        return eos
    if mark not in text:
        return eos
    after = tokenizer(text.split(mark, 1)[1], add_special_tokens=False).input_ids
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if after and (after[0] in tokenizer.all_special_ids or getattr(added.get(after[0]), "special", False)):
        return after[0]
    return eos  # the turn ends in plain text (a newline): the model stops at eos


def _shrink(text: str, fill: Callable[[str], list[int]], overflow: int, limit: int, keep_end: bool,
            tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """The ids of ``fill(text cut)`` with as much of ``text`` as fits in ``limit`` tokens, its first tokens (or,
    ``keep_end``, its last), None if not even an empty ``text`` fits. ``overflow``: how far ``fill(text)`` is over.
    Re-encoding cut text can merge tokens differently at the cut, so each try is checked."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = len(ids) - overflow
    while keep >= 0:
        kept = (ids[len(ids) - keep:] if keep else []) if keep_end else ids[:keep]
        prompt = fill(tokenizer.decode(kept, clean_up_tokenization_spaces=False))
        if len(prompt) <= limit:
            return prompt
        keep -= len(prompt) - limit
    return None


def fit_prompt(
    conversation: list[dict[str, Any]], encode: Callable[[list[dict[str, Any]]], list[int]], limit: int | None,
    truncation: Truncation, tokenizer: PreTrainedTokenizerBase, template: str | None = None,
    row: dict[str, Any] | None = None, ids: list[int] | None = None,
) -> tuple[list[int], str]:
    """A prompt's ids within ``limit`` tokens, cut in its content, never in its frame, and how (``PROMPT_FIT``).

    ``encode`` renders a conversation (system prompt, chat template and generation prompt, or plain text) to ids;
    ``ids``: the whole conversation's, when already encoded. With ``truncation="content"``: first the oldest turns
    before the last user message go (whole user-led turns, so roles still alternate; system messages stay), then
    the last user message is cut: a ``template`` prompt in its longest field (the ``row`` value, e.g. the
    dialogue) from that field's end, any other message from its start (the end of a message holds the
    question). The instruction, the system prompt and the generation prompt survive whole. ``"drop"``, or a
    frame that alone is over ``limit``: ``too_long``, uncut.
    """
    ids = encode(conversation) if ids is None else ids
    if limit is None or len(ids) <= limit:
        return ids, "whole"
    if truncation == "drop":
        return ids, "too_long"
    users = [i for i, m in enumerate(conversation) if m.get("role") == "user"]
    last = users[-1] if users else len(conversation) - 1

    def keeping(start: int) -> list[dict[str, Any]]:  # the turns from ``start`` on, and every system message
        return [m for i, m in enumerate(conversation) if i >= start or m.get("role") == "system"]

    shortest = ids
    for start in users:  # 1) the oldest turns, whole user-led turns at a time
        if start > 0 and any(m.get("role") != "system" for m in conversation[:start]):
            shortest = encode(keeping(start))
            if len(shortest) <= limit:
                return shortest, "cut"
    head = [m for m in conversation[:last] if m.get("role") == "system"]  # 2) the last user message
    message, tail = conversation[last], conversation[last + 1:]
    if template is not None and row is not None:
        field = max(template_fields(template), key=lambda name: len(str(row[name])), default=None)
        if field is None:  # a template without a field is all frame: nothing in it may be cut
            return ids, "too_long"
        text, keep_end = str(row[field]), False

        def fill(cut: str) -> list[int]:
            return encode(head + [{**message, "content": template.format_map({**row, field: cut})}] + tail)
    else:
        text, keep_end = str(message["content"]), True

        def fill(cut: str) -> list[int]:
            return encode(head + [{**message, "content": cut}] + tail)
    cut = _shrink(text, fill, len(shortest) - limit, limit, keep_end, tokenizer)
    return (ids, "too_long") if cut is None else (cut, "cut")


def prompt_limit(fmt: PromptFormat, reserved: int = 0) -> int | None:
    """A prompt's token budget: ``max_prompt_tokens``, and the model's context less the ``reserved`` tokens of
    its response where they share it (decoder-only models). None: no limit."""
    limits = [fmt.max_prompt_tokens]
    if fmt.max_context_tokens is not None:
        limits.append(fmt.max_context_tokens - (reserved if fmt.decoder_only else 0))
    return min((n for n in limits if n is not None), default=None)


def encode_prompts(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, reserved: list[int] | None = None,
) -> dict[str, list]:
    """The prompt text, its token ids within ``prompt_limit`` (cut by ``fit_prompt``: in the content, never in
    the frame), how it fit (``prompt_fit``) and the query decoded from the ids; with labels, the completion's ids
    ending in the end-of-turn token (``summary_ids``) and its text. ``reserved``: each row's response tokens in
    a decoder-only model's context (preference pairs); with labels, the completion's own length; otherwise
    ``fmt.response_tokens`` (the longest response the rollout generates)."""
    rows = rows_of(batch)
    labelled = fmt.with_labels and fmt.completion_column is not None
    completions = [str(row[fmt.completion_column]) for row in rows] if labelled else None
    template_rows = fmt.messages_column is None and fmt.template is not None
    if fmt.messages_column is not None:
        conversations = [list(row[fmt.messages_column]) for row in rows]
        if fmt.with_labels and completions is None:
            pairs = [_split_completion(c, fmt.messages_column) for c in conversations]
            conversations, completions = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        texts = [fmt.template.format_map(row) if fmt.template is not None else str(row[fmt.prompt_column])
                 for row in rows]
        conversations = [[{"role": "user", "content": t}] for t in texts]
    system = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []

    def render(conversation: list[dict[str, Any]]) -> str:
        if fmt.chat:
            return tokenizer.apply_chat_template(system + conversation, add_generation_prompt=True, tokenize=False)
        return _plain_text(system + conversation)

    def encode(conversation: list[dict[str, Any]]) -> list[int]:
        # a chat template already holds the special tokens the model expects
        return tokenizer(render(conversation), add_special_tokens=not fmt.chat).input_ids

    out: dict[str, list] = {"prompt": [render(c) for c in conversations]}
    whole = tokenizer(out["prompt"], add_special_tokens=not fmt.chat).input_ids  # one batched call
    if fmt.with_labels:
        # an encoder-decoder model's decoder has its own positions; a decoder-only model's context is shared, and
        # a completion that fills it leaves the prompt no room (the row is then too long)
        limit = min((n for n in (fmt.max_completion_tokens, fmt.max_context_tokens) if n is not None), default=None)
        out["summary_ids"] = tokenize_completions(completions, tokenizer, limit, end_of_turn(tokenizer, fmt.chat))
        out["completion"] = completions
        reserved = [len(ids) for ids in out["summary_ids"]]
    fitted = [fit_prompt(c, encode, prompt_limit(fmt, reserved[i] if reserved else fmt.response_tokens),
                         fmt.truncation, tokenizer, fmt.template if template_rows else None, row, whole[i])
              for i, (c, row) in enumerate(zip(conversations, rows))]
    out["input_ids"] = [ids for ids, _ in fitted]
    out[PROMPT_FIT] = [how for _, how in fitted]
    # As in the recipe, the query is the decoded prompt ids (special tokens such as T5's </s> included): the
    # prompt as the model sees it, after any cut and the tokenizer's normalisation.
    out["query"] = tokenizer.batch_decode(out["input_ids"])
    return out


def tokenize_completions(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int | None, end_id: int | None = None,
) -> list[list[int]]:
    """The responses the model should produce (supervised labels), each cut to ``max_tokens`` with ``end_id``
    last (the end-of-turn token, ``end_of_turn``; None: the tokenizer's eos)."""
    end = tokenizer.eos_token_id if end_id is None else end_id
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    if max_tokens is not None:
        ids = [row[: max_tokens - 1] for row in ids]
    return [row + [end] for row in ids]


def with_string_ids(rows: datasets.Dataset) -> datasets.Dataset:
    """``rows`` with an ``id`` column of strings: each row's own id, or its row number where it has none."""
    if "id" not in rows.column_names:
        rows = rows.add_column("id", [None] * len(rows))
    return rows.map(lambda r, i: {"id": str(i) if r["id"] is None else str(r["id"])}, with_indices=True)


# ---------------------------------------------------------------------------------------------- settings


def check_prompt_settings(s: dict[str, Any]) -> None:
    """Raise a ValueError naming the ``data.*`` setting that cannot work (``s``: the data module's arguments)."""
    if s["messages_column"] is not None and s["template"] is not None:
        raise ValueError("data.messages_column and data.template both say where prompts come from; give one")
    if s["messages_column"] is None and s["template"] is None and s["prompt_column"] is None:
        raise ValueError("no prompts: give data.prompt_column, data.template or data.messages_column")
    if s["template"] is not None:
        template_fields(s["template"])
    if s["chat_template"] not in (True, False, "auto"):
        raise ValueError(f"data.chat_template must be auto, true or false, got {s['chat_template']!r}")
    if s["with_labels"] and s["completion_column"] is None and s["messages_column"] is None:
        raise ValueError("data.with_labels needs the responses to learn: give data.completion_column, or "
                         "data.messages_column (its last assistant turn)")
    if s["min_chars"] < 0 or (s["max_chars"] is not None and s["max_chars"] <= s["min_chars"]):
        raise ValueError(f"data.min_chars={s['min_chars']}, data.max_chars={s['max_chars']}: need 0 <= min_chars < "
                         "max_chars (rows with min_chars < length <= max_chars are kept)")
    if s["max_prompt_tokens"] is not None and s["max_prompt_tokens"] < 1:
        raise ValueError(f"data.max_prompt_tokens must be None or a positive number of tokens, got {s['max_prompt_tokens']}")
    if s["reserve_tokens"] < 0:
        raise ValueError(f"data.reserve_tokens must be 0 or more, got {s['reserve_tokens']}")
    if s["truncation"] not in ("content", "drop"):
        raise ValueError(f"data.truncation must be content or drop, got {s['truncation']!r}")
    if s["eval_split"] is None and not 0.0 < s["test_size"] < 1.0:
        raise ValueError(f"data.test_size must be a fraction strictly between 0 and 1, got {s['test_size']}")
    for name in ("batch_size", "eval_batch_size"):
        if s[name] < 1:
            raise ValueError(f"data.{name} must be at least 1, got {s[name]}")
    if s["num_workers"] < 0:
        raise ValueError(f"data.num_workers must be 0 or more, got {s['num_workers']}")
    if s["max_completion_tokens"] is not None and s["max_completion_tokens"] < 2:
        raise ValueError("data.max_completion_tokens must be None or at least 2 (one token and eos), got "
                         f"{s['max_completion_tokens']}")
