"""The one place where seq2seq and decoder-only language models differ, and token log-probability ops.

Callers see "query ids, response ids, response mask" for both kinds. :class:`Seq2SeqLM` and :class:`CausalLM`
implement the same small interface, used by the teacher-forced forward (``Policy``) and by the KV-cached
decode loop (``lit_rlhf.models.decoding``), so the two paths cannot disagree on positions or padding:

* seq2seq (T5): the query feeds the encoder (right-padded); the decoder starts from
  ``decoder_start_token_id``, which is not a response token. Decoder position ``t`` predicts response token
  ``t``; every generated token, including the first, is scored.
* causal (GPT-2, Llama): the query is left-padded and the response appended; position ``P - 1 + t`` (P the
  padded query length) predicts response token ``t``. Position ids come from the attention mask, as
  ``generate`` computes them, so left padding does not shift positions.

Shapes: B batch, P query tokens, T response tokens, V vocabulary, H hidden size; b rows still decoding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, chunk_elements: int = 2**24, with_entropy: bool = False, entropy_grad: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each chosen token: ``log softmax(logits)[label]``; with ``with_entropy`` also the
    entropy of each position's distribution, ``H = lse(z) - sum softmax(z) z``, from the same logsumexp
    (no gradient, a diagnostic, unless ``entropy_grad``: an entropy bonus in the loss, whose backward keeps each
    chunk's softmax).

    logits: [B, T, V], labels: [B, T] -> [B, T] (float32 for half-precision logits), or ([B, T], [B, T]).

    Computed as ``logit[label] - logsumexp(logits)``: unlike ``log_softmax``, autograd keeps no [B, T, V]
    copy for the backward pass (logsumexp saves only its [B, T] result), and the forward temporary is
    bounded by processing at most ``chunk_elements`` logits at a time.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    chosen = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    flat = logits.reshape(-1, logits.shape[-1])  # [B*T, V] (a view)
    parts = flat.split(max(1, chunk_elements // flat.shape[-1]))
    lse_parts = [torch.logsumexp(part, dim=-1) for part in parts]
    logprobs = chosen - torch.cat(lse_parts).view(chosen.shape)
    if not with_entropy:
        return logprobs
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = torch.cat([lse - (torch.exp(part - lse[:, None]) * part).sum(-1)
                             for part, lse in zip(parts, lse_parts)])
    return logprobs, entropy.view(chosen.shape)


def trim_batch(
    query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor, left_padded_query: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Drop padding columns that every row of this (mini-)batch has, so a forward pays only for what it needs.

    query: [B, P] -> [B, P'] (left or right side, as the query is padded); response: [B, T] -> [B, T']."""
    q_used = query_mask.any(0).nonzero()
    p0, p1 = (int(q_used.min()), int(q_used.max()) + 1) if len(q_used) else (0, 1)
    if left_padded_query:
        p1 = query_mask.shape[1]
    else:
        p0 = 0
    t1 = max(1, int(response_mask.sum(1).max()))
    return query_ids[:, p0:p1], query_mask[:, p0:p1], response_ids[:, :t1], response_mask[:, :t1]


ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text")
"""Model types whose position ids start after the pad id, so that they read ``pad_token_id + 1`` fewer tokens
than their ``max_position_embeddings``."""

UNKNOWN_LENGTH = 10**7
"""A tokenizer's ``model_max_length`` at or above this is no real limit: transformers reports an unknown one as
``int(1e30)``. Set above the million-token contexts that some tokenizers do state (Qwen2.5-1M: 1,010,000)."""


def position_limit(config: Any, tokenizer: Any = None) -> int | None:
    """The most tokens the model reads in one sequence, special tokens included: the smaller of its learnt
    positions (``n_positions``, else ``max_position_embeddings``; less ``pad_token_id + 1`` for
    :data:`ROBERTA_LIKE` models) and ``tokenizer``'s ``model_max_length`` when it is a real limit. For an
    encoder-decoder with learnt positions (BART) this is one limit for the input and one for the output.
    None: neither says (T5's relative positions, with no tokenizer limit)."""
    limits = []
    # T5-style relative positions read any length; a stray n_positions in an old T5 config.json is no limit
    if not getattr(config, "relative_attention_num_buckets", None):
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if positions is not None:
            roberta = getattr(config, "model_type", None) in ROBERTA_LIKE
            limits.append(positions - ((config.pad_token_id or 0) + 1 if roberta else 0))
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and stated < UNKNOWN_LENGTH:
        limits.append(stated)
    limits = [n for n in limits if n > 0]
    return min(limits) if limits else None


class InPlaceLayer(DynamicLayer):
    """One attention layer's KV cache written in place: a buffer of ``capacity`` positions is allocated at
    the first update and each decode step writes its key/value into the next slot, where ``DynamicLayer``
    concatenates (copying every cached key and value of every layer, every step). Rows that finish are
    dropped by copying the used part once (``batch_select_indices``). Keys/values handed to attention are
    views of the filled prefix: [b, heads, length, head_dim]."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0
        self.key_buffer: Tensor | None = None
        self.value_buffer: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.key_buffer is None:
            self.is_initialized, self.device = True, key_states.device
            capacity = max(self.capacity, key_states.shape[-2])
            self.key_buffer = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
            self.value_buffer = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"KV cache of {self.key_buffer.shape[-2]} positions cannot take position {end}")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        return self._expose()

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.key_buffer is None:
            return
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((len(indices), *old.shape[1:]))
            new[:, :, : self.length] = old[indices, :, : self.length]
            setattr(self, name, new)
        self._expose()

    def _expose(self) -> tuple[Tensor, Tensor]:
        # DynamicLayer's own methods (crop, reorder_cache, ...) read keys/values: the filled prefix's views
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
        return self.keys, self.values


class InPlaceCache(DynamicCache):
    """A ``DynamicCache`` whose layers are :class:`InPlaceLayer` buffers of ``capacity`` positions."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.layer_class_to_replicate = partial(InPlaceLayer, capacity)


@dataclass
class DecodeState:
    """A KV-cached decode in progress: the rows still running, and what their next step needs."""

    cache: Any
    step_input: Tensor  # [b, 1] (the whole query [b, P] before the first causal step)
    attention: Tensor  # [b, P] seq2seq (encoder mask), [b, P + t] causal
    context: Tensor  # seq2seq: encoder states [b, P, H]; causal: position ids of step_input [b, *]


@cache
def _cache_argument(model_class: type) -> str:
    """The name a model's ``forward`` takes its KV cache by: ``cache`` from transformers 5.2x (the old name
    still works there, with a deprecation warning every run), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: its wrapped model


def _decoder_stack(model: nn.Module) -> nn.Module | None:
    """The module whose output's first field is the last hidden state that the LM head reads (the last entry
    of ``output_hidden_states``): a seq2seq model's decoder; a causal LM's decoder where ``get_decoder`` names one
    (OPT's ``model.decoder``: its LM calls that, not ``model.model``), else its base model (``model.model``,
    ``model.transformer``; transformers 4.x's ``get_decoder`` gives None for GPT-2 and Llama). None: neither."""
    base = _unwrapped(model)
    if getattr(base.config, "is_encoder_decoder", False):
        return base.get_decoder()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not base:
        return decoder
    return None if base.base_model is base else base.base_model


def forward_with_last_hidden(
    model: nn.Module, positions: slice, with_hidden: bool, **inputs: Any
) -> tuple[Any, Tensor | None]:
    """``model(**inputs)`` and, with ``with_hidden``, the last layer's hidden states at ``positions`` [B, t, H]
    (the same tensor ``output_hidden_states=True`` returns last). A forward hook on the decoder stack takes them
    from its output, so no other layer's states are kept (``output_hidden_states`` keeps every layer's for the
    whole forward: at 7B, 64 rows x 512 tokens, ~6 GiB). The logits are computed as without the hook."""
    stack = _decoder_stack(model) if with_hidden else None
    if with_hidden and stack is None:  # no separate stack to watch: every layer's states, the last one kept
        out = model(**inputs, output_hidden_states=True)
        states = out.decoder_hidden_states if getattr(out, "decoder_hidden_states", None) else out.hidden_states
        return out, states[-1][:, positions]
    captured: list[Tensor] = []
    whole = positions == slice(None)  # the tensor itself: a slicing node would change how autograd sums its gradient
    handle = stack.register_forward_hook(
        lambda _, args, output: captured.append(output[0] if whole else output[0][:, positions])) \
        if stack is not None else None
    try:
        out = model(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None and not captured:
        raise RuntimeError(f"{type(_unwrapped(model)).__name__}'s forward did not call its decoder "
                           f"{type(stack).__name__}: its last hidden states are unknown")
    return out, captured[-1] if captured else None


def _cached_forward(model: nn.Module, state: DecodeState, with_hidden: bool, **inputs: Any) -> tuple[Any, Tensor | None]:
    """One forward that reads and extends ``state.cache`` (the cache object is updated in place and kept), and
    with ``with_hidden`` the last layer's hidden state of the newest position [b, H] (a copy: the prefill's
    states of the other positions are not kept)."""
    cache = {_cache_argument(type(_unwrapped(model))): state.cache}
    out, hidden = forward_with_last_hidden(model, slice(-1, None), with_hidden, **inputs, **cache, use_cache=True)
    return out, hidden[:, -1].clone() if hidden is not None else None


class Seq2SeqLM:
    """Encoder-decoder models (T5)."""

    is_seq2seq = True
    query_padding_side = "right"

    def __init__(self, config: Any, generation_config: Any = None) -> None:
        self.decoder_start_token_id = decoder_start_token_id(config, generation_config)

    def teacher_forced(
        self, model: nn.Module, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
        with_hidden: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits [B, T, V] and last hidden states [B, T, H] at the positions that predict each response token
        (None without ``with_hidden``)."""
        start = torch.full_like(response_ids[:, :1], self.decoder_start_token_id)
        # shift right: decoder input t is response token t - 1, so position t predicts response token t
        decoder_input_ids = torch.cat([start, response_ids[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(start), response_mask[:, :-1]], dim=1)
        out, hidden = forward_with_last_hidden(
            model, slice(None), with_hidden, input_ids=query_ids, attention_mask=query_mask,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_mask, use_cache=False,
        )
        return out.logits, hidden

    def start(
        self, model: nn.Module, query_ids: Tensor, query_mask: Tensor, repeats: int = 1, horizon: int = 0
    ) -> DecodeState:
        """``repeats`` rows per query (k samples per prompt), the encoder run once per query; the decoder's KV
        cache holds ``horizon`` steps in place (0: grows by concatenation)."""
        # the encoder runs once; every decode step attends to its states
        encoder_hidden = model.get_encoder()(input_ids=query_ids, attention_mask=query_mask).last_hidden_state
        if repeats > 1:
            encoder_hidden, query_mask = encoder_hidden.repeat_interleave(repeats, 0), query_mask.repeat_interleave(repeats, 0)
        step_input = torch.full((encoder_hidden.shape[0], 1), self.decoder_start_token_id, dtype=torch.long,
                                device=query_ids.device)
        cache = InPlaceCache(horizon) if horizon else DynamicCache()
        return DecodeState(EncoderDecoderCache(cache, DynamicCache()), step_input, query_mask, encoder_hidden)

    def step(self, model: nn.Module, state: DecodeState, with_hidden: bool = True) -> tuple[Tensor, Tensor | None]:
        """One decoder step for the running rows: logits [b, V] and last hidden state [b, H] of the newest position
        (None without ``with_hidden``: a policy without a value head needs none)."""
        out, hidden = _cached_forward(model, state, with_hidden, encoder_outputs=(state.context,),
                                      attention_mask=state.attention, decoder_input_ids=state.step_input)
        return out.logits[:, -1], hidden

    def advance(self, state: DecodeState, token: Tensor) -> None:
        state.step_input = token[:, None]

    def select(self, state: DecodeState, keep: Tensor) -> None:
        """Keep only the rows ``keep`` (indices into the running rows), cache included."""
        state.cache.batch_select_indices(keep)
        state.attention, state.context = state.attention[keep], state.context[keep]


class CausalLM:
    """Decoder-only models (GPT-2, Llama)."""

    is_seq2seq = False
    query_padding_side = "left"

    def __init__(self, config: Any, generation_config: Any = None) -> None:
        self.config = config

    def teacher_forced(
        self, model: nn.Module, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
        with_hidden: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits [B, T, V] and last hidden states [B, T, H] at the positions that predict each response token
        (None without ``with_hidden``)."""
        t = response_ids.shape[1]
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        # the last query position predicts response token 0; the last response position predicts nothing (sliced
        # from the end: a model that ignores logits_to_keep, OPT on transformers 4.x, returns every position)
        out, hidden = forward_with_last_hidden(
            model, slice(-t - 1, -1), with_hidden, input_ids=input_ids, attention_mask=attention_mask,
            position_ids=_positions(attention_mask), use_cache=False, logits_to_keep=t + 1,
        )
        return out.logits[:, -t - 1 : -1], hidden

    def start(
        self, model: nn.Module, query_ids: Tensor, query_mask: Tensor, repeats: int = 1, horizon: int = 0
    ) -> DecodeState:
        """``repeats`` rows per query (k samples per prompt); each row's first step reads its whole prompt. The
        KV cache holds the prompt and ``horizon`` steps in place (0: grows by concatenation)."""
        if repeats > 1:
            query_ids, query_mask = query_ids.repeat_interleave(repeats, 0), query_mask.repeat_interleave(repeats, 0)
        cache = InPlaceCache(query_ids.shape[1] + horizon) if horizon else DynamicCache()
        return DecodeState(cache, query_ids, query_mask, _positions(query_mask))

    def step(self, model: nn.Module, state: DecodeState, with_hidden: bool = True) -> tuple[Tensor, Tensor | None]:
        out, hidden = _cached_forward(model, state, with_hidden, input_ids=state.step_input,
                                      attention_mask=state.attention, position_ids=state.context, logits_to_keep=1)
        return out.logits[:, -1], hidden

    def advance(self, state: DecodeState, token: Tensor) -> None:
        state.step_input = token[:, None]
        state.attention = torch.cat([state.attention, state.attention.new_ones(state.attention.shape[0], 1)], dim=1)
        state.context = state.context[:, -1:] + 1

    def select(self, state: DecodeState, keep: Tensor) -> None:
        state.cache.batch_select_indices(keep)
        state.attention, state.context = state.attention[keep], state.context[keep]

    def max_positions(self) -> int | None:
        return position_limit(self.config)


def _positions(attention_mask: Tensor) -> Tensor:
    # positions as generate() computes them for left-padded queries
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


CACHED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
"""Layer types whose KV cache :class:`InPlaceLayer` holds exactly: attention layers (a sliding or chunked window
differs only in the mask, which the model computes from the positions; the cache keeps every position)."""


def cached_decode_blocker(model: nn.Module) -> str | None:
    """Why the cached decode loop cannot serve ``model`` (None when it can): a model whose ``generate`` does not
    use transformers' default cache (its own cache class), or one with layers that are not attention (state
    space, linear attention, convolution, shared KV), whose state an :class:`InPlaceCache` cannot hold."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    supports = getattr(base, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return f"{type(base).__name__} keeps its own kind of cache"
    try:
        layer_types = _layer_types(base.config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError) as err:
        return f"the layer types of {type(base).__name__} are unknown ({err})"
    other = sorted(set(layer_types) - set(CACHED_LAYER_TYPES))
    if other:
        return f"{type(base).__name__} has {', '.join(other)} layers, not only attention"
    return None


def _layer_types(config: Any) -> list[str]:
    """The decoder's layer types as transformers' default cache reads them (``full_attention``, ...). transformers
    4.x has no ``get_layer_types_and_kwargs``: there a config's ``layer_types`` (models with sliding windows list
    them), else attention in every layer; models of other layers keep their own cache, caught before this."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # transformers < 5
        return list(getattr(config, "layer_types", None) or ["full_attention"])
    return list(get_layer_types_and_kwargs(config)[0])


def decoder_start_token_id(config: Any, generation_config: Any = None) -> int:
    """The token a seq2seq decoder starts from, as ``generate`` picks it: the generation config's
    ``decoder_start_token_id``, else the model config's, else the ``bos_token_id`` (``generate``'s fallback,
    which models without a decoder start token in their config, such as mBART-style ones, rely on)."""
    for source in (generation_config, config):
        value = getattr(source, "decoder_start_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    for source in (generation_config, config):
        value = getattr(source, "bos_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    raise ValueError(f"The seq2seq model {type(config).__name__} declares neither a decoder_start_token_id nor a "
                     "bos_token_id: set one in its config.json or generation_config.json")


def lm_kind(config: Any, generation_config: Any = None) -> Seq2SeqLM | CausalLM:
    """The adapter for a Hugging Face model config (and its ``generation_config``, which may name the decoder
    start token where the config does not)."""
    kind = Seq2SeqLM if getattr(config, "is_encoder_decoder", False) else CausalLM
    return kind(config, generation_config)
