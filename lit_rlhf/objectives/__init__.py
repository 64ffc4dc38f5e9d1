"""Pure tensor math of the objectives: statistics.py (masked statistics), ppo.py (KL estimators, GAE, PPO
losses, KL control), critic_free.py (GRPO, RLOO, REINFORCE++ advantages), advantages.py (the estimators by
name), aggregation.py (loss aggregation, micro-batches), preference.py (DPO, IPO, Bradley-Terry losses).

Imports only torch (and the standard library).
"""

from lit_rlhf.objectives.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    CRITIC_FREE_ESTIMATORS,
    GROUP_ESTIMATORS,
    compute_advantages,
)
from lit_rlhf.objectives.aggregation import (
    LOSS_AGGREGATIONS,
    LossAggregation,
    aggregate,
    combine_micro_batches,
    loss_counts,
)
from lit_rlhf.objectives.critic_free import (
    broadcast_to_tokens,
    group_stats,
    grpo_advantages,
    kl_shaped_scores,
    reinforce_pp_advantages,
    rloo_advantages,
)
from lit_rlhf.objectives.ppo import (
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    KL_ESTIMATORS,
    compute_gae,
    compute_rewards,
    k3_kl,
    kl_penalty,
    last_token_index,
    minibatch_groups,
    policy_loss,
    policy_loss_per_token,
    ppo_diagnostics,
    ppo_objective,
    shape_scores,
    value_loss,
)
from lit_rlhf.objectives.preference import (
    DPOLossType,
    bradley_terry_loss,
    check_margin,
    dpo_loss,
    preference_metrics,
    preference_stats,
    sequence_logps,
)
from lit_rlhf.objectives.statistics import (
    ReduceFn,
    masked_mean,
    masked_moments,
    masked_moments_many,
    masked_var,
    masked_whiten,
    rollout_statistics,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "AdvantageEstimator",
    "CRITIC_FREE_ESTIMATORS",
    "DPOLossType",
    "FixedKLController",
    "GROUP_ESTIMATORS",
    "KLEstimator",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "LossAggregation",
    "ReduceFn",
    "aggregate",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "check_margin",
    "combine_micro_batches",
    "compute_advantages",
    "compute_gae",
    "compute_rewards",
    "dpo_loss",
    "group_stats",
    "grpo_advantages",
    "k3_kl",
    "kl_penalty",
    "kl_shaped_scores",
    "last_token_index",
    "loss_counts",
    "masked_mean",
    "masked_moments",
    "masked_moments_many",
    "masked_var",
    "masked_whiten",
    "minibatch_groups",
    "policy_loss",
    "policy_loss_per_token",
    "ppo_diagnostics",
    "ppo_objective",
    "preference_metrics",
    "preference_stats",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "rollout_statistics",
    "sequence_logps",
    "shape_scores",
    "value_loss",
]
