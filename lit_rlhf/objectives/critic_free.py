"""Critic-free advantages: GRPO, RLOO, REINFORCE++, and the statistics of the groups of samples per prompt.

Legend for shape comments:
    B  samples in a rollout batch
    T  response tokens (padded; ``response_mask`` marks the real ones)
    k  samples per prompt. Rows of one group are contiguous: row i belongs to group i // k, so
       ``scores.view(-1, k)`` is [B / k, k], one row per prompt.

Sources:
    GRPO: Shao et al. 2024, arXiv:2402.03300 (sec. 4.1.2 outcome supervision; eq. 3 KL in the loss, k3).
    RLOO: Ahmadian et al. 2024, arXiv:2402.14740 (eq. 7, leave-one-out baseline).
    REINFORCE++: Hu 2025, arXiv:2501.03262 (token KL in the reward, returns normalised over the global batch).
    Dr. GRPO: Liu et al. 2025, arXiv:2503.20783 (no std scaling).
    Matched against TRL (trl/trainer/grpo_trainer.py, rloo_trainer.py, 2026-07, f2cd577) and OpenRLHF
    (openrlhf/trainer/ppo_utils/experience_maker.py, 2026-08, 3c3be62).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.objectives.ppo import compute_gae
from lit_rlhf.objectives.statistics import ReduceFn, identity, masked_sum, masked_whiten

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
    rewards: Tensor, response_mask: Tensor, gamma: float = 1.0, reduce_fn: ReduceFn = identity
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


@torch.no_grad()
def zero_std_groups(scores: Tensor, k: int) -> Tensor:
    """True for the groups whose k scores are all equal, exactly (``grpo_advantages`` gives them exactly 0: no
    group-relative signal). [B] -> [B / k] bool."""
    grouped = _groups(scores, k)
    return grouped.amax(1) == grouped.amin(1)


def group_stats(scores: Tensor, k: int, reduce_fn: ReduceFn = identity) -> dict[str, Tensor]:
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
    all_equal = zero_std_groups(scores, k).to(grouped.dtype)
    sums = torch.stack([grouped.mean(1).sum(), std.sum(), all_equal.sum(), torch.ones_like(std).sum()])
    mean_sum, std_sum, equal_sum, n_groups = reduce_fn(sums.double()).unbind()
    n_groups = n_groups.clamp(min=1.0)
    return {
        "env/group_reward_mean": (mean_sum / n_groups).float(),
        "env/group_reward_std": (std_sum / n_groups).float(),
        "env/group_zero_std_frac": (equal_sum / n_groups).float(),
    }
