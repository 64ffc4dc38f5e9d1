"""Masked statistics over tensors, global over processes with one reduction: no Lightning, no transformers.

Legend for shape comments:
    B  batch (samples in a rollout or mini-batch)
    T  response tokens (padded; ``response_mask`` marks the real ones)
    S  statistics reduced together

Every global statistic takes a ``reduce_fn`` (:data:`ReduceFn`) that sums a small tensor over processes: the
identity in one process, a strategy all-reduce under DDP.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


# A function that sums a small tensor of statistics over all processes and returns the global sums.
# Single-process default: identity. Under DDP the module passes a strategy all-reduce.
ReduceFn = Callable[[Tensor], Tensor]


def identity(t: Tensor) -> Tensor:
    """The single-process ``reduce_fn``: the local sums are the global ones."""
    return t


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


def masked_moments(x: Tensor, mask: Tensor, reduce_fn: ReduceFn = identity) -> tuple[Tensor, Tensor, Tensor]:
    """Global mean, unbiased variance and count of the masked entries, across processes.

    x, mask: [B, T] -> (mean, var, n), scalars. Each process contributes ``[sum x, sum x^2, n]`` and
    ``reduce_fn`` sums them over processes, so the result equals the statistic over the concatenated
    batch (per-process means could not be averaged when processes hold different token counts).
    """
    mean, var, n = masked_moments_many([(x, mask)], reduce_fn)
    return mean[0].to(x.dtype), var[0].to(x.dtype), n[0]


def masked_moments_many(
    pairs: list[tuple[Tensor, Tensor]], reduce_fn: ReduceFn = identity
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
    reduce_fn: ReduceFn = identity,
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


def masked_var(x: Tensor, mask: Tensor, reduce_fn: ReduceFn = identity) -> Tensor:
    """Unbiased variance of the masked entries of x: [B, T] -> scalar."""
    return masked_moments(x, mask, reduce_fn)[1]


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, reduce_fn: ReduceFn = identity, eps: float = 1e-8
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


def global_means(terms: list[tuple[Tensor, Tensor]], reduce_fn: ReduceFn = identity) -> list[Tensor]:
    """``total * P / global count`` of each (total, count) of ``aggregate_terms``, with ONE reduction.

    S terms -> S scalars. The S counts and a 1 per process are stacked into one [S + 1] tensor for
    ``reduce_fn``: summed over processes, [global count_1 .. global count_S, P].
    """
    counts = torch.stack([*(count.double() for _, count in terms), torch.ones_like(terms[0][1], dtype=torch.float64)])
    *global_counts, processes = reduce_fn(counts).unbind()
    # (total * P) / count: in one process exactly masked_mean's ``sum / count`` (bit for bit, as policy_loss)
    return [total * processes.to(total.dtype) / count.clamp(min=1.0).to(total.dtype)
            for (total, _), count in zip(terms, global_counts)]
