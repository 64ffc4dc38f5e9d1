"""PPO math over tensors: no Lightning, no transformers, no Python loops over samples.

Legend for shape comments:
    B  batch (samples in a rollout or mini-batch)
    T  response tokens (padded; ``response_mask`` marks the real ones)

Token log-probabilities, entropies and the exact KL over the vocabulary need the model's logits; they live
with the model code (``lit_rlhf.models.lm``, ``lit_rlhf.models.policy``). Everything here starts from per-token tensors.

Sources:
    PPO: Schulman et al. 2017, arXiv:1707.06347 (clipped surrogate objective, eq. 7).
    GAE: Schulman et al. 2015, arXiv:1506.02438 (eq. 16).
    KL estimators: http://joschu.net/blog/kl-approx.html (k1, k2, k3).
    Per-token KL-shaped reward: Ziegler et al. 2019, arXiv:1909.08593 (R = r - beta * KL).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from lit_rlhf.objectives.aggregation import aggregate, aggregate_terms, loss_counts
from lit_rlhf.objectives.statistics import ReduceFn, global_means, identity, masked_mean
from lit_rlhf.objectives.variants import PolicyVariant, clip_fraction, clipped_surrogate_per_token, variant_per_token

KLEstimator = Literal["kl", "abs", "mse", "full"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


# --------------------------------------------------------------------------------------------------
# KL penalty and per-token rewards
# --------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "kl") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probabilities.

    logprobs, ref_logprobs: [B, T] -> [B, T]. With ``d = log pi(a) - log pi_ref(a)``:
      ``kl``  : d                      (k1, unbiased, can be negative per token)
      ``abs`` : |d|
      ``mse`` : d^2 / 2                (k2, low variance, biased)
    ``full`` (the exact KL over the vocabulary) needs both distributions, not sampled log-probabilities:
    the policy computes it (``Policy.score(full_kl=True)``).
    """
    d = logprobs - ref_logprobs
    if estimator == "kl":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "mse":
        return 0.5 * d.square()
    if estimator == "full":
        raise ValueError("kl_estimator='full' needs the full distributions: take the KL from Policy.score(full_kl=True)")
    raise ValueError(f"Unknown kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on the sampled tokens (joschu.net/blog/kl-approx.html).

    logprobs, ref_logprobs: [B, T] -> [B, T], >= 0 and 0 where they are equal:
        KL_t = exp(ref - logp) - (ref - logp) - 1      (GRPO arXiv:2402.03300 eq. 4; TRL's per_token_kl)
    Written with ``expm1``, which keeps the small values near logp = ref that ``exp(x) - 1`` rounds away.
    Not clamped (OpenRLHF clamps to [-10, 10]; TRL does not).
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def shape_scores(scores: Tensor, scale: float = 1.0, clip: float | None = None) -> Tensor:
    """Scores as PPO uses them: ``clip(scale * r, -clip, clip)`` (no clipping when ``clip`` is None). [B] -> [B]."""
    scores = scores.float() * scale
    return scores if clip is None else scores.clamp(-clip, clip)


def minibatch_groups(lengths: Tensor, size: int, by_length: bool) -> list[Tensor]:
    """Row indices of each mini-batch of ``size`` rows, the mini-batches in random order.

    lengths: [B] response lengths. ``by_length``: rows of similar length together (a stable sort, so less
    padding per forward); otherwise a random permutation of the rows. Draws from torch's global RNG.
    """
    order = torch.argsort(lengths, stable=True) if by_length else torch.randperm(len(lengths))
    groups = list(order.split(size))
    return [groups[i] for i in torch.randperm(len(groups)).tolist()]


def last_token_index(response_mask: Tensor) -> Tensor:
    """Index of each sample's last real response token. response_mask: [B, T] -> [B] (long).

    The largest masked-in position, so holes or padding anywhere in a row are handled; an empty
    response gives index 0.
    """
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)  # [T]
    return (response_mask.long() * (positions + 1)).argmax(dim=1)


def compute_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``r_t = -beta * KL_t`` on every response token, plus the score on the last one.

    scores: [B]; kl (any estimator's per-token KL), response_mask: [B, T] -> (rewards, non_score_rewards),
    [B, T] each, zero outside the mask (Ziegler et al. 2019, eq. 2).
    """
    mask = response_mask.to(kl.dtype)
    non_score = -kl_coef * (kl * mask)
    last = last_token_index(response_mask).unsqueeze(1)  # [B, 1]
    # scatter places each sample's score on its own last token, with no loop over samples.
    score_at_last = torch.zeros_like(non_score).scatter_(1, last, scores.to(non_score.dtype).unsqueeze(1))
    rewards = non_score + score_at_last * mask
    return rewards, non_score


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------


def compute_gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over masked, variable-length responses.

    rewards, values, response_mask: [B, T] -> (advantages, returns), [B, T], zero outside the mask.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}          (GAE, arXiv:1506.02438 eq. 16)
        R_t     = A_t + V_t                                (value target)

    "Next" means the next *real* token of the same sample: masked positions are skipped, so a row with
    holes gives exactly what the same row gives with those positions removed; after the last real token,
    V = 0 and A = 0 (the episode ends).
    """
    mask = response_mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    next_adv = torch.zeros_like(values[:, 0])  # [B]
    # A reverse loop over time (not samples): each step is one vectorised op over the batch.
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = adv_t * m
        next_adv = torch.where(m.bool(), adv_t, next_adv)
        next_value = torch.where(m.bool(), values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns


# --------------------------------------------------------------------------------------------------
# losses (differentiable) and their diagnostics (no grad)
# --------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, clip_range: float,
    reduce_fn: ReduceFn = identity,
) -> Tensor:
    """PPO clipped surrogate loss (arXiv:1707.06347 eq. 7), as a loss to minimise.

    logprobs (with grad), old_logprobs, advantages, response_mask: [B, T] -> scalar.
        ratio = exp(logp - logp_old)
        L = mean_t max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    The mean is over every response token of every process with ``reduce_fn`` (see ``aggregate``).
    """
    per_token = policy_loss_per_token(logprobs, old_logprobs, advantages, clip_range)
    return aggregate(per_token, response_mask, reduce_fn=reduce_fn)


def policy_loss_per_token(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_range: float,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Clipped surrogate per token, optionally with GRPO's KL term, to be combined by ``aggregate``.

    logprobs (with grad), old_logprobs, ref_logprobs: [B, T]; advantages: [B, T] (or [B, 1]) -> [B, T]:
        ratio = exp(logp - logp_old)
        L_t   = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + beta * k3(logp, ref)
    (PPO arXiv:1707.06347 eq. 7; the KL term of GRPO arXiv:2402.03300 eq. 3, as TRL's
    ``per_token_loss + beta * per_token_kl``). ``aggregate(..., "token_mean")`` of it equals ``policy_loss``.
    """
    check_advantages(advantages, logprobs)
    ratio = torch.exp(logprobs - old_logprobs)
    return with_kl_term(clipped_surrogate_per_token(ratio, advantages, clip_range, clip_range), logprobs,
                        ref_logprobs, kl_coef)


def check_advantages(advantages: Tensor, logprobs: Tensor) -> None:
    """Advantages per token [B, T] or per response [B, 1]: a [B] vector would broadcast along T, not B (silently
    wrong whenever B == T)."""
    if advantages.dim() != logprobs.dim():
        raise ValueError(f"advantages must be [B, T] or [B, 1], got {tuple(advantages.shape)}; see broadcast_to_tokens")


def with_kl_term(per_token: Tensor, logprobs: Tensor, ref_logprobs: Tensor | None, kl_coef: float) -> Tensor:
    """``per_token + kl_coef * k3(logp, ref)`` (GRPO's KL in the loss); ``per_token`` itself at ``kl_coef`` 0."""
    if kl_coef == 0.0:
        return per_token
    if ref_logprobs is None:
        raise ValueError("a KL term in the loss (kl_coef != 0) needs ref_logprobs")
    return per_token + kl_coef * k3_kl(logprobs, ref_logprobs)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, clip_range_value: float,
    reduce_fn: ReduceFn = identity,
) -> Tensor:
    """Clipped value loss (as in OpenAI baselines' PPO2), as a loss to minimise.

    values (with grad), old_values, returns, response_mask: [B, T] -> scalar.
        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)
    The mean is over every response token of every process with ``reduce_fn`` (see ``aggregate``).
    """
    per_token = value_loss_per_token(values, old_values, returns, clip_range_value)
    return aggregate(per_token, response_mask, "token_mean", reduce_fn=reduce_fn)


def value_loss_per_token(values: Tensor, old_values: Tensor, returns: Tensor, clip_range_value: float) -> Tensor:
    """``0.5 * max((V - R)^2, (V_clip - R)^2)`` per token (see ``value_loss``). [B, T] each -> [B, T]."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_loss1 = (values - returns).square()
    vf_loss2 = (values_clipped - returns).square()
    return 0.5 * torch.max(vf_loss1, vf_loss2)


@torch.no_grad()
def ppo_diagnostics(
    logprobs: Tensor,
    old_logprobs: Tensor,
    values: Tensor,
    old_values: Tensor,
    response_mask: Tensor,
    clip_range: float,
    clip_range_value: float,
) -> dict[str, Tensor]:
    """Diagnostics of one mini-batch update, all scalars, no gradient.

    logprobs, old_logprobs, values, old_values, response_mask: [B, T].
      policy/approxkl    : mean 0.5 * (logp - logp_old)^2      (k2 estimator, joschu.net/blog/kl-approx.html)
      policy/approxkl_k3 : mean (ratio - 1) - log ratio         (k3: unbiased, always >= 0)
      policy/clipfrac    : share of tokens whose ratio lies outside [1 - eps, 1 + eps]
      val/clipfrac       : share of tokens whose value moved more than eps_v from the rollout's
      policy/ratio_mean, policy/ratio_max
    """
    mask = response_mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    return {
        "policy/approxkl": masked_mean(0.5 * log_ratio.square(), mask),
        "policy/approxkl_k3": masked_mean((ratio - 1.0) - log_ratio, mask),
        "policy/clipfrac": masked_mean(((ratio - 1.0).abs() > clip_range).to(mask.dtype), mask),
        "val/clipfrac": masked_mean(((values - old_values).abs() > clip_range_value).to(mask.dtype), mask),
        "policy/ratio_mean": masked_mean(ratio, mask),
        "policy/ratio_max": ratio.masked_fill(~response_mask.bool(), float("-inf")).max(),
    }


def ppo_objective(
    logprobs: Tensor, old_logprobs: Tensor, values: Tensor | None, old_values: Tensor, advantages: Tensor,
    returns: Tensor, response_mask: Tensor, clip_range: float, clip_range_value: float, vf_coef: float,
    aggregation: str = "token_mean", norm_constant: float | None = None, ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0, reduce_fn: ReduceFn = identity, counts: list[Tensor] | None = None,
    variant: PolicyVariant | None = None, entropy: Tensor | None = None, loss_rows: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One mini-batch's loss to minimise and its diagnostics, all [B, T] inputs with the response mask.

    loss = aggregate(clipped surrogate [+ kl_coef * k3 KL to ``ref_logprobs``]) + vf_coef * clipped value loss
    (PPO arXiv:1707.06347 eq. 9; the value term only with ``values``, i.e. a value head). ``aggregation``
    "token_mean" without a KL term is exactly ``policy_loss``. Both terms' denominators are global through
    ``reduce_fn`` (one reduction for the two; see ``aggregate``): under DDP's gradient averaging, the gradient
    is that of the processes' mini-batches put together. Diagnostics (per process): ``loss/...``, ``val/...``
    and :func:`ppo_diagnostics`. ``counts``: when the inputs are a micro-batch of a mini-batch, this process's
    denominators of the whole mini-batch (:func:`loss_counts`); the loss is then this micro-batch's share.
    ``variant`` (``objectives.variants``): asymmetric clipping, a sequence-level ratio (GSPO), CISPO, an entropy
    bonus on ``entropy`` ([B, T], with its gradient); None or the defaults: the clipped surrogate above.
    ``loss_rows`` [B] bool (``objectives.response_filters``): the policy term is over these rows only, a mean over
    them (``counts`` from ``loss_counts`` with the same rows); the value term and the diagnostics keep every row.
    """
    per_token, weights = policy_term(logprobs, old_logprobs, advantages, response_mask, clip_range, ref_logprobs,
                                     kl_coef, variant, entropy)
    if loss_rows is not None and counts is None:
        counts = loss_counts(response_mask, aggregation, values is not None, loss_rows)
    policy_mask = response_mask if loss_rows is None else response_mask * loss_rows.to(response_mask)[:, None]
    terms = [aggregate_terms(per_token, policy_mask, aggregation, norm_constant)]
    if values is not None:
        per_token_vf = value_loss_per_token(values, old_values, returns, clip_range_value)
        terms.append(aggregate_terms(per_token_vf, response_mask, "token_mean"))
    if counts is not None:
        terms = [(total, count) for (total, _), count in zip(terms, counts, strict=True)]
    pg_loss, *vf = global_means(terms, reduce_fn)
    loss, stats = pg_loss, {"loss/policy": pg_loss.detach()}
    if values is not None:
        vf_loss = vf[0]
        loss = pg_loss + vf_coef * vf_loss
        with torch.no_grad():
            stats.update({"loss/value": vf_loss.detach(), "val/vpred": masked_mean(values, response_mask),
                          "val/error": masked_mean((values - returns).square(), response_mask)})
    stats["loss/total"] = loss.detach()
    if ref_logprobs is not None and kl_coef != 0.0:
        stats["policy/kl_k3"] = masked_mean(k3_kl(logprobs.detach(), ref_logprobs), response_mask)
    diag = ppo_diagnostics(logprobs, old_logprobs, values if values is not None else old_values, old_values,
                           response_mask, clip_range, clip_range_value)
    if values is None:
        del diag["val/clipfrac"]
    if weights is not None:  # the clipping of the weights the variant used
        diag["policy/clipfrac"] = clip_fraction(weights.detach(), response_mask, clip_range, variant)
    return loss, {**stats, **diag}


def policy_term(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, clip_range: float,
    ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, variant: PolicyVariant | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The policy term per token [B, T] of ``ppo_objective`` and the importance weights of a variant (None for
    PPO's own ratio): ``policy_loss_per_token`` (today's float operations) unless ``variant`` changes the ratio or
    the loss; then ``variant_per_token`` [+ kl_coef * k3]. ``- entropy_coef * entropy`` when the coefficient is set."""
    variant = variant or PolicyVariant()
    weights = None
    if variant.plain_ratio:
        per_token = policy_loss_per_token(logprobs, old_logprobs, advantages, clip_range, ref_logprobs, kl_coef)
    else:
        check_advantages(advantages, logprobs)
        per_token, weights = variant_per_token(logprobs, old_logprobs, advantages, response_mask, clip_range, variant)
        per_token = with_kl_term(per_token, logprobs, ref_logprobs, kl_coef)
    if variant.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("an entropy bonus (entropy_coef != 0) needs the policy's entropy per token")
        per_token = per_token - variant.entropy_coef * entropy
    return per_token, weights


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; kept so both controllers share one interface."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv:1909.08593, section 2.2).

        e_t  = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    ``n_steps`` is the number of samples in the batch that produced ``KL_t``, as in the paper.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL control needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])
