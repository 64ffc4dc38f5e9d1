"""The LightningModules: PPOModule (ppo.py; the update and statistics in ppo_update.py; GRPO, RLOO and
REINFORCE++ without a value head), SFTModule (sft.py), DPOModule (dpo.py), RewardModelModule (reward_model.py),
and base.py: RLHFModule, what they all share, and BuildsPolicy.

May import data, rollout, models, rewards, objectives, runtime and settings; nothing imports it but cli.
"""

from lit_rlhf.modules.base import BuildsPolicy, RLHFModule
from lit_rlhf.modules.dpo import DPOModule
from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.modules.reward_model import RewardModelModule
from lit_rlhf.modules.sft import SFTModule, lead_summary, longest_summary, lr_factor, rouge_scores
from lit_rlhf.objectives import bradley_terry_loss, dpo_loss, preference_stats, sequence_logps

__all__ = [
    "BuildsPolicy",
    "DPOModule",
    "PPOModule",
    "RLHFModule",
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
