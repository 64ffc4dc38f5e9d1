"""The LightningModules: PPO (and its critic-free estimators), SFT, DPO and reward models."""

from lit_rlhf.modules.base import BuildsPolicy
from lit_rlhf.modules.dpo import DPOModule, dpo_loss, sequence_logps
from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.modules.reward_model import RewardModelModule, bradley_terry_loss, preference_stats
from lit_rlhf.modules.sft import SFTModule, lead_summary, longest_summary, lr_factor, rouge_scores

__all__ = [
    "BuildsPolicy",
    "DPOModule",
    "PPOModule",
    "RewardModelModule",
    "SFTModule",
    "bradley_terry_loss",
    "dpo_loss",
    "lead_summary",
    "longest_summary",
    "lr_factor",
    "preference_stats",
    "rouge_scores",
    "sequence_logps",
]
