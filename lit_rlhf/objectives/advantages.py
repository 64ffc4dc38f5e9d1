"""Advantages of one rollout batch by any estimator: GAE (a critic) or a critic-free one.

Legend: ``B`` samples in a rollout batch, ``T`` response tokens (``response_mask`` marks the real ones), ``k``
samples per prompt (rows of one prompt contiguous).
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

from lit_rlhf.objectives.critic_free import (
    broadcast_to_tokens, grpo_advantages, kl_shaped_scores, reinforce_pp_advantages, rloo_advantages,
)
from lit_rlhf.objectives.ppo import compute_gae, compute_rewards
from lit_rlhf.objectives.statistics import ReduceFn, identity, masked_whiten

AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
# Estimators that need no value head, and those that need k >= 2 samples per prompt for a baseline.
CRITIC_FREE_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo")


def compute_advantages(
    estimator: str, scores: Tensor, kl: Tensor, values: Tensor, response_mask: Tensor, kl_coef: float,
    samples_per_prompt: int = 1, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True,
    grpo_scale: bool = True, reduce_fn: ReduceFn = identity,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Advantages and returns of one rollout batch by any estimator, with the KL penalty in the reward.

    scores: [B] (rows of one prompt contiguous, ``samples_per_prompt`` = k of them); kl (per-token, 0 to keep
    the KL out of the reward), values (0 without a critic), response_mask: [B, T] -> (non_score_rewards,
    raw advantages, advantages, returns), [B, T] each:
      gae          : r_t = -beta KL_t (+ score on the last token) -> GAE -> whitened (``whiten``)
      reinforce_pp : the same rewards -> discounted returns, whitened over the global batch
      grpo, rloo   : one advantage per response from score - beta sum_t KL_t against its group, on every token
    """
    rewards, non_score = compute_rewards(scores, kl, response_mask, kl_coef)
    if estimator == "gae":
        raw, returns = compute_gae(rewards, values, response_mask, gamma, lam)
        return non_score, raw, masked_whiten(raw, response_mask, reduce_fn=reduce_fn) if whiten else raw, returns
    if estimator == "reinforce_pp":
        advantages, returns = reinforce_pp_advantages(rewards, response_mask, gamma, reduce_fn)
        return non_score, returns, advantages, returns
    shaped = kl_shaped_scores(scores, kl, response_mask, kl_coef)
    if estimator == "grpo":
        per_response = grpo_advantages(shaped, samples_per_prompt, scale=grpo_scale)
    elif estimator == "rloo":
        per_response = rloo_advantages(shaped, samples_per_prompt)
    else:
        raise ValueError(f"Unknown advantage_estimator {estimator!r}; choose one of {ADVANTAGE_ESTIMATORS}")
    advantages = broadcast_to_tokens(per_response, response_mask)
    return non_score, advantages, advantages, advantages
