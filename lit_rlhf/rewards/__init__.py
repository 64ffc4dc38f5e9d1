"""Rewards: one score per (prompt, response) pair, used by the PPO step.

Every reward is a subclass of :class:`Reward` (:mod:`lit_rlhf.rewards.base`, with its checks). Implementations:

- :class:`ClassifierReward`: logit or probability of a named label from any Hugging Face sequence classifier
  (the seed recipe: ``facebook/roberta-hate-speech-dynabench-r4-target``, label ``nothate``).
- :class:`ProfanityReward`: offline toxicity reward from the ``alt-profanity-check`` scikit-learn model (the
  ``offline`` extra: ``pip install 'lit-rlhf[offline]'``).
- :class:`ReferenceSimilarityReward`: ROUGE of the response against the reference summary.
- :class:`CompositeReward`: weighted sum of rewards, keeping each part for logging.
- :class:`FunctionReward`: a plain Python function given by its import path, as TRL's ``reward_funcs``.
- :class:`Environment`, :class:`ToolEnvironment`: multi-turn episodes (``model.environment``) that answer the
  model's turns (tool calls) and score the finished conversation.

One file each (base.py, classifier.py, profanity.py, function.py, composite.py, reference.py). May import models,
objectives, runtime and settings; knows no dataset and no LightningModule.
"""

from lit_rlhf.rewards.base import NonFiniteRewardError, Reward, Scorer, TextField, check_reward_inputs, select_text
from lit_rlhf.rewards.classifier import ClassifierReward, classifier_input_ids, special_tokens_around
from lit_rlhf.rewards.composite import CompositeReward
from lit_rlhf.rewards.environment import Environment, ToolEnvironment, calc, parse_tool_call
from lit_rlhf.rewards.function import FunctionReward, RewardFunctionError
from lit_rlhf.rewards.profanity import ProfanityReward, import_profanity_check
from lit_rlhf.rewards.reference import ReferenceSimilarityReward

__all__ = [
    "ClassifierReward",
    "CompositeReward",
    "Environment",
    "FunctionReward",
    "NonFiniteRewardError",
    "ProfanityReward",
    "ReferenceSimilarityReward",
    "Reward",
    "RewardFunctionError",
    "Scorer",
    "TextField",
    "ToolEnvironment",
    "calc",
    "check_reward_inputs",
    "classifier_input_ids",
    "import_profanity_check",
    "parse_tool_call",
    "select_text",
    "special_tokens_around",
]
