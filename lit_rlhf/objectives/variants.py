"""Today's GRPO-style variants of the clipped policy term: asymmetric clipping (DAPO's clip-higher), a sequence-level
importance ratio (GSPO and GSPO-token) and CISPO's clipped, stop-gradient importance weight.

Legend: ``B`` samples of a (mini- or micro-)batch, ``T`` response tokens (``response_mask`` marks the real ones).
Every function returns per-token terms [B, T], combined by ``aggregate`` like the PPO loss (any of its three modes).

Sources:
    DAPO: Yu et al. 2025, arXiv:2503.14476 (clip-higher: eps_low < eps_high, eq. 10).
    GSPO: Zheng et al. 2025, arXiv:2507.18071 (sequence ratio s_i, eq. 7; GSPO-token, eq. 13).
    CISPO: MiniMax 2025, arXiv:2506.13585 (MiniMax-M1, eq. 4-5).
    Matched against TRL's GRPOTrainer ``_compute_loss`` (``importance_sampling_level`` "token"/"sequence",
    ``loss_type="cispo"``), trl/trainer/grpo_trainer.py, 1.x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from lit_rlhf.objectives.statistics import masked_mean

ImportanceSampling = Literal["token", "sequence", "sequence_token"]
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = get_args(ImportanceSampling)
PolicyLossType = Literal["ppo", "cispo"]
POLICY_LOSS_TYPES: tuple[str, ...] = get_args(PolicyLossType)


@dataclass(frozen=True)
class PolicyVariant:
    """Which policy term ``ppo_objective`` computes. The defaults are PPO's clipped surrogate with a per-token ratio
    clipped to [1 - eps, 1 + eps]: ``ppo_objective`` then does exactly today's float operations.

    clip_range_high: the ratio's upper bound is 1 + clip_range_high (None: the symmetric 1 + clip_range).
    importance_sampling: token (PPO), sequence (GSPO), sequence_token (GSPO-token); see :func:`importance_weights`.
    loss_type: ppo (clipped surrogate) or cispo (see :func:`cispo_per_token`).
    entropy_coef: the per-token policy term loses ``entropy_coef * H_t`` (an entropy bonus), H_t the entropy of
    the policy's next-token distribution with its gradient."""

    clip_range_high: float | None = None
    importance_sampling: ImportanceSampling = "token"
    loss_type: PolicyLossType = "ppo"
    entropy_coef: float = 0.0

    @property
    def plain_ratio(self) -> bool:
        """PPO's symmetric token-level clipped surrogate (no variant of the ratio or of the loss)."""
        return self.clip_range_high is None and self.importance_sampling == "token" and self.loss_type == "ppo"


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """The mean log-ratio over each response's tokens: log s_i = (1/|y_i|) sum_t (logp - logp_old). [B, T] -> [B, 1].

    An empty response gives 0 (ratio 1). Masked positions never enter, whatever they hold."""
    mask = response_mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    return log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)


def importance_weights(
    logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor, level: ImportanceSampling = "token"
) -> Tensor:
    """The importance weight of every response token, with its gradient. [B, T] each -> [B, T].

      ``token``         : r_t = exp(logp_t - logp_old_t)                                 (PPO)
      ``sequence``      : s_i = exp(mean_t (logp - logp_old)), the same on every token   (GSPO eq. 7)
                          d s_i = s_i * mean_t d logp_t
      ``sequence_token``: s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)]: the value of s_i, the gradient of token t's own
                          log-prob, d s_it = s_i * d logp_t                              (GSPO-token eq. 13)
    As TRL's ``importance_sampling_level`` "token" and "sequence" (its [B, 1] weight broadcast over the tokens).
    """
    if level == "token":
        return torch.exp(logprobs - old_logprobs)
    seq = sequence_log_ratio(logprobs, old_logprobs, response_mask)  # [B, 1]
    if level == "sequence":
        return torch.exp(seq).expand_as(logprobs)
    if level == "sequence_token":
        return torch.exp(logprobs - logprobs.detach() + seq.detach())
    raise ValueError(f"model.ppo.importance_sampling={level!r}: choose one of {IMPORTANCE_SAMPLING_LEVELS}")


def clipped_surrogate_per_token(weights: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """PPO's clipped surrogate with the bounds [1 - clip_low, 1 + clip_high] (DAPO's clip-higher when
    clip_high > clip_low). weights (with grad), advantages: [B, T] -> [B, T]:
        L_t = max(-A w, -A clip(w, 1 - clip_low, 1 + clip_high))"""
    return torch.max(-advantages * weights, -advantages * torch.clamp(weights, 1.0 - clip_low, 1.0 + clip_high))


def cispo_per_token(logprobs: Tensor, weights: Tensor, advantages: Tensor, clip_high: float) -> Tensor:
    """CISPO (MiniMax-M1 eq. 4-5): L_t = -sg[min(w, 1 + clip_high)] * A * logp_t, so dL/dlogp_t = -min(w, 1+eps) A.

    logprobs (with grad), weights, advantages: [B, T] -> [B, T]. Every token keeps a gradient (PPO's clipping zeroes
    those whose ratio left the range); the weight is only bounded. No lower bound: MiniMax-M1 sets its eps_low
    large enough to never bind, and TRL's ``loss_type="cispo"`` has none either (``clamp(coef_1, max=epsilon_high)``).
    TRL's ``epsilon_high`` is the bound itself; here the bound is 1 + clip_high (as for PPO's ratio), so TRL's
    ``epsilon_high=5`` is ``cliprange_high=4``."""
    return -(torch.clamp(weights, max=1.0 + clip_high).detach() * advantages * logprobs)


def variant_per_token(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, clip_range: float,
    variant: PolicyVariant,
) -> tuple[Tensor, Tensor]:
    """The policy term per token under ``variant`` (no KL, no entropy), and the importance weights [B, T] it used."""
    weights = importance_weights(logprobs, old_logprobs, response_mask, variant.importance_sampling)
    high = clip_range if variant.clip_range_high is None else variant.clip_range_high
    if variant.loss_type == "cispo":
        return cispo_per_token(logprobs, weights, advantages, high), weights
    if variant.loss_type == "ppo":
        return clipped_surrogate_per_token(weights, advantages, clip_range, high), weights
    raise ValueError(f"model.ppo.policy_loss={variant.loss_type!r}: choose one of {POLICY_LOSS_TYPES}")


@torch.no_grad()
def clip_fraction(weights: Tensor, response_mask: Tensor, clip_range: float, variant: PolicyVariant) -> Tensor:
    """Share of response tokens whose importance weight lies outside its bounds: [1 - clip_range, 1 + high] for
    ppo, above 1 + high for cispo (its only bound). A scalar."""
    high = clip_range if variant.clip_range_high is None else variant.clip_range_high
    outside = weights > 1.0 + high
    if variant.loss_type == "ppo":
        outside = outside | (weights < 1.0 - clip_range)
    return masked_mean(outside.to(weights.dtype), response_mask.to(weights.dtype))
