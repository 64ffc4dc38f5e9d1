"""Is a rollout batch degenerate? Pure checks that the PPO module runs after each rollout.

A policy that emits only end/pad tokens trains on empty responses (length 0, entropy 0, KL 0) and nothing in the
usual metrics looks wrong; a policy collapsed to one deterministic response has ~0 entropy per token. One such
batch can happen by chance; ``patience`` of them in a row deserve a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

ENTROPY_FLOOR = 1e-3
"""Nats per response token below which sampling is effectively deterministic."""


def degenerate_reason(mean_length: float, mean_token_entropy: float | None,
                      entropy_floor: float = ENTROPY_FLOOR) -> str | None:
    """Why a batch with these (global) means is degenerate, or None when it is not.

    mean_length: mean response length in tokens over the batch (every process's rows); mean_token_entropy:
    mean entropy (or mean -log-prob of the sampled tokens, its Monte-Carlo estimate) per response token, in
    nats; None when not measured."""
    if mean_length <= 0:
        return "every response is empty (length 0): the policy ends its responses at once"
    if mean_token_entropy is not None and mean_token_entropy < entropy_floor:
        return (f"the mean entropy is {mean_token_entropy:.2e} nats per response token (< {entropy_floor:g}): "
                "the policy samples the same tokens deterministically")
    return None


def degenerate_rollout(response_mask: Tensor, entropy: Tensor | None = None,
                       entropy_floor: float = ENTROPY_FLOOR) -> str | None:
    """:func:`degenerate_reason` of one process's batch.

    response_mask: [B, T], 1 on response tokens; entropy: [B, T] per-token entropy (or -log-prob of the sampled
    token) at the same positions, padding ignored; or None. Under several processes, reduce the length and
    entropy sums across processes and call :func:`degenerate_reason` instead (a rank's batch alone can be empty)."""
    mask = response_mask.float()
    tokens = float(mask.sum())
    mean_length = tokens / max(mask.shape[0], 1)
    if entropy is None or tokens == 0:
        return degenerate_reason(mean_length, None, entropy_floor)
    return degenerate_reason(mean_length, float((entropy.float() * mask).sum()) / tokens, entropy_floor)


@dataclass
class DegenerateWatch:
    """Counts degenerate batches in a row and says when to warn: once per streak, at ``patience`` batches.

    Keep it in the module's checkpoint state (``state_dict``) so that a resumed run continues the count."""

    patience: int = 3
    streak: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")

    def update(self, reason: str | None, ppo_step: int) -> str | None:
        """Record this batch's :func:`degenerate_reason`; the warning line when the streak reaches ``patience``."""
        self.streak = self.streak + 1 if reason is not None else 0
        if self.streak != self.patience:
            return None
        return (f"PPO step {ppo_step}: degenerate rollouts for {self.streak} steps in a row: {reason}. Check the "
                "generation settings (min_new_tokens, eos/pad tokens) and the learning rate.")

    def observe(self, stats: dict, ppo_step: int) -> int:
        """Check a step from its logged global statistics (``tokens/responses_len_mean`` and the sampled
        ``objective/entropy`` per response); warn once per streak; return the streak length."""
        length = float(stats["tokens/responses_len_mean"])
        entropy = float(stats["objective/entropy"]) / length if length > 0 else None
        line = self.update(degenerate_reason(length, entropy), ppo_step)
        if line:
            rank_zero_warn(line)
        return self.streak

    def state_dict(self) -> dict[str, int]:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.streak = int(state.get("streak", 0))
