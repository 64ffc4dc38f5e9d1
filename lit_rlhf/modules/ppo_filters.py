"""The responses a PPO step's policy loss is over, and the scores its advantages start from (``model.ppo``'s
``overlong`` and ``drop_zero_std_groups``; the math in ``objectives.response_filters``).

    overlong=penalty        DAPO's soft overlong punishment added to the scaled score of every response
    overlong=mask           truncated responses (at their limit without end-of-sequence) left out of the loss
    drop_zero_std_groups    the responses of groups whose scores (penalty included) are all equal left out

Left out means: the policy term is a mean over the kept responses only; no resampling makes up for them. With
the defaults nothing here runs (no statistic, no reduction): the step is today's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf import objectives
from lit_rlhf.models import ResponseBatch
from lit_rlhf.objectives import ReduceFn
from lit_rlhf.settings import PPOSettings


def filter_rollout(
    ppo: PPOSettings, scores: Tensor, rows: ResponseBatch, limits: Tensor, tokens, k: int, reduce_fn: ReduceFn,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """The scores [B] with the overlong penalty, the rows [B] bool the policy loss is over (None: every row) and
    their statistics over the global batch (``env/truncated_frac``, ``env/overlong_penalty_mean``,
    ``env/dropped_group_frac``). ``limits`` [B]: each response's length limit; ``tokens``: the policy's
    ``SpecialTokens`` (which tell a truncated response); ``k``: samples per prompt."""
    if ppo.overlong == "none" and not ppo.drop_zero_std_groups:
        return scores, None, {}
    mask = rows.response_mask
    zeros = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    truncated, dropped, penalty = zeros, zeros, torch.zeros_like(scores)
    if ppo.overlong != "none":
        truncated = tokens.truncated(rows.response_ids, mask, limits).to(scores.device)
    if ppo.overlong == "penalty":
        penalty = objectives.overlong_penalty(mask.sum(1), limits, ppo.overlong_buffer).to(scores)
        scores = scores + penalty
    if ppo.drop_zero_std_groups:
        dropped = objectives.zero_std_rows(scores, k)
    keep = ~dropped & ~truncated if ppo.overlong == "mask" else ~dropped
    keep = keep if ppo.overlong == "mask" or ppo.drop_zero_std_groups else None  # (penalty alone: every row)
    sums = reduce_fn(torch.stack([t.double().sum() for t in (truncated, penalty, dropped)]
                                 + [torch.tensor(float(len(scores)), dtype=torch.float64, device=scores.device)]))
    n = sums[3].clamp(min=1.0)
    names = ("env/truncated_frac", "env/overlong_penalty_mean", "env/dropped_group_frac")
    wanted = (ppo.overlong != "none", ppo.overlong == "penalty", ppo.drop_zero_std_groups)
    stats = {name: (total / n).float() for name, total, on in zip(names, sums, wanted) if on}
    return scores, keep, stats


def episode_stats(episodes: list | None, response_mask: Tensor, reduce_fn: ReduceFn) -> dict[str, Tensor]:
    """model.environment's episodes over the global batch: ``env/turns_mean`` (model turns), ``env/context_full_frac``
    (ended where the context was full) and ``env/conversation_len_mean`` (tokens after the first prompt, the
    environment's included); {} without episodes."""
    if episodes is None:
        return {}
    device = response_mask.device
    sums = reduce_fn(torch.tensor([sum(e.turns for e in episodes), sum(e.truncated for e in episodes),
                                   float(response_mask.sum()), len(episodes)], dtype=torch.float64, device=device))
    n = sums[3].clamp(min=1.0)
    return {"env/turns_mean": (sums[0] / n).float(), "env/context_full_frac": (sums[1] / n).float(),
            "env/conversation_len_mean": (sums[2] / n).float()}
