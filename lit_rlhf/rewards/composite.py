"""Weighted sum of rewards, keeping each part for logging."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lit_rlhf.rewards.base import Reward


class CompositeReward(Reward):
    """Weighted sum of rewards: ``Σ_i w_i · reward_i``. ``last_components`` keeps each part of the last call."""

    def __init__(self, rewards: list[Reward], weights: list[float] | None = None) -> None:
        """
        Args:
            rewards: The rewards to add up (each given as ``class_path`` + ``init_args`` in YAML).
            weights: One weight per reward; None: all 1.
        """
        super().__init__()
        if not rewards:
            raise ValueError(f"{self.flag('rewards')} must hold at least one reward.")
        if weights is None:
            weights = [1.0] * len(rewards)
        if len(weights) != len(rewards):
            raise ValueError(f"{self.flag('weights')} has {len(weights)} values for {len(rewards)} rewards "
                             f"({self.flag('rewards')}); give one per reward.")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"{self.flag('weights')} must be finite, got {weights}.")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]
        self.names = _unique_names([r.name for r in self.rewards])
        self.setting = self.setting  # tells each part where it is set
        self.last_components: dict[str, torch.Tensor] = {}
        """Unweighted scores of each part in the last call, by part name (for logging)."""

    @property
    def name(self) -> str:
        return "composite"

    @property
    def setting(self) -> str:
        return self.__dict__.get("_setting", Reward.setting)

    @setting.setter
    def setting(self, value: str) -> None:
        # each part's arguments are set under this one's: --model.reward.rewards[1].max_length
        self._setting = value
        for i, reward in enumerate(self.rewards):
            reward.setting = f"{value}.rewards[{i}]"

    def describe(self) -> str:
        return " + ".join(f"{w:g} × [{r.describe()}]" for w, r in zip(self.weights, self.rewards))

    takes_columns = True

    def uses_model(self, model_id: str | None) -> bool:
        return any(r.uses_model(model_id) for r in self.rewards)

    def required_columns(self) -> list[str]:
        return list(dict.fromkeys(c for r in self.rewards for c in r.required_columns()))

    def needs_references(self) -> bool:
        return any(r.needs_references() for r in self.rewards)

    def setup(self) -> None:
        for reward in self.rewards:
            reward.setup()

    def to(self, device: str | torch.device) -> "CompositeReward":
        for reward in self.rewards:
            reward.to(device)
        return super().to(device)

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> torch.Tensor:
        total = super().__call__(prompts, responses, references, columns)
        # The parts were made inside inference mode; plain copies can be used freely by loggers.
        self.last_components = {name: part.clone() for name, part in self.last_components.items()}
        return total

    def compute(
        self, prompts: list[str], responses: list[str], references: list[str] | None,
        columns: dict[str, list[Any]] | None = None,
    ) -> torch.Tensor:
        # Each part goes through its own __call__, so its output is checked (and blamed) on its own.
        parts = [reward(prompts, responses, references=references, columns=columns).to(self.device)
                 for reward in self.rewards]
        self.last_components = dict(zip(self.names, parts))
        return sum(w * part for w, part in zip(self.weights, parts))


def _unique_names(names: list[str]) -> list[str]:
    """Suffix repeated names with their position (``classifier_nothate``, ``classifier_nothate_1``)."""
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(names):
        out.append(name if name not in seen else f"{name}_{i}")
        seen[name] = i
    return out
