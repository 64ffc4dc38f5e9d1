"""Prompts for PPO from any source: a column of text, a template over columns, or chat messages.

    PromptFormat         how a row becomes a prompt (column, template, messages, chat template, labels, limits)
    fit_prompt           a prompt over its token limit, cut in its content (never its frame) or marked too long
    encode_prompts       rows -> prompt text, its token ids, the query decoded from them (datasets.map)
    PromptCollator       rows -> a padded batch (tensors for the model, lists for rewards and logs)
    PromptStreamSampler  the seeded stream of training batches, resumable, one slice per process
    PromptDataModule     load, filter, format, split and batch; its stream position is its own state_dict

``lit_rlhf.data.DialogSumDataModule`` is this module with the DialogSum recipe's settings. Batches hold
``input_ids``/``attention_mask`` (LongTensor [B, P], right-padded for encoder-decoder models, left-padded for
decoder-only ones), lists ``query`` (the decoded prompt ids), ``prompt``, ``id``, ``reference`` (None when the
data has no references) and ``columns`` (every source column by name: what ``FunctionReward`` receives).
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from math import ceil
from typing import Any, Callable, Iterator, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from lit_rlhf.models import ensure_pad_token
from lit_rlhf.models import position_limit
from lit_rlhf.data.sources import (
    RowTexts, SkippedRows, drop_blank_rows, first_null, load_source, quiet_datasets_progress, read_data_files,
)
from lit_rlhf.settings import GenerationSettings, longest_response
from lit_rlhf.models import resolve_model_path

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


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
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
    rows = _rows(batch)
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


# ---------------------------------------------------------------------------------------------- batching


def with_string_ids(rows: datasets.Dataset) -> datasets.Dataset:
    """``rows`` with an ``id`` column of strings: each row's own id, or its row number where it has none."""
    if "id" not in rows.column_names:
        rows = rows.add_column("id", [None] * len(rows))
    return rows.map(lambda r, i: {"id": str(i) if r["id"] is None else str(r["id"])}, with_indices=True)


def _pad(rows: list[list[int]], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ids and mask, LongTensor [B, L], on the given side."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@dataclass(frozen=True)
class PromptCollator:
    """Pads a list of rows into a batch: tensors for the model, lists of strings for rewards and logs.

    ``padding_side`` comes from the model kind: ``"right"`` for encoder-decoder models (as T5 tokenizers pad;
    the encoder masks padding wherever it is), ``"left"`` for decoder-only models, so that generation
    continues right after each prompt's last token rather than after padding. ``reference_column``: the row
    value that becomes ``reference`` (None: the batch has no references). ``columns``: source columns carried
    under ``batch["columns"]`` for rewards. ``record_names``: the input and output names of a prediction record
    (``predict`` writes the row's ``record_names[0]`` and the response under ``record_names[1]``).
    """

    pad_token_id: int
    padding_side: Literal["left", "right"]
    reference_column: str | None = None
    columns: tuple[str, ...] = ()
    record_names: tuple[str, str] = ("prompt", "response")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = _pad([row["input_ids"] for row in rows], self.pad_token_id, self.padding_side)
        labels = {}
        if "summary_ids" in rows[0]:
            # supervised fine-tuning: the completion is the response, right-padded as generate returns it
            summary_ids, summary_mask = _pad([row["summary_ids"] for row in rows], self.pad_token_id, "right")
            labels = {"summary_ids": summary_ids, "summary_mask": summary_mask}
        source = self.record_names[0]
        return {
            **labels,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query": [row["query"] for row in rows],
            "reference": None if self.reference_column is None else [row.get(self.reference_column) for row in rows],
            source: [row.get(source) for row in rows],
            "id": [row["id"] for row in rows],
            "prompt": [row["prompt"] for row in rows],
            "columns": {name: [row.get(name) for row in rows] for name in self.columns},
            "record_names": self.record_names,
        }


class PromptStreamSampler(DistributedSampler):
    """This process's share of a seeded stream of training batches, starting where training left off.

    The stream is epoch after epoch of a permutation of the training rows (seed + epoch; no shuffle: file
    order). Stream batch ``k`` holds ``num_replicas x batch_size`` rows, and process ``rank`` takes its
    ``batch_size`` slice. Iteration starts at batch ``position_fn()`` (the batches training has taken), so a
    resumed run sees exactly the rows an uninterrupted one would, with any number of processes. ``lengths``
    (one per row): each epoch's stream batches hold rows of similar length (:func:`length_grouped`). A
    DistributedSampler subclass, so Lightning keeps it under DDP instead of swapping in its own.
    """

    def __init__(
        self, dataset_size: int, batch_size: int, num_replicas: int, rank: int, seed: int, shuffle: bool,
        position_fn: Callable[[], int], lengths: list[int] | None = None,
    ) -> None:
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.position_fn = position_fn
        self.lengths = lengths
        self.batches_per_epoch = dataset_size // (batch_size * num_replicas)

    def _start(self) -> tuple[int, int]:
        return divmod(self.position_fn(), self.batches_per_epoch)  # (stream epoch, batch within it)

    def epoch_order(self, epoch: int) -> list[int]:
        """Every row of stream epoch ``epoch`` in stream order (the rows of whole stream batches only)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        if self.lengths is None:
            return order
        return length_grouped(order, self.lengths, self.batch_size * self.num_replicas,
                              generator if self.shuffle else None)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self._start()
        order = self.epoch_order(epoch)
        per_step = self.batch_size * self.num_replicas
        for k in range(start, self.batches_per_epoch):
            first = k * per_step + self.rank * self.batch_size
            yield from order[first : first + self.batch_size]

    def __len__(self) -> int:
        # The whole epoch's share, also when iteration starts mid-epoch: a resumed Lightning loop restores its
        # count of the epoch's batches already done and goes on counting from there, and it takes the batch at
        # which that count reaches len(loader) as the epoch's last (where gradient accumulation is flushed into
        # an optimizer step, and epoch-end validation and schedulers run). The remaining batches only would end
        # a resumed epoch early.
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the stream position, not Lightning's epoch counter, picks the permutation."""


def length_grouped(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator | None,
                   chunk: int = 50) -> list[int]:
    """``order`` regrouped into batches of similar-length rows: cut into chunks of ``chunk`` batches, each chunk
    sorted by length and cut into batches, the batches then shuffled with ``generator`` (None: kept in order).
    Only the rows of whole batches are kept."""
    order = order[: len(order) // batch_size * batch_size]
    span = chunk * batch_size
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    if generator is not None:
        batches = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in batches for i in batch]


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


def _length_in_range(values: list[Any], min_chars: int, max_chars: int | None) -> list[bool]:
    return [min_chars < len(str(v)) <= (max_chars if max_chars is not None else float("inf")) for v in values]


def _fits(prompt_fit: list[str]) -> list[bool]:
    return [how != "too_long" for how in prompt_fit]


# ---------------------------------------------------------------------------------------------- the data module


class PromptDataModule(L.LightningDataModule):
    """Prompts for PPO rollouts (and SFT pairs) from any dataset: a text column, a template over columns, or
    chat messages, with optional references and every other column carried to the rewards.

    ``prepare_data`` loads, filters and tokenizes once (datasets caches each step on disk); ``setup`` reads
    the cached result on every process. The training loader is a seeded stream of full rollout batches whose
    position is this module's ``state_dict`` (a resumed run sees the prompts an uninterrupted one would), one
    slice per process under DDP. Validation and test read the held-out part in order.

    Args:
        model_name: Model whose tokenizer encodes the prompts: a hub name, a local folder saved with
            ``save_pretrained``, or an embedded model (``embedded:tiny-gpt2``). Its config says whether it is an
            encoder-decoder (right padding, never a chat template) or decoder-only model (left padding). Linked
            from ``model.model_name``.
        dataset: Where the rows come from: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (one split,
            ``train``), a directory of such files named by split (``train*``, ``validation*`` or ``dev*``,
            ``test*``), ``bundled:<name>`` (a copy shipped with lit_rlhf: ``bundled:dialogsum``), or a Hugging
            Face hub dataset name.
        split: Source split of the training prompts.
        eval_split: Source split of the held-out prompts (validation, test, the toxicity report). None: hold out
            ``test_size`` of ``split`` instead.
        prompt_column: Column holding each prompt's text (used when neither ``template`` nor
            ``messages_column`` is given).
        template: Prompt text with ``{column}`` placeholders filled from the row, e.g.
            ``"Summarize: {dialogue}"`` (any columns; ``{{``/``}}`` for literal braces).
        messages_column: Column holding a conversation, a list of ``{role, content}`` dicts; the prompt is the
            conversation rendered by the tokenizer's chat template (see ``chat_template``), or, without one, the
            contents one per line.
        chat_template: ``auto``: apply the tokenizer's chat template (with the generation prompt) when it has
            one and the model is decoder-only; ``true``: always (an error when the tokenizer has none or the
            model is an encoder-decoder); ``false``: never (plain text prompts).
        system_prompt: A system message put before each prompt (as a system turn with a chat template; as the
            first line without).
        reference_column: Column of reference texts (ROUGE in the report, reference-based rewards such as
            ``ReferenceSimilarityReward``). None: the data has no references.
        completion_column: With ``with_labels``: the column of responses to learn. None with
            ``messages_column``: each conversation's last assistant turn.
        filter_column: Keep only rows whose value in this column is ``min_chars < length <= max_chars``
            characters long. None: no length filter.
        min_chars: See ``filter_column``.
        max_chars: See ``filter_column``; None: no upper bound.
        max_prompt_tokens: The longest prompt, in tokens (see ``truncation``). None: no limit but the model's
            context (with labels, prompt and completion together must fit a decoder-only model's positions).
        truncation: What a prompt over its limit becomes. ``content`` (default): its content is cut, never its
            frame: the oldest turns of a conversation go first, then the template's longest field (the
            dialogue) loses its end, or a plain prompt or last user message its start; the template's
            instruction ("Summary:"), the system prompt and the chat template's generation prompt stay whole.
            ``drop``: the row is dropped. Either way ``summary()`` and the log count the rows cut and dropped.
        reserve_tokens: Tokens kept free for the longest response generated from a prompt (rollouts,
            validation, predict): a decoder-only model's prompts are fit to its context less this many tokens
            (cut in their content, see ``truncation``), so generation never has to cut their start (BOS, system
            prompt, chat header). lit-rlhf sets it from ``model.generation.max_new_tokens`` (its high - 1); the
            default is that of the default generation settings. Not used by encoder-decoder models (the decoder
            has its own positions) nor with ``with_labels`` (the completion's own length is reserved).
        test_size: With no ``eval_split``: the fraction of ``split`` held out (rounded up, as datasets'
            ``train_test_split``).
        split_seed: Seed of the held-out draw (with ``shuffle_split``).
        shuffle_split: Draw the held-out rows at random (seeded); False: the last ``test_size`` of the rows.
        batch_size: Prompts per training batch, i.e. the rollout batch of one PPO step (full batches only).
        eval_batch_size: Prompts per validation/test/predict batch.
        num_workers: DataLoader worker processes (0: load in the main process).
        shuffle: Shuffle the training prompts each pass over them.
        seed: Seed of the training-prompt shuffle.
        with_labels: Supervised fine-tuning: batches also hold ``summary_ids``/``summary_mask`` (the
            completion tokenized, eos last, right-padded); each pass over the training pairs is a new order.
            Without a ``reference_column`` the completion is the reference.
        max_completion_tokens: With ``with_labels``: cut completions to this many tokens (eos included).
        group_by_length: With ``with_labels``: batch prompts of similar length together.
        predict_path: Rows to answer in ``predict``: a .jsonl/.json(.gz), .csv or .parquet file or a folder of
            them, with the columns the prompt needs (``id`` optional: row numbers otherwise). No length filter.
    """

    record_names: tuple[str, str] = ("prompt", "response")
    """A prediction record's input and output field names."""

    def __init__(
        self,
        model_name: str = "embedded:tiny-gpt2",
        dataset: str = "prompts.jsonl",
        split: str = "train",
        eval_split: str | None = None,
        prompt_column: str | None = "prompt",
        template: str | None = None,
        messages_column: str | None = None,
        chat_template: ChatTemplate = "auto",
        system_prompt: str | None = None,
        reference_column: str | None = None,
        completion_column: str | None = None,
        filter_column: str | None = None,
        min_chars: int = 0,
        max_chars: int | None = None,
        max_prompt_tokens: int | None = None,
        truncation: Truncation = "content",
        reserve_tokens: int = longest_response(GenerationSettings.max_new_tokens),
        test_size: float = 0.2,
        split_seed: int = 42,
        shuffle_split: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        with_labels: bool = False,
        max_completion_tokens: int | None = None,
        group_by_length: bool = False,
        predict_path: str | None = None,
    ) -> None:
        super().__init__()
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_prompt_settings(settings)
        if type(self) is PromptDataModule:  # a preset saves its own arguments
            self.save_hyperparameters(logger=False)  # logged settings are the module's; config.yaml has these
        for name, value in settings.items():  # every argument is also an attribute of the same name
            setattr(self, name, value)
        self.consumed_batches = 0  # rollout batches training has taken from the prompt stream (state_dict)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.is_encoder_decoder: bool | None = None
        self.train_set: datasets.Dataset | None = None
        """Prompts for PPO rollouts."""
        self.test_set: datasets.Dataset | None = None
        """Held-out prompts, served by both ``val_dataloader`` and ``test_dataloader``."""
        self.predict_set: datasets.Dataset | None = None
        self.source_columns: tuple[str, ...] = ()
        """The source's columns (carried to rewards under ``batch["columns"]``), known after setup."""
        self._sizes: dict[str, int | str] = {}
        self._empty = SkippedRows()
        """Rows skipped for a null or empty prompt or response (``text_columns``)."""
        self.max_context_tokens: int | None = None
        """The model's context (``context_tokens``), known once the tokenizer is loaded."""
        self.model_config: Any = None
        """The model's config (its ``AutoConfig``), loaded with the tokenizer."""
        self.prompt_counts: Counter[str] = Counter(prompts_cut=0, prompts_dropped=0)
        """Prompts cut in their content and dropped as too long, by the last encoding (``summary()``)."""

    # -- loading ------------------------------------------------------------------------------------------

    def _load_tokenizer(self) -> None:
        if self.tokenizer is not None:
            return
        path = resolve_model_path(self.model_name)
        config = AutoConfig.from_pretrained(path)
        self.model_config = config
        self.is_encoder_decoder = bool(config.is_encoder_decoder)
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_context_tokens = context_tokens(config, tokenizer)
        ensure_pad_token(tokenizer, f"model.model_name={self.model_name!r}")
        self.tokenizer = tokenizer

    def _use_chat_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template (``chat_template`` resolved)."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.is_encoder_decoder:
            if self.chat_template is True:
                raise ValueError(f"data.chat_template=true: model.model_name={self.model_name!r} is an encoder-decoder "
                                 "model, which takes plain prompts; set data.chat_template to auto or false")
            return False
        if self.chat_template is True and not has_template:
            raise ValueError(f"data.chat_template=true: the tokenizer of model.model_name={self.model_name!r} has no "
                             "chat template; set data.chat_template to auto or false, or save a tokenizer with one")
        return has_template if self.chat_template == "auto" else bool(self.chat_template)

    def prompt_format(self) -> PromptFormat:
        """How rows become prompts, with the chat template resolved against the tokenizer (after loading it)."""
        self._load_tokenizer()
        return PromptFormat(
            prompt_column=self.prompt_column, template=self.template, messages_column=self.messages_column,
            chat=self._use_chat_template(), system_prompt=self.system_prompt, max_prompt_tokens=self.max_prompt_tokens,
            completion_column=self.completion_column, with_labels=self.with_labels,
            max_completion_tokens=self.max_completion_tokens, truncation=self.truncation,
            max_context_tokens=self.max_context_tokens, decoder_only=not self.is_encoder_decoder,
            response_tokens=self._response_tokens(),
        )

    def _response_tokens(self) -> int:
        """The tokens a prompt leaves free for its generated response: ``reserve_tokens`` for a decoder-only
        model's prompts without labels (an error when that leaves no room for a prompt), else none."""
        if self.is_encoder_decoder or self.with_labels:
            return 0
        if self.max_context_tokens is not None and self.reserve_tokens >= self.max_context_tokens:
            raise ValueError(
                f"data.reserve_tokens={self.reserve_tokens} (the longest response, from "
                f"model.generation.max_new_tokens) leaves no room for a prompt in the {self.max_context_tokens}-token "
                f"context of model.model_name={self.model_name!r}; lower model.generation.max_new_tokens"
            )
        return self.reserve_tokens

    def required_columns(self) -> list[str]:
        """The source columns the settings name (prompt, template fields, messages, reference, filter)."""
        names = [*self.prompt_format().needed_columns(), self.reference_column, self.filter_column]
        return list(dict.fromkeys(n for n in names if n is not None))

    def text_columns(self, predict: bool = False) -> RowTexts:
        """What every row must hold (``sources.RowTexts``): the prompt (a plain prompt column, a conversation, or
        a template whose fields are not null, though one may be empty) and in training the completion; a row that
        breaks it is skipped and counted (``summary()``), never trained on as the text "None"."""
        fmt = self.prompt_format()
        completion = [fmt.completion_column] if fmt.with_labels and fmt.completion_column and not predict else []
        if fmt.messages_column is not None:
            return RowTexts(texts=(fmt.messages_column, *completion))
        if fmt.template is not None:
            return RowTexts(texts=tuple(completion), template=fmt.template, fields=tuple(template_fields(fmt.template)))
        return RowTexts(texts=(fmt.prompt_column, *completion))

    def _drop_blank(self, rows: datasets.Dataset, where: str, predict: bool = False) -> datasets.Dataset:
        """``rows`` without those with a null or empty prompt or response, counted in ``self._empty`` and warned
        about once with the first one's id; the one check every data module and predict apply."""
        before = self._empty.count
        rule = self.text_columns(predict)
        kept = drop_blank_rows(rows, rule, self._empty, where)
        if self._empty.count > before:
            rank_zero_warn(f"{where}: skipped {self._empty.count - before} rows with "
                           f"{rule.within(rows.column_names).in_words()} (the first: row {self._empty.first_id!r})")
        return kept

    def _source_split(self, source: datasets.DatasetDict, split: str, setting: str) -> datasets.Dataset:
        if split not in source:
            raise ValueError(f"{setting}={split!r} is not in data.dataset={self.dataset!r}; it has {sorted(source)}")
        rows = source[split]
        if len(rows) == 0:
            raise ValueError(f"data.dataset={self.dataset!r} {setting}={split!r} has no rows")
        self._check_columns(rows.column_names, f"data.dataset={self.dataset!r} {setting}={split!r}")
        if "id" not in rows.column_names:
            rows = rows.add_column("id", [str(i) for i in range(len(rows))])
        return rows

    def _check_columns(self, columns: list[str], where: str) -> None:
        required = self.required_columns()
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"{where} lacks the column(s) {missing}: it has {columns}, and {required} are needed (named by "
                "data.prompt_column/template/messages_column/reference_column/completion_column/filter_column)"
            )

    @quiet_datasets_progress()
    def _filter(self, rows: datasets.Dataset, split: str) -> datasets.Dataset:
        if self.filter_column is None:
            return rows
        kept = rows.filter(_length_in_range, input_columns=self.filter_column, batched=True,
                           fn_kwargs={"min_chars": self.min_chars, "max_chars": self.max_chars})
        if len(kept) == 0:
            lengths = [len(str(v)) for v in rows[self.filter_column]] or [0]
            raise ValueError(
                f"data.min_chars={self.min_chars}, data.max_chars={self.max_chars} keep none of the {len(rows)} rows "
                f"of data.dataset={self.dataset!r} split={split!r}, whose {self.filter_column!r} lengths range from "
                f"{min(lengths)} to {max(lengths)} characters; widen data.min_chars/data.max_chars"
            )
        return kept

    @quiet_datasets_progress()
    def _encode(self, rows: datasets.Dataset) -> datasets.Dataset:
        encoded = rows.map(encode_prompts, batched=True,
                           fn_kwargs={"tokenizer": self.tokenizer, "fmt": self.prompt_format()})
        return self._drop_too_long(encoded)

    def _drop_too_long(self, encoded: datasets.Dataset) -> datasets.Dataset:
        """``encoded`` without the prompts over their limit (``truncation=drop``, or a frame that alone is too
        long); what was cut and dropped is added to ``prompt_counts``."""
        fit = Counter(encoded[PROMPT_FIT])
        self.prompt_counts.update({"prompts_cut": fit["cut"], "prompts_dropped": fit["too_long"]})
        return encoded.filter(_fits, input_columns=PROMPT_FIT, batched=True) if fit["too_long"] else encoded

    def _limits_in_words(self) -> str:
        """The prompt limits in force, as the settings name them."""
        reserve = self.prompt_format().response_tokens  # a preference module's format reserves per pair instead
        room = f" less data.reserve_tokens={reserve}" if reserve else ""
        context = (f"the model's {self.max_context_tokens}-token context{room}" if self.max_context_tokens is not None
                   else None)
        prompt = (f"data.max_prompt_tokens={self.max_prompt_tokens}" if self.max_prompt_tokens is not None else None)
        return " and ".join(x for x in (prompt, context) if x) or "no limit"

    def _log_prompt_counts(self, where: str) -> None:
        """One line: how many prompts of ``where`` were cut and dropped (nothing when none were)."""
        counts = self.prompt_counts
        if counts["prompts_cut"] or counts["prompts_dropped"]:
            rank_zero_info(f"{where} over {self._limits_in_words()}: "
                           f"{counts['prompts_cut']} cut in their content, {counts['prompts_dropped']} dropped "
                           f"(data.truncation={self.truncation})")

    def _build(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Filter, prompt, tokenize and split; every step is cached by datasets, so a second call reads it."""
        self._load_tokenizer()
        self._empty = SkippedRows()
        self.prompt_counts = Counter(prompts_cut=0, prompts_dropped=0)
        source = load_source(self.dataset)
        rows = self._source_split(source, self.split, "data.split")
        self.source_columns = tuple(c for c in rows.column_names if c not in DERIVED_COLUMNS)
        kept = self._filter(self._drop_blank(rows, f"data.dataset={self.dataset!r} split={self.split!r}"), self.split)
        if self.eval_split is not None:
            held_out = self._source_split(source, self.eval_split, "data.eval_split")
            where = f"data.dataset={self.dataset!r} eval_split={self.eval_split!r}"
            held_out = self._filter(self._drop_blank(held_out, where), self.eval_split)
            train, test = self._encode(kept), self._encode(held_out)
        else:
            n_test = ceil(self.test_size * len(kept))  # datasets' rounding: the held-out part rounds up
            if n_test >= len(kept):
                raise ValueError(
                    f"data.test_size={self.test_size} holds out {n_test} of the {len(kept)} filtered rows, leaving "
                    "none for training; lower data.test_size or keep more rows (data.min_chars/max_chars)"
                )
            parts = self._encode(kept).train_test_split(
                test_size=self.test_size, shuffle=self.shuffle_split, seed=self.split_seed)
            train, test = parts["train"], parts["test"]
        for name, part in (("training", train), ("held-out", test)):
            if len(part) == 0:
                raise ValueError(f"no {name} prompts are left: {self.prompt_counts['prompts_dropped']} were longer "
                                 f"than {self._limits_in_words()} (data.truncation={self.truncation}); raise "
                                 "data.max_prompt_tokens or set data.truncation=content")
        self._sizes = {"source": len(rows), "kept": len(kept), "train": len(train), "test": len(test),
                       **self.prompt_counts, **self._empty.summary()}
        return train, test

    # -- Lightning hooks ----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and tokenizes, leaving datasets' cache files for setup().
        self._build()

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._load_tokenizer()
            if self.predict_set is None:
                self.predict_set = self._predict_rows()
            return
        if self.train_set is None:
            self.train_set, self.test_set = self._build()
            self._log_prompt_counts(f"Prompts of data.dataset={self.dataset!r}")  # not in _build: prepare_data builds too

    def _predict_rows(self) -> datasets.Dataset:
        """``predict_path``'s rows, loaded and encoded by the subclass's hooks, in one way for every data module:
        blank rows skipped and prompts over their limit dropped, both counted and logged."""
        where = f"data.predict_path={self.predict_path!r}"
        rows = self._drop_blank(self._load_predict_rows(), where, predict=True)
        self.prompt_counts = Counter(prompts_cut=0, prompts_dropped=0)
        encoded = self._drop_too_long(self._encode_predict_rows(rows))
        self._log_prompt_counts(f"Rows of {where}")
        return encoded

    @quiet_datasets_progress()
    def _load_predict_rows(self) -> datasets.Dataset:
        """The rows of ``predict_path``, with string ids (row numbers where absent)."""
        rows = read_data_files(self.predict_path, "data.predict_path")
        needed = [c for c in self.prompt_format().needed_columns() if c != self.completion_column]
        missing = [c for c in needed if c not in rows.column_names]
        if missing:
            raise ValueError(f"data.predict_path={self.predict_path!r} lacks the column(s) {missing} the prompt "
                             f"needs (its columns: {rows.column_names})")
        return with_string_ids(rows)

    @quiet_datasets_progress()
    def _encode_predict_rows(self, rows: datasets.Dataset) -> datasets.Dataset:
        fmt = self.prompt_format()
        fmt = PromptFormat(**{**fmt.__dict__, "with_labels": False})  # predict has no labels to learn
        return rows.map(encode_prompts, batched=True, fn_kwargs={"tokenizer": self.tokenizer, "fmt": fmt})

    def _collator(self, columns: tuple[str, ...], labels: bool) -> PromptCollator:
        side = "right" if self.is_encoder_decoder else "left"
        reference = self.reference_column or ("completion" if labels else None)
        return PromptCollator(pad_token_id=self.tokenizer.pad_token_id, padding_side=side,
                              reference_column=reference, columns=columns, record_names=self.record_names)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            raise RuntimeError("call setup('predict') before asking for the predict data loader")
        columns = tuple(c for c in self.predict_set.column_names if c not in DERIVED_COLUMNS)
        return DataLoader(self.predict_set, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._collator(columns, labels=False), num_workers=self.num_workers)

    def held_out_description(self) -> str:
        """Where the held-out prompts come from, in words, for the toxicity report (ids are the source's)."""
        if self.eval_split is not None:
            return f"split {self.eval_split!r} of data.dataset={self.dataset!r}; ids are that split's"
        return (f"the {self.test_size:.0%} of split {self.split!r} of data.dataset={self.dataset!r} that data.test_size "
                f"holds out of PPO rollouts; ids are that split's")

    def reward_inputs(self, stage: str) -> tuple[list[str], bool, Callable[[str], str | None]]:
        """What a reward can read in ``stage`` (after ``setup``): the source columns, whether there are
        references, and a function giving the id of the first row with no value in a column (None: every row has
        one). ``PPOModule`` checks its reward against these before the first step."""
        if stage == "predict":
            columns = [c for c in self.predict_set.column_names if c not in DERIVED_COLUMNS]
            has_references = self.reference_column is not None and self.reference_column in columns
            return columns, has_references, lambda column: first_null(self.predict_set, column)

        def first_missing(column: str) -> str | None:
            return first_null(self.train_set, column) or first_null(self.test_set, column)

        return list(self.source_columns), self.reference_column is not None, first_missing

    def summary(self) -> dict[str, int | str]:
        """Row counts after ``setup``: ``source`` (the source split), ``kept`` (after the empty rows and the
        length filter), ``train`` and ``test`` (the two parts of the split), ``prompts_cut`` (cut in their content to
        their token limit) and ``prompts_dropped`` (over it and dropped: ``truncation=drop``, or a frame alone too
        long); when rows with a null or empty prompt
        or completion were skipped, ``skipped_empty`` (how many) and ``first_skipped_empty`` (the first one's id)."""
        if not self._sizes:
            raise RuntimeError("call setup() before summary()")
        return dict(self._sizes)

    @property
    def collator(self) -> PromptCollator:
        """The collator of the training and held-out batches."""
        if self.tokenizer is None or self.train_set is None:
            raise RuntimeError("call setup() before asking for data loaders")
        return self._collator(self.source_columns, labels=self.with_labels)

    def train_dataloader(self) -> DataLoader:
        """The seeded, resumable stream of training batches (:class:`PromptStreamSampler`): rollout prompts, or
        with ``with_labels`` (prompt, completion) pairs, a new order each pass over them."""
        collate = self.collator
        if len(self.train_set) < self.batch_size:
            # drop_last would leave no batch at all, and training would silently do nothing.
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} training prompts; "
                "lower data.batch_size or keep more rows (data.min_chars/max_chars, data.test_size)"
            )
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(self.train_set) < self.batch_size * world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} x {world_size} processes is more than the "
                f"{len(self.train_set)} training prompts; lower data.batch_size"
            )
        grouped = self.with_labels and self.group_by_length
        sampler = PromptStreamSampler(
            len(self.train_set), self.batch_size, num_replicas=world_size, rank=rank, seed=self.seed,
            shuffle=self.shuffle, position_fn=self._consumed_batches,
            lengths=[len(ids) for ids in self.train_set["input_ids"]] if grouped else None,
        )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate,
            num_workers=self.num_workers,
            # its own generator: creating an iterator otherwise draws from the global RNG, which would shift
            # the sampling of a resumed run away from that of an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _consumed_batches(self) -> int:
        """Training batches already used: counted as they are handed to ``training_step`` and
        restored from a checkpoint through this data module's own ``state_dict``."""
        return self.consumed_batches

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for each batch right before its step (after any prefetching), so the count is
        # of batches training really took, whatever the loader read ahead.
        if self.trainer is not None and self.trainer.training:
            self.consumed_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position in the prompt stream (Lightning stores it in checkpoints): a resumed run continues with
        the prompts an uninterrupted run would have seen."""
        return {"consumed_batches": self.consumed_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_batches = int(state_dict.get("consumed_batches", 0))

    def _held_out_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_set,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            # its own generator: each new iterator (every validation pass) would otherwise draw its base seed
            # from the global RNG and shift the training run's sampling
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._held_out_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._held_out_dataloader()
