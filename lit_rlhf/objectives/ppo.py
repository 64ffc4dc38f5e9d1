"""PPO math over tensors: no Lightning, no transformers, no Python loops over samples.

Legend for shape comments:
    B  batch (samples in a rollout or mini-batch)
    T  response tokens (padded; ``response_mask`` marks the real ones)
    S  statistics reduced together

Token log-probabilities, entropies and the exact KL over the vocabulary need the model's logits; they live
with the model code (``lit_rlhf.models.lm``, ``lit_rlhf.models.policy``). Everything here starts from per-token tensors.

Sources:
    PPO: Schulman et al. 2017, arXiv:1707.06347 (clipped surrogate objective, eq. 7).
    GAE: Schulman et al. 2015, arXiv:1506.02438 (eq. 16).
    KL estimators: http://joschu.net/blog/kl-approx.html (k1, k2, k3).
    Per-token KL-shaped reward: Ziegler et al. 2019, arXiv:1909.08593 (R = r - beta * KL).
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
from torch import Tensor

KLEstimator = Literal["kl", "abs", "mse", "full"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)

# A function that sums a small tensor of statistics over all processes and returns the global sums.
# Single-process default: identity. Under DDP the module passes a strategy all-reduce.
ReduceFn = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


# --------------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is 1. x, mask: [B, T] -> scalar, or [B]/[T] along ``dim``."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1. x, mask: [B, T] -> scalar (or along ``dim``).

    An all-zero mask gives 0 rather than NaN: an empty mini-batch contributes nothing.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)


def masked_moments(x: Tensor, mask: Tensor, reduce_fn: ReduceFn = _identity) -> tuple[Tensor, Tensor, Tensor]:
    """Global mean, unbiased variance and count of the masked entries, across processes.

    x, mask: [B, T] -> (mean, var, n), scalars. Each process contributes ``[sum x, sum x^2, n]`` and
    ``reduce_fn`` sums them over processes, so the result equals the statistic over the concatenated
    batch (per-process means could not be averaged when processes hold different token counts).
    """
    mean, var, n = masked_moments_many([(x, mask)], reduce_fn)
    return mean[0].to(x.dtype), var[0].to(x.dtype), n[0]


def masked_moments_many(
    pairs: list[tuple[Tensor, Tensor]], reduce_fn: ReduceFn = _identity
) -> tuple[Tensor, Tensor, Tensor]:
    """Means, variances and counts of several masked tensors with ONE reduction over processes.

    pairs: S tuples (x, mask), each pair of one shape -> three [S] tensors (float64). The S x
    ``[sum x, sum x^2, n]`` sums are stacked into one [S, 3] tensor for ``reduce_fn``, so S global statistics
    cost one all-reduce.
    """
    sums = torch.stack([
        torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()
        for x, m in ((x, m.to(x.dtype)) for x, m in pairs)
    ])  # [S, 3]
    total, total_sq, n = reduce_fn(sums.clone()).unbind(-1)
    mean = total / n.clamp(min=1.0)
    # Bessel correction, as TRL's masked_var: var = (sum x^2 - n mean^2) / (n - 1).
    var = (total_sq - n * mean * mean).clamp(min=0.0) / (n - 1.0).clamp(min=1.0)
    return mean, var, n


def rollout_statistics(
    scores: Tensor, kl: Tensor, non_score: Tensor, logprobs: Tensor, values: Tensor, returns: Tensor,
    raw_advantages: Tensor, advantages: Tensor, response_mask: Tensor, reward_parts: dict[str, Tensor],
    reduce_fn: ReduceFn = _identity,
) -> dict[str, Tensor]:
    """A PPO step's logged statistics over the global batch, with ONE reduction over processes.

    scores, kl (per response): [B]; reward_parts: name -> [B]; the rest [B, T] with the response mask.
    Names as other RLHF tools log them; ``ppo/val/var_explained`` is 1 - Var[R - V] / Var[R]; the entropy is
    the sampled estimate -sum_t log pi(a_t) per response.
    """
    per_sample = {"env/reward": scores.float(), "objective/kl": kl, "objective/entropy": -(logprobs * response_mask).sum(1),
                  "tokens/responses_len_mean": response_mask.sum(1).float(), "ppo/mean_non_score_reward": non_score.sum(1),
                  **{f"env/reward/{name}_mean": part.float() for name, part in reward_parts.items()}}
    per_token = {"ppo/returns": returns, "ppo/val": values, "residual": returns - values,
                 "ppo/policy/advantages_mean": advantages, "ppo/policy/advantages_raw_mean": raw_advantages}
    ones = torch.ones_like(kl)
    names = [*per_sample, *per_token]
    pairs = [(v, ones) for v in per_sample.values()] + [(v, response_mask) for v in per_token.values()]
    means, variances, _ = masked_moments_many(pairs, reduce_fn)
    mean, var = dict(zip(names, means.float().unbind())), dict(zip(names, variances.float().unbind()))
    out = {k: mean[k] for k in names if k not in ("env/reward", "ppo/returns", "ppo/val", "residual")}
    return {**out, "env/reward_mean": mean["env/reward"], "env/reward_std": var["env/reward"].sqrt(),
            "ppo/mean_scores": mean["env/reward"],
            "ppo/returns/mean": mean["ppo/returns"], "ppo/returns/var": var["ppo/returns"],
            "ppo/val/mean": mean["ppo/val"], "ppo/val/var": var["ppo/val"],
            "ppo/val/var_explained": 1.0 - var["residual"] / var["ppo/returns"].clamp(min=1e-8)}


def masked_var(x: Tensor, mask: Tensor, reduce_fn: ReduceFn = _identity) -> Tensor:
    """Unbiased variance of the masked entries of x: [B, T] -> scalar."""
    return masked_moments(x, mask, reduce_fn)[1]


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, reduce_fn: ReduceFn = _identity, eps: float = 1e-8
) -> Tensor:
    """Whiten the masked entries: ``(x - mean) / sqrt(var + eps)``; masked positions come back as 0.

    x, mask: [B, T] -> [B, T]. Mean and variance are global over processes through ``reduce_fn``.
    With ``shift_mean=False`` the mean is added back (only the scale changes).
    """
    mean, var, _ = masked_moments(x, mask, reduce_fn)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


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
    reduce_fn: ReduceFn = _identity,
) -> Tensor:
    """PPO clipped surrogate loss (arXiv:1707.06347 eq. 7), as a loss to minimise.

    logprobs (with grad), old_logprobs, advantages, response_mask: [B, T] -> scalar.
        ratio = exp(logp - logp_old)
        L = mean_t max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    The mean is over every response token of every process with ``reduce_fn`` (see ``aggregate``).
    """
    per_token = policy_loss_per_token(logprobs, old_logprobs, advantages, clip_range)
    return aggregate(per_token, response_mask, reduce_fn=reduce_fn)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, clip_range_value: float,
    reduce_fn: ReduceFn = _identity,
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
    kl_coef: float = 0.0, reduce_fn: ReduceFn = _identity, counts: list[Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One mini-batch's loss to minimise and its diagnostics, all [B, T] inputs with the response mask.

    loss = aggregate(clipped surrogate [+ kl_coef * k3 KL to ``ref_logprobs``]) + vf_coef * clipped value loss
    (PPO arXiv:1707.06347 eq. 9; the value term only with ``values``, i.e. a value head). ``aggregation``
    "token_mean" without a KL term is exactly ``policy_loss``. Both terms' denominators are global through
    ``reduce_fn`` (one reduction for the two; see ``aggregate``): under DDP's gradient averaging, the gradient
    is that of the processes' mini-batches put together. Diagnostics (per process): ``loss/...``, ``val/...``
    and :func:`ppo_diagnostics`. ``counts``: when the inputs are a micro-batch of a mini-batch, this process's
    denominators of the whole mini-batch (:func:`loss_counts`); the loss is then this micro-batch's share.
    """
    per_token = policy_loss_per_token(logprobs, old_logprobs, advantages, clip_range, ref_logprobs, kl_coef)
    terms = [aggregate_terms(per_token, response_mask, aggregation, norm_constant)]
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
    return loss, {**stats, **diag}


def compute_advantages(
    estimator: str, scores: Tensor, kl: Tensor, values: Tensor, response_mask: Tensor, kl_coef: float,
    samples_per_prompt: int = 1, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True,
    grpo_scale: bool = True, reduce_fn: ReduceFn = _identity,
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


# --------------------------------------------------------------------------------------------------
# critic-free advantages: GRPO, RLOO, REINFORCE++; loss aggregation; group statistics
#
#   k  samples per prompt. Rows of one group are contiguous: row i belongs to group i // k, so
#      ``scores.view(-1, k)`` is [B / k, k], one row per prompt.
#
# Sources:
#   GRPO: Shao et al. 2024, arXiv:2402.03300 (sec. 4.1.2 outcome supervision; eq. 3 KL in the loss, k3).
#   RLOO: Ahmadian et al. 2024, arXiv:2402.14740 (eq. 7, leave-one-out baseline).
#   REINFORCE++: Hu 2025, arXiv:2501.03262 (token KL in the reward, returns normalised over the global batch).
#   Dr. GRPO: Liu et al. 2025, arXiv:2503.20783 (no std scaling, no 1/|o_i|: sum over tokens / a constant).
#   DAPO: Yu et al. 2025, arXiv:2503.14476 (token-level policy-gradient loss, eq. 12).
#   Matched against TRL (trl/trainer/grpo_trainer.py, rloo_trainer.py, 2026-07, f2cd577) and OpenRLHF
#   (openrlhf/trainer/ppo_utils/experience_maker.py, openrlhf/models/loss.py, 2026-08, 3c3be62).
# --------------------------------------------------------------------------------------------------

AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
# Estimators that need no value head, and those that need k >= 2 samples per prompt for a baseline.
CRITIC_FREE_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo")

LossAggregation = Literal["token_mean", "sequence_mean", "token_sum_norm"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)

# Added to the group std, as TRL's GRPOTrainer (1e-4; OpenRLHF's group_norm uses 1e-9): a group whose rewards
# differ by less than ~eps is not blown up to +-1.
GRPO_STD_EPS = 1e-4


def _groups(scores: Tensor, k: int, min_k: int = 1) -> Tensor:
    """scores: [B] -> [B / k, k] (a view), in a floating dtype; checks that whole groups are present."""
    if k < min_k:
        raise ValueError(f"need at least {min_k} samples per prompt (model.samples_per_prompt), got {k}")
    if scores.dim() != 1 or scores.numel() % k != 0:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {k} samples")
    return (scores if scores.is_floating_point() else scores.float()).view(-1, k)


def grpo_advantages(scores: Tensor, k: int, scale: bool = True, eps: float = GRPO_STD_EPS) -> Tensor:
    """Group-relative advantages (GRPO, arXiv:2402.03300 sec. 4.1.2), one per sample.

    scores: [B] -> [B]. Within each group G of k samples of one prompt:
        A_i = (r_i - mean_G r) / (std_G r + eps)     scale=True  (GRPO)
        A_i =  r_i - mean_G r                        scale=False (Dr. GRPO, arXiv:2503.20783 sec. 3.2)
    std is the unbiased (Bessel) std, as TRL's ``nanstd`` and OpenRLHF's ``group_norm`` (``torch.std``);
    eps is added to the std, not the variance, as both do.
    A group whose rewards are all equal gets exactly 0: rounding noise in its mean, divided by eps, would
    otherwise become an advantage of order ulp(r) / eps.
    """
    grouped = _groups(scores, k, min_k=2)  # [B/k, k]
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    all_equal = grouped.amax(1, keepdim=True) == grouped.amin(1, keepdim=True)  # [B/k, 1]
    return centred.masked_fill(all_equal, 0.0).reshape(-1)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out advantages (RLOO, arXiv:2402.14740 eq. 7), one per sample.

    scores: [B] -> [B]. Within each group of k >= 2 samples of one prompt:
        A_i = r_i - 1/(k-1) sum_{j != i} r_j       (= k/(k-1) (r_i - mean_G r))
    Computed as TRL's RLOOTrainer and OpenRLHF's ``rloo``: baseline = (sum_G r - r_i) / (k - 1).
    With k = 2: A = (r_1 - r_2, r_2 - r_1).
    """
    grouped = _groups(scores, k, min_k=2)  # [B/k, k]
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Give every response token its sample's advantage (outcome supervision, GRPO sec. 4.1.2).

    advantages: [B], response_mask: [B, T] -> [B, T], zero outside the mask.
    """
    return advantages.unsqueeze(1) * response_mask.to(advantages.dtype)


def kl_shaped_scores(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """Sequence rewards with the KL penalty inside, for group estimators with the KL in the reward.

    scores: [B]; kl, response_mask: [B, T] (per-token KL estimates, e.g. ``kl_penalty``) -> [B]:
        r_i = score_i - beta * sum_t KL_{i,t}
    The penalty is applied before the group baseline, as TRL's RLOOTrainer (sum of k1 over the response)
    and the RLOO paper (arXiv:2402.14740 sec. 2, r(x, y) - beta log(pi / pi_ref)).
    """
    return scores.to(kl.dtype) - kl_coef * masked_sum(kl, response_mask.to(kl.dtype), dim=1)


def reinforce_pp_advantages(
    rewards: Tensor, response_mask: Tensor, gamma: float = 1.0, reduce_fn: ReduceFn = _identity
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ advantages (arXiv:2501.03262 sec. 3): discounted returns, whitened over the global batch.

    rewards, response_mask: [B, T] (per-token KL-shaped rewards from ``compute_rewards``) -> (advantages,
    returns), [B, T] each, zero outside the mask.
        G_t = r_t + gamma * G_{t+1}               (returns; no critic, no lambda)
        A_t = (G_t - mean G) / std G              (mean and std over every response token of every process)
    G is GAE with V = 0 and lam = 1, so ``compute_gae`` computes it: masked positions are skipped (a row with
    holes equals the row with them removed). Whitening is ``masked_whiten`` (unbiased variance, eps 1e-8 in
    the square root); OpenRLHF's ``reinforce`` uses the biased variance clamped at 1e-8, a factor of
    sqrt(n / (n - 1)) on n tokens.
    """
    returns, _ = compute_gae(rewards, torch.zeros_like(rewards), response_mask, gamma, lam=1.0)
    advantages = masked_whiten(returns, response_mask, reduce_fn=reduce_fn)
    return advantages, returns


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on the sampled tokens (joschu.net/blog/kl-approx.html).

    logprobs, ref_logprobs: [B, T] -> [B, T], >= 0 and 0 where they are equal:
        KL_t = exp(ref - logp) - (ref - logp) - 1      (GRPO arXiv:2402.03300 eq. 4; TRL's per_token_kl)
    Written with ``expm1``, which keeps the small values near logp = ref that ``exp(x) - 1`` rounds away.
    Not clamped (OpenRLHF clamps to [-10, 10]; TRL does not).
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


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
    if advantages.dim() != logprobs.dim():
        # a [B] vector would broadcast along T, not B: silently wrong whenever B == T
        raise ValueError(f"advantages must be [B, T] or [B, 1], got {tuple(advantages.shape)}; see broadcast_to_tokens")
    ratio = torch.exp(logprobs - old_logprobs)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.max(pg_loss1, pg_loss2)
    if kl_coef != 0.0:
        if ref_logprobs is None:
            raise ValueError("a KL term in the loss (kl_coef != 0) needs ref_logprobs")
        loss = loss + kl_coef * k3_kl(logprobs, ref_logprobs)
    return loss


def aggregate(
    per_token: Tensor,
    response_mask: Tensor,
    mode: LossAggregation = "token_mean",
    norm_constant: float | None = None,
    reduce_fn: ReduceFn = _identity,
) -> Tensor:
    """Combine a per-token loss [B, T] into the scalar to minimise.

    per_token, response_mask: [B, T] -> scalar. With n_i the response length of row i:
      ``token_mean``    : sum_{i,t} L / sum_i n_i                 (DAPO arXiv:2503.14476 eq. 12; TRL "dapo")
      ``sequence_mean`` : mean_i (sum_t L / n_i), over non-empty rows (GRPO arXiv:2402.03300 eq. 3; TRL "grpo")
      ``token_sum_norm``: sum_{i,t} L / (B * norm_constant)       (Dr. GRPO arXiv:2503.20783; TRL "dr_grpo",
                          norm_constant = max response length)
    Under DDP the gradients are averaged over P processes, so a per-process mean weighs processes, not
    tokens, equally. Pass ``reduce_fn`` (a sum over processes) to make the denominator global: the result is
    then ``local sum * P / global count``, whose average over processes is the global mean. TRL's "dapo"
    does the same (normaliser ``num_items_in_batch / num_processes``, a gathered token count), as does
    OpenRLHF's ``aggregate_loss`` (``* dp_size``). ``reduce_fn`` is then a collective: every process must
    call it for every mini-batch.
    """
    return global_means([aggregate_terms(per_token, response_mask, mode, norm_constant)], reduce_fn)[0]


def aggregate_terms(
    per_token: Tensor, response_mask: Tensor, mode: LossAggregation = "token_mean", norm_constant: float | None = None
) -> tuple[Tensor, Tensor]:
    """This process's numerator and denominator of ``aggregate``: (total, count), scalars."""
    mask = response_mask.bool()
    # where, not a product: a non-finite value on a masked position (inf * 0 = nan) must not leak
    loss = torch.where(mask, per_token, torch.zeros_like(per_token))
    lengths = mask.sum(1)  # [B]
    count = aggregate_count(response_mask, mode)
    if mode == "token_mean":
        return loss.sum(), count
    if mode == "sequence_mean":
        return (loss.sum(1) / lengths.clamp(min=1)).sum(), count
    if norm_constant is None or norm_constant <= 0:  # token_sum_norm
        raise ValueError(f"loss_aggregation='token_sum_norm' needs norm_constant > 0, got {norm_constant}")
    return loss.sum() / norm_constant, count


def aggregate_count(response_mask: Tensor, mode: LossAggregation = "token_mean") -> Tensor:
    """This process's denominator of ``aggregate`` for ``response_mask`` [B, T]: the response tokens
    (token_mean), the non-empty rows (sequence_mean) or the rows (token_sum_norm). A scalar."""
    lengths = response_mask.bool().sum(1)  # [B]
    if mode == "token_mean":
        return lengths.sum()
    if mode == "sequence_mean":
        return (lengths > 0).sum()
    if mode == "token_sum_norm":
        return torch.tensor(lengths.shape[0], device=lengths.device)
    raise ValueError(f"model.ppo.loss_aggregation={mode!r}: choose one of {LOSS_AGGREGATIONS}")


def loss_counts(response_mask: Tensor, aggregation: LossAggregation, with_values: bool) -> list[Tensor]:
    """This process's denominators of ``ppo_objective``'s terms for a whole mini-batch [B, T]: the policy term's
    (``aggregation``) and, ``with_values``, the value term's (its tokens). Pass them as ``ppo_objective``'s
    ``counts`` for each micro-batch of it: the micro-batches' gradients then add up to the mini-batch's, where a
    mean per micro-batch would weigh a micro-batch of few tokens like one of many."""
    counts = [aggregate_count(response_mask, aggregation)]
    return counts + [aggregate_count(response_mask, "token_mean")] if with_values else counts


def combine_micro_batches(parts: list[tuple[dict[str, Tensor], int]]) -> dict[str, Tensor]:
    """One mini-batch's ``ppo_objective`` statistics from its micro-batches' (stats, response tokens): the loss
    terms (``loss/...``, partial sums over a shared denominator) add up, ``policy/ratio_max`` is the maximum, and
    every other statistic (a mean over tokens) is the token-weighted mean. One part: returned as it is."""
    if len(parts) == 1:
        return parts[0][0]
    device = next(iter(parts[0][0].values())).device  # stays where the statistics are: they are reduced later
    tokens = torch.tensor([float(n) for _, n in parts], device=device)
    out = {}
    for name in parts[0][0]:
        values = torch.stack([stats[name].detach().float() for stats, _ in parts])
        if name.startswith("loss/"):
            out[name] = values.sum()
        elif name == "policy/ratio_max":
            out[name] = values.max()
        else:
            out[name] = (values * tokens).sum() / tokens.sum().clamp(min=1.0)
    return out


def global_means(terms: list[tuple[Tensor, Tensor]], reduce_fn: ReduceFn = _identity) -> list[Tensor]:
    """``total * P / global count`` of each (total, count) of ``aggregate_terms``, with ONE reduction.

    S terms -> S scalars. The S counts and a 1 per process are stacked into one [S + 1] tensor for
    ``reduce_fn``: summed over processes, [global count_1 .. global count_S, P].
    """
    counts = torch.stack([*(count.double() for _, count in terms), torch.ones_like(terms[0][1], dtype=torch.float64)])
    *global_counts, processes = reduce_fn(counts).unbind()
    # (total * P) / count: in one process exactly masked_mean's ``sum / count`` (bit for bit, as policy_loss)
    return [total * processes.to(total.dtype) / count.clamp(min=1.0).to(total.dtype)
            for (total, _), count in zip(terms, global_counts)]


@torch.no_grad()
def group_stats(scores: Tensor, k: int, reduce_fn: ReduceFn = _identity) -> dict[str, Tensor]:
    """Statistics of the groups of k samples per prompt, for logging; global over processes.

    scores: [B] -> scalars:
      env/group_reward_mean    : mean over groups of the group mean reward
      env/group_reward_std     : mean over groups of the within-group (unbiased) std; 0 when k = 1
      env/group_zero_std_frac  : share of groups whose rewards are all equal (zero advantage, no signal;
                                 TRL's ``frac_reward_zero_std``)
    A group never straddles processes, so per-process sums add up to the global ones through ``reduce_fn``.
    """
    grouped = _groups(scores, k)  # [B/k, k]
    std = grouped.std(1) if k > 1 else torch.zeros_like(grouped[:, 0])
    all_equal = (grouped.amax(1) == grouped.amin(1)).to(grouped.dtype)
    sums = torch.stack([grouped.mean(1).sum(), std.sum(), all_equal.sum(), torch.ones_like(std).sum()])
    mean_sum, std_sum, equal_sum, n_groups = reduce_fn(sums.double()).unbind()
    n_groups = n_groups.clamp(min=1.0)
    return {
        "env/group_reward_mean": (mean_sum / n_groups).float(),
        "env/group_reward_std": (std_sum / n_groups).float(),
        "env/group_zero_std_frac": (equal_sum / n_groups).float(),
    }
