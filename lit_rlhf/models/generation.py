"""The generation side of the policy: ``generate``'s configuration for a rollout (the model's token rules, the run's
sampling settings), per-row length limits and forced eos for a batched ``generate``, the notice naming the
model's own sampling settings that a rollout replaces, and the policy's sampling (``Policy.fit_prompts``,
``Policy.generate``, ``Policy.sample``): functions of the policy, which its methods call."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from lit_rlhf.models.decoding import SampledRollout, SpecialTokens, sample_with_cache
from lit_rlhf.settings import GenerationSettings

if TYPE_CHECKING:
    from lit_rlhf.models.policy import Policy

log = logging.getLogger(__name__)

GENERATION_FLAGS = ("do_sample", "temperature", "top_k", "top_p", "min_new_tokens", "max_new_tokens",
                    "no_repeat_ngram_size")
"""The fields of a ``generation_config`` that a ``model.generation`` setting of the same name replaces."""
TOKEN_FIELDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "forced_bos_token_id",
                "forced_eos_token_id")
"""The fields of a model's ``generation_config`` that PPO keeps: which tokens end, pad and start a response."""
OUTPUT_FIELDS = ("use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                 "return_dict_in_generate")
"""Fields of a ``generation_config`` about what ``generate`` returns or caches, not what it samples (newer
transformers write some of them into every saved model's file): never named in the sampling notice."""


class PerRowMaxLength(StoppingCriteria):
    """Stops each row of a batched ``generate`` at its own maximum number of new tokens."""

    def __init__(self, start_length: int, max_new_tokens: Tensor) -> None:
        self.start_length = start_length
        self.max_new_tokens = max_new_tokens  # [B]

    def __call__(self, input_ids: Tensor, scores: Tensor | None = None, **kwargs) -> Tensor:
        generated = input_ids.shape[1] - self.start_length
        return generated >= self.max_new_tokens.to(input_ids.device)  # [B] bool


class ForcedEOSAtRowLimit(LogitsProcessor):
    """A model's ``forced_eos_token_id`` at each row's own last step of a batched ``generate`` (transformers'
    ``ForcedEOSTokenLogitsProcessor`` knows only the batch's longest limit), as the cached loop forces it."""

    def __init__(self, start_length: int, max_new_tokens: Tensor, eos_token_id: int) -> None:
        self.start_length, self.max_new_tokens, self.eos_token_id = start_length, max_new_tokens, eos_token_id

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        last = (input_ids.shape[1] - self.start_length + 1) >= self.max_new_tokens.to(scores.device)  # [B]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos_token_id] = 0.0
        return torch.where(last[:, None], forced, scores)


def _ids(value: int | Sequence[int] | None) -> list[int]:
    """A generation config's token id field (an int, a list or None) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def special_tokens(generation_config: GenerationConfig | None, tokenizer, is_seq2seq: bool) -> SpecialTokens:
    """The token rules both rollout modes follow, from the model's own ``generation_config``: every eos id it
    lists (chat models end turns with ``<|eot_id|>``, ``<|im_end|>``, ... beside the tokenizer's eos, which is
    added when missing), the tokenizer's pad (the collator pads with it), ``forced_bos_token_id`` (seq2seq
    only, as ``generate`` forces it at the decoder's first step) and ``forced_eos_token_id``.

    Its sampling settings (temperature, top-p, repetition penalty, ...) are not kept: PPO samples with the
    run's ``model.generation`` settings, the same in both rollout modes (see :func:`model_sampling_settings`)."""
    config = generation_config if generation_config is not None else GenerationConfig()
    eos = list(dict.fromkeys(_ids(config.eos_token_id) + _ids(tokenizer.eos_token_id)))
    return SpecialTokens(
        eos=tuple(eos), pad=tokenizer.pad_token_id,
        forced_bos=config.forced_bos_token_id if is_seq2seq else None, forced_eos=config.forced_eos_token_id,
    )


def model_sampling_settings(generation_config: GenerationConfig | None) -> dict[str, object]:
    """The settings of a model's own ``generation_config`` that a rollout does not use: all it sets beyond
    transformers' defaults except the token fields (a chat model's ``temperature=0.7``, ``top_p=0.8``,
    ``repetition_penalty=1.05``)."""
    if generation_config is None:
        return {}
    return {k: v for k, v in generation_config.to_diff_dict().items()
            if k not in TOKEN_FIELDS + OUTPUT_FIELDS and not k.startswith("_") and k != "transformers_version"}


def replaced_sampling_notice(model_settings: dict[str, object], settings: GenerationSettings) -> str:
    """One line for the user: the model's own sampling settings, and the flags (with their values now) of those
    the rollout samples with instead."""
    own = ", ".join(f"{k}={v!r}" for k, v in model_settings.items())
    flags = [k for k in model_settings if k in GENERATION_FLAGS]
    instead = ", ".join(f"--model.generation.{k} {flag_text(getattr(settings, k))}" for k in flags)
    unused = [k for k in model_settings if k not in GENERATION_FLAGS]
    return (f"the model's generation_config samples with {own}; rollouts sample with the run's settings instead"
            + (f" ({instead})" if instead else "")
            + (f"; {', '.join(unused)}: no such setting here, not used" if unused else ""))


def flag_text(value: object) -> str:
    """A setting's value as it is written on the command line: ``true``, ``1.0``, ``[16, 48]``."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, tuple) else str(value)


def run_generation_config(
    settings: GenerationSettings, tokens: SpecialTokens, max_new_tokens: int, decoder_start_token_id: int | None,
) -> GenerationConfig:
    """``generate``'s configuration for one rollout: the model's token rules (``tokens``) with the run's
    sampling settings on top. ``forced_eos`` is left out: ``ForcedEOSAtRowLimit`` forces it at each row's
    own limit. Use it under :func:`only_generation_config`, so that transformers does not fill the fields
    left unset here from the model's own sampling settings."""
    return GenerationConfig(
        do_sample=settings.do_sample,
        top_k=settings.top_k if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None,
        temperature=settings.temperature if settings.do_sample else None,
        max_new_tokens=max_new_tokens,
        # Capped by the longest limit only: a row whose own limit is shorter simply stops there, and
        # must not lift the eos block for the other rows.
        min_new_tokens=min(settings.min_new_tokens, max_new_tokens),
        pad_token_id=tokens.pad,
        eos_token_id=list(tokens.eos) or None,
        decoder_start_token_id=decoder_start_token_id,
        forced_bos_token_id=tokens.forced_bos,
        use_cache=True,
        # NaN/inf logits would crash sampling; generate anyway and let the rollout's finiteness check skip
        # the step with a clear count instead
        remove_invalid_values=True,
        no_repeat_ngram_size=settings.no_repeat_ngram_size or None,
    )


@contextmanager
def only_generation_config(model: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Within, the model's ``generation_config`` is ``config``: ``generate`` fills every field its
    ``generation_config`` argument leaves unset from the model's own (a chat model's temperature 0.7 or
    repetition penalty 1.05), which PPO must not sample with; transformers' neutral defaults fill them instead."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = config
    try:
        yield
    finally:
        base.generation_config = saved


def fit_to_context(policy: Policy, query_ids: Tensor, query_mask: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """Make room for ``max_new_tokens`` in a causal model's context by dropping the *start* of too-long prompts.

    A safety net for prompts encoded without that room: the data module's prompts leave it already
    (``data.reserve_tokens``, cut in their content), so this never fires for them. The end of a prompt
    holds the instruction ("Summary:"), so the oldest tokens go, and with them any BOS, system prompt or chat
    header. Seq2seq models and prompts that fit are returned unchanged. The cut is said once per policy.
    query_ids, query_mask: [B, P] (left-padded) -> [B, P'].
    """
    limit = policy.max_positions()
    if limit is None or query_ids.shape[1] + max_new_tokens <= limit:
        return query_ids, query_mask
    keep = limit - max_new_tokens
    if keep < 1:
        raise ValueError(
            f"model.generation.max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
            f"{limit}-token context; lower model.generation.max_new_tokens"
        )
    if policy.first_notice("prompts cut"):
        log.warning(
            "Prompts longer than %d tokens are cut from the start (BOS, system prompt and chat header go) to fit "
            "the %d-token context with %d new tokens: encode them with data.reserve_tokens of at least %d "
            "(lit-rlhf sets it from model.generation.max_new_tokens), so they are cut in their content instead",
            keep, limit, max_new_tokens, max_new_tokens,
        )
    return query_ids[:, -keep:], query_mask[:, -keep:]


def note_model_sampling(policy: Policy, settings: GenerationSettings) -> None:
    """Once per policy, a warning naming the model's own sampling settings that ``settings`` replace."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if policy.model_sampling and policy.first_notice("model sampling"):
        if getattr(rank_zero_only, "rank", 0) == 0:  # one line for the run, not one per process
            log.warning("lit-rlhf: warning: %s", replaced_sampling_notice(policy.model_sampling, settings))


def eos_response_mask(tokens: SpecialTokens, response: Tensor, max_new_tokens: Tensor | None = None) -> Tensor:
    """1 for tokens up to and including the first eos (any of ``tokens``' eos ids), within each row's limit
    ``max_new_tokens`` [B] (None: no limit). response: [B, T] -> [B, T]."""
    is_eos = tokens.is_eos(response).long()
    # tokens before the first eos have no eos to their left (exclusive cumulative sum == 0)
    mask = ((is_eos.cumsum(1) - is_eos) == 0).long()
    if max_new_tokens is not None:
        positions = torch.arange(response.shape[1], device=response.device)
        mask = mask * (positions[None] < max_new_tokens[:, None]).long()
    return mask


@torch.no_grad()
def generate_batch(
    policy: Policy, input_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings,
    max_new_tokens: Tensor | None = None, generator: torch.Generator | None = None, synced_gpus: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one response per query with ``policy`` in a single batched ``generate`` call (KV cache, eval mode):
    the run's sampling ``settings`` on the model's token rules, each row stopped at its own limit (with the model's
    forced eos there).

    input_ids, attention_mask: [B, P] (right padding for seq2seq, left padding for causal);
    max_new_tokens: [B] per-sample limits (drawn from ``settings.max_new_tokens`` with ``generator`` if None);
    synced_gpus: keep decoding until every process is done (``generate``'s flag). Needed when the weights
    are sharded across processes (FSDP, DeepSpeed ZeRO-3): each decoding step's forward gathers weights
    with a collective, so a process that stopped early would leave the others waiting. None: transformers'
    own choice.
    Returns response_ids [B, T] (right-padded) and response_mask [B, T]: the tokens up to and including
    the first end-of-sequence, within each sample's own limit.
    """
    note_model_sampling(policy, settings)
    if max_new_tokens is None:
        low, high = settings.max_new_tokens
        max_new_tokens = torch.randint(low, high, (input_ids.shape[0],), generator=generator)
    max_new_tokens = max_new_tokens.to(input_ids.device)
    tokens = policy.special_tokens
    config = run_generation_config(settings, tokens, int(max_new_tokens.max()),
                                   getattr(policy.lm, "decoder_start_token_id", None))
    # seq2seq output starts with the decoder start token; causal output starts with the query.
    start = 1 if policy.is_seq2seq else input_ids.shape[1]
    stopping = StoppingCriteriaList([PerRowMaxLength(start, max_new_tokens)])
    processors = LogitsProcessorList(
        [ForcedEOSAtRowLimit(start, max_new_tokens, tokens.forced_eos)] if tokens.forced_eos is not None else [])
    with policy.mode(dropout=False), only_generation_config(policy.model, config):
        out = policy.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            stopping_criteria=stopping,
            logits_processor=processors,
            synced_gpus=synced_gpus,
        )
    response = out[:, start:]  # [B, T]
    return response, eos_response_mask(tokens, response, max_new_tokens)


@torch.no_grad()
def sample_rollout(
    policy: Policy, input_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings, max_new_tokens: Tensor,
    repeats: int = 1, uniforms: Tensor | None = None,
) -> SampledRollout:
    """Like :func:`generate_batch`, with lit_rlhf's cached loop: finished rows leave the batch, and the log-probs
    and values of the sampled tokens come back with them (``lit_rlhf.models.decoding``). Eval mode, KV cache.

    Where the loop cannot serve the model (``lit_rlhf.models.lm.cached_decode_blocker``: its own cache class,
    layers that are not attention), this falls back to exact mode (``Policy.sample_exact``), with one notice:
    ``generate``, then the teacher-forced scoring pass for the log-probs and values. ``uniforms``: each row's own
    random numbers [B, T] (see ``sample_with_cache``)."""
    note_model_sampling(policy, settings)
    blocker = policy.decode_blocker
    if blocker is not None:
        if policy.first_notice("exact rollout"):
            log.warning("model.fast_rollout: the cached decode loop cannot serve this model (%s); rollouts use "
                        "exact mode (generate, then a scoring pass; its samples depend on "
                        "model.generation.batch_size)", blocker)
        return policy.sample_exact(input_ids, attention_mask, settings, max_new_tokens, repeats)
    with policy.mode(dropout=False):
        return sample_with_cache(
            policy.model, policy.lm, policy.value_head if policy.has_value_head else None, input_ids, attention_mask,
            max_new_tokens, settings, policy.special_tokens, repeats=repeats, uniforms=uniforms,
            logprob_temperature=policy.logprob_temperature,
        )
