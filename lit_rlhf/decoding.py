"""A KV-cached sampling loop that keeps what PPO needs and drops finished rows from the batch.

``transformers``' ``generate`` keeps every row in the batch until the longest one is done, and returns only
token ids, so PPO then re-runs the policy over the responses for their log-probabilities and values. This loop
samples exactly like ``generate`` (same warpers, same end-of-sequence rules, per-row length limits) but

* records, for each sampled token, its log-probability under the (temperature-1) policy and the value of the
  state it was sampled from, so the rollout needs no policy re-forward;
* removes a row from the batch (and from the KV cache) as soon as its response is complete: with per-sample
  lengths of 100-400 tokens, most of a batched decode is otherwise spent on rows that are already finished.

Shapes: B batch, P prompt tokens, T response tokens, V vocabulary, H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class SampledRollout:
    response_ids: Tensor  # [B, T], pad after each row's end
    response_mask: Tensor  # [B, T]
    logprobs: Tensor  # [B, T] log pi(token) at temperature 1, 0 outside the mask
    values: Tensor  # [B, T] V(state the token was sampled from), 0 outside the mask


def _warpers(do_sample: bool, top_k: int, top_p: float, temperature: float) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if do_sample and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if do_sample and top_k and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if do_sample and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@torch.no_grad()
def sample_with_cache(
    model: nn.Module,
    value_head: Callable[[Tensor], Tensor],
    is_seq2seq: bool,
    query_ids: Tensor,
    query_mask: Tensor,
    max_new_tokens: Tensor,
    min_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    decoder_start_token_id: int | None = None,
    do_sample: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
) -> SampledRollout:
    """Sample one response per query; rows leave the batch when they emit eos or reach their own limit.

    query_ids, query_mask: [B, P] (right padding for seq2seq, left padding for causal); max_new_tokens: [B].
    The model must be in eval mode. Sampling draws from torch's global RNG, one multinomial call per step.
    """
    device = query_ids.device
    batch = query_ids.shape[0]
    limits = max_new_tokens.to(device)
    horizon = int(limits.max())
    response = torch.full((batch, horizon), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, horizon, device=device)
    values = torch.zeros(batch, horizon, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    warpers = _warpers(do_sample, top_k, top_p, temperature)

    rows = torch.arange(batch, device=device)  # original index of each row still in the batch
    if is_seq2seq:
        encoder_hidden = model.get_encoder()(input_ids=query_ids, attention_mask=query_mask).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        step_input = torch.full((batch, 1), decoder_start_token_id, dtype=torch.long, device=device)
        attention = query_mask
    else:
        cache = DynamicCache()
        attention = query_mask
        positions = (query_mask.cumsum(1) - 1).clamp(min=0)
        step_input = query_ids

    for t in range(horizon):
        # 1) one decoder step for the rows still running: logits and last hidden state of the newest position
        if is_seq2seq:
            out = model(encoder_outputs=(encoder_hidden,), attention_mask=attention, decoder_input_ids=step_input,
                        past_key_values=cache, use_cache=True, output_hidden_states=True)
            hidden = out.decoder_hidden_states[-1][:, -1]  # [b, H]
        else:
            out = model(input_ids=step_input, attention_mask=attention, position_ids=positions,
                        past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
            hidden = out.hidden_states[-1][:, -1]
        cache = out.past_key_values
        logits = out.logits[:, -1].float()  # [b, V]

        # 2) sample as generate() does: eos blocked before min_new_tokens, then the warpers
        scores = logits.clone()
        if eos_token_id is not None and t < min_new_tokens:
            scores[:, eos_token_id] = float("-inf")
        scores = warpers(None, scores)
        if do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # [b]
        else:
            token = scores.argmax(-1)
        # PPO's log-probability is that of the temperature-1 policy, as the scoring forward computes it
        token_logprob = torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1)

        response[rows, t] = token
        logprobs[rows, t] = token_logprob
        values[rows, t] = value_head(hidden[:, None]).squeeze(1).float()
        lengths[rows] = t + 1

        # 3) drop rows whose response is complete (eos, or their own limit)
        done = torch.zeros_like(token, dtype=torch.bool) if eos_token_id is None else token == eos_token_id
        done |= (t + 1) >= limits[rows]
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, token, attention = rows[keep], token[keep], attention[keep]
            if is_seq2seq:
                encoder_hidden = encoder_hidden[keep]
            else:
                positions = positions[keep]
        step_input = token[:, None]
        if not is_seq2seq:
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1

    width = max(1, int(lengths.max()))
    mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
    return SampledRollout(response[:, :width], mask, logprobs[:, :width] * mask, values[:, :width] * mask)
