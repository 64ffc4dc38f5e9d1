"""Scorers of responses: the reward base and its checks, classifier, profanity, function, composite, reference."""

from lit_rlhf.rewards.scorers import (
    ClassifierReward,
    CompositeReward,
    FunctionReward,
    NonFiniteRewardError,
    ProfanityReward,
    ReferenceSimilarityReward,
    Reward,
    RewardFunctionError,
    Scorer,
    TextField,
    check_reward_inputs,
    classifier_input_ids,
    import_profanity_check,
    select_text,
    special_tokens_around,
)

__all__ = [
    "ClassifierReward",
    "CompositeReward",
    "FunctionReward",
    "NonFiniteRewardError",
    "ProfanityReward",
    "ReferenceSimilarityReward",
    "Reward",
    "RewardFunctionError",
    "Scorer",
    "TextField",
    "check_reward_inputs",
    "classifier_input_ids",
    "import_profanity_check",
    "select_text",
    "special_tokens_around",
]
