"""Loss aggregation: a per-token loss [B, T] combined into the scalar to minimise, its denominators global over
processes, and one mini-batch's statistics put together from its micro-batches'.

Legend: ``B`` samples of a (mini- or micro-)batch, ``T`` response tokens (``response_mask`` marks the real ones).

Sources:
    GRPO: Shao et al. 2024, arXiv:2402.03300 (eq. 3, a mean per sequence).
    Dr. GRPO: Liu et al. 2025, arXiv:2503.20783 (no 1/|o_i|: sum over tokens / a constant).
    DAPO: Yu et al. 2025, arXiv:2503.14476 (token-level policy-gradient loss, eq. 12).
    Matched against TRL (trl/trainer/grpo_trainer.py, 2026-07, f2cd577) and OpenRLHF (openrlhf/models/loss.py,
    2026-08, 3c3be62).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from lit_rlhf.objectives.statistics import ReduceFn, global_means, identity

LossAggregation = Literal["token_mean", "sequence_mean", "token_sum_norm"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)


def aggregate(
    per_token: Tensor,
    response_mask: Tensor,
    mode: LossAggregation = "token_mean",
    norm_constant: float | None = None,
    reduce_fn: ReduceFn = identity,
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


def loss_counts(
    response_mask: Tensor, aggregation: LossAggregation, with_values: bool, loss_rows: Tensor | None = None
) -> list[Tensor]:
    """This process's denominators of ``ppo_objective``'s terms for a whole mini-batch [B, T]: the policy term's
    (``aggregation``) and, ``with_values``, the value term's (its tokens). Pass them as ``ppo_objective``'s
    ``counts`` for each micro-batch of it: the micro-batches' gradients then add up to the mini-batch's, where a
    mean per micro-batch would weigh a micro-batch of few tokens like one of many. ``loss_rows`` [B] bool: the
    rows the policy term is over (``ppo_objective``'s); its denominator counts only them (the value term's all)."""
    policy_mask = response_mask if loss_rows is None else response_mask[loss_rows.to(response_mask.device)]
    counts = [aggregate_count(policy_mask, aggregation)]
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
