"""Skipping unsafe PPO updates, counted, explained, and bounded.

A PPO step whose rollout is unusable (non-finite rewards or log-probabilities) is skipped whole; a mini-batch
whose loss or gradient is not finite, or whose importance ratio blew up, is skipped alone. Every skip is
counted and warned about; after ``max_consecutive`` in a row the run stops with a message that says what to
change. The decision to skip must be the same on every process (``distributed.any_rank``), or the next
collective would hang; this class only counts.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

ADVICE = (
    "Lower model.learning_rate, set model.ppo.max_grad_norm, clip rewards with model.ppo.score_clip, check the "
    "reward model's outputs, or (for ratio skips) raise model.ppo.ratio_threshold. Resume from the last "
    "checkpoint (--ckpt_path) after changing the setting."
)


class SkipGuard:
    """Counts skipped steps and updates; raises after ``max_consecutive`` skips in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.steps = self.updates = self.consecutive = 0

    def skip_step(self, ppo_step: int, reason: str) -> None:
        """A whole PPO step was skipped (its prompts are consumed, as in a normal step)."""
        self.steps += 1
        self._count(ppo_step, reason)

    def skip_update(self, ppo_step: int, reason: str) -> None:
        """One mini-batch update was skipped."""
        self.updates += 1
        self._count(ppo_step, reason)

    def passed(self) -> None:
        """An update went through: the run is healthy again."""
        self.consecutive = 0

    def _count(self, ppo_step: int, reason: str) -> None:
        self.consecutive += 1
        rank_zero_warn(f"PPO step {ppo_step}: update skipped because {reason}.")
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"Stopping: {self.consecutive} PPO updates in a row were skipped; the last because {reason}. {ADVICE}"
            )

    def state_dict(self) -> list[int]:
        return [self.steps, self.updates, self.consecutive]

    def load_state_dict(self, state: Any) -> None:
        self.steps, self.updates, self.consecutive = (int(v) for v in state)
