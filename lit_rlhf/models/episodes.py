"""Multi-turn episodes of a decoder-only chat model with an environment (``model.environment``).

Each turn samples the still-running episodes in one batched call, each re-reading its whole conversation (the
exact path: no KV cache is carried across turns), then asks the environment for the messages to append. Their
tokens are the chat template's text for them: what the template renders for the conversation with the new
messages and the generation prompt, after what it renders without them, tokenized and appended after the
model's own tokens, which are kept as sampled (never re-tokenized). Where the template closes the model's turn
with text the model did not emit (a newline after its end-of-turn token, or the whole end of a turn cut by its
length limit), that text goes first, as the environment's. An episode ends when the environment returns no
message, after ``max_turns`` model turns, or when the environment's messages and one more model token would
not fit the model's context (those messages are then not appended).

The conversation after the first prompt is the episode's response: ``own`` marks the model's tokens (1), the
environment's are 0 (in the sequence, out of the loss and the KL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

Message = dict[str, Any]
Generate = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(query ids, query mask [b, P] left-padded, length limits [b]) -> response ids, response mask [b, T]."""


class EnvironmentLike(Protocol):
    max_turns: int

    def reset(self, row: dict[str, Any]) -> list[Message]: ...

    def step(self, messages: list[Message], turn: str, row: dict[str, Any]) -> list[Message] | None: ...


@dataclass
class Episode:
    """One conversation: its data ``row``, ``messages`` so far, the first prompt's ids, the ids after it and
    which of them are the model's (``own``: 1 model, 0 environment)."""

    row: dict[str, Any]
    messages: list[Message]
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    own: list[int] = field(default_factory=list)
    turns: int = 0
    done: bool = False
    truncated: bool = False  # ended by the context limit


PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""The chat template of a tokenizer without one (a base model): each message ``<|role|>content`` on a line,
the generation prompt ``<|assistant|>``."""


def chat_text(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    """``messages`` rendered by the tokenizer's chat template (:data:`PLAIN_CHAT_TEMPLATE` without one)."""
    template = getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def encode(tokenizer: Any, text: str) -> list[int]:
    """A chat template's text as ids: it holds the special tokens the model expects, none are added."""
    return tokenizer(text, add_special_tokens=False).input_ids


def turn_end(tokenizer: Any) -> str:
    """The text the chat template puts after an assistant message's content (``<|im_end|>\\n``, ``\\n``)."""
    mark = "\u2063lit-rlhf-turn\u2063"
    text = chat_text(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}], False)
    return text.split(mark, 1)[1] if mark in text else ""


def appended_text(tokenizer: Any, messages: list[Message], new: list[Message]) -> str:
    """The template's text for ``new`` messages after ``messages``, with the generation prompt after them."""
    before = chat_text(tokenizer, messages, False)
    after = chat_text(tokenizer, messages + new, True)
    if not after.startswith(before):
        raise ValueError("model.environment: the chat template renders the earlier turns differently once messages "
                         "follow them (it rewrites past turns), so appended tokens would not continue the "
                         "conversation; use a template that only appends")
    return after[len(before):]


def closing_text(tokenizer: Any, end: str, turn_ids: list[int], eos: tuple[int, ...]) -> str:
    """What of the template's turn ending ``end`` the model's turn ``turn_ids`` lacks: ``end`` less the model's
    final end-of-turn token's text where ``end`` starts with it, else all of ``end``."""
    if turn_ids and turn_ids[-1] in eos:
        token = tokenizer.decode(turn_ids[-1:])
        if token and end.startswith(token):
            return end[len(token):]
    return end


def pad_rows(rows: list[list[int]], pad: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Token-id lists padded into ids and mask, LongTensor [B, max(1, longest)], on ``side`` (the one padding of
    the package: the data modules' collators use it too)."""
    width = max(1, max((len(r) for r in rows), default=0))
    ids, mask = torch.full((len(rows), width), pad, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def start_episodes(tokenizer: Any, environment: EnvironmentLike, rows: list[dict[str, Any]],
                   context: int | None) -> list[Episode]:
    """One episode per row: the environment's first messages, rendered with the generation prompt."""
    episodes = []
    for row in rows:
        messages = list(environment.reset(row))
        prompt = encode(tokenizer, chat_text(tokenizer, messages, True))
        if context is not None and len(prompt) >= context:
            raise ValueError(f"model.environment's first messages take {len(prompt)} tokens, the model's context "
                             f"{context}: no room for a turn")
        episodes.append(Episode(row, messages, prompt))
    return episodes


def run_episodes(
    tokenizer: Any, environment: EnvironmentLike, rows: list[dict[str, Any]], limits: Tensor, generate: Generate,
    eos: tuple[int, ...], pad: int, context: int | None, device: torch.device | str = "cpu",
) -> list[Episode]:
    """Run one episode per row to its end (see the module docstring). ``limits`` [B]: each episode's tokens per
    model turn; ``eos``: the model's end-of-turn ids; ``context``: its position limit (None: none)."""
    episodes = start_episodes(tokenizer, environment, rows, context)
    end = turn_end(tokenizer)
    for turn in range(environment.max_turns):
        active = [i for i, e in enumerate(episodes) if not e.done]
        if not active:
            break
        ids, mask = pad_rows([episodes[i].prompt_ids + episodes[i].ids for i in active], pad)
        room = torch.tensor([context - len(episodes[i].prompt_ids) - len(episodes[i].ids) if context else 1 << 30
                             for i in active])
        turn_limits = torch.minimum(limits.cpu()[active], room)
        for rows_of_call in position_groups(room, turn_limits):
            columns = mask[rows_of_call].any(0)  # without the columns only other calls' rows fill
            response, response_mask = generate(ids[rows_of_call][:, columns].to(device),
                                               mask[rows_of_call][:, columns].to(device),
                                               turn_limits[rows_of_call].to(device))
            response, response_mask = response.cpu(), response_mask.cpu().bool()
            for j, i in enumerate(rows_of_call.tolist()):
                own = response[j][response_mask[j]].tolist()
                take_turn(episodes[active[i]], own, tokenizer, environment, end, eos, context,
                          last=turn == environment.max_turns - 1)
    return episodes


def position_groups(room: Tensor, turn_limits: Tensor) -> list[Tensor]:
    """The rows of one turn's generate calls: a batched call runs every row for the batch's longest limit, so a
    row with less room than that would run past the model's positions. Every row with room for the longest
    limit goes in one call (all of them, but for a conversation near the context's end); the others in one call
    per limit (a row's limit is at most its room). Row indices into ``room``, each group in ascending order."""
    longest = int(turn_limits.max())
    fits = room >= longest
    groups = [fits.nonzero().flatten()] if bool(fits.any()) else []
    for limit in sorted(set(turn_limits[~fits].tolist())):
        groups.append(((turn_limits == limit) & ~fits).nonzero().flatten())
    return groups


def take_turn(episode: Episode, own: list[int], tokenizer: Any, environment: EnvironmentLike, end: str,
              eos: tuple[int, ...], context: int | None, last: bool) -> None:
    """Record the model's turn ``own`` (its ids) and append the environment's answer, or end the episode."""
    text = tokenizer.decode(own, skip_special_tokens=True)
    episode.ids += own
    episode.own += [1] * len(own)
    episode.messages.append({"role": "assistant", "content": text})
    episode.turns += 1
    new = None if last else environment.step(list(episode.messages), text, episode.row)
    if not new:
        episode.done = True
        return
    new = list(new)
    appended = encode(tokenizer, closing_text(tokenizer, end, own, eos) + appended_text(tokenizer, episode.messages, new))
    if context is not None and len(episode.prompt_ids) + len(episode.ids) + len(appended) + 1 > context:
        episode.done = episode.truncated = True  # no room for them and a model token after
        return
    episode.ids += appended
    episode.own += [0] * len(appended)
    episode.messages.extend(new)


def episode_tensors(episodes: list[Episode], pad: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """query ids, query mask [B, P] (left-padded first prompts), response ids, response mask [B, T] (the whole
    conversation after them, right-padded) and the model's own tokens [B, T] (1 model, 0 environment or pad)."""
    query_ids, query_mask = pad_rows([e.prompt_ids for e in episodes], pad)
    response_ids, response_mask = pad_rows([e.ids for e in episodes], pad, side="right")
    own, _ = pad_rows([e.own for e in episodes], 0, side="right")
    return query_ids, query_mask, response_ids, response_mask, own
