"""Which responses the policy loss is over, and DAPO's length penalty: groups without signal (all scores equal),
truncated responses left out or punished.

Legend: ``B`` responses, ``k`` samples per prompt (rows of one prompt contiguous: row i is in group i // k).
The rows kept are a [B] bool mask, ``loss_rows`` of ``ppo_objective`` and ``loss_counts``: the policy term is a
mean over the kept responses only (its denominators count only them).

Sources:
    DAPO: Yu et al. 2025, arXiv:2503.14476 (dynamic sampling, eq. 11; soft overlong punishment, eq. 13).
    TRL's GRPOTrainer ``mask_truncated_completions`` (truncated completions out of the loss), 1.x.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

from lit_rlhf.objectives.critic_free import zero_std_groups

Overlong = Literal["none", "mask", "penalty"]
OVERLONG_MODES: tuple[str, ...] = get_args(Overlong)


def zero_std_rows(scores: Tensor, k: int) -> Tensor:
    """True for the rows of groups whose k scores are all equal (``critic_free.zero_std_groups``, which
    ``group_stats``' zero-std share counts). [B] -> [B] bool."""
    return zero_std_groups(scores, k).repeat_interleave(k)


def overlong_penalty(lengths: Tensor, limits: Tensor, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (eq. 13) of each response, with L_max its own length limit. [B] each -> [B]:

        0                                   |y| <= L_max - L_cache
        (L_max - L_cache - |y|) / L_cache   L_max - L_cache < |y| <= L_max   (down to -1 at the limit)
        -1                                  |y| > L_max
    ``buffer`` is L_cache (> 0). As verl's ``overlong_buffer``: min(-(|y| - (L_max - L_cache)) / L_cache, 0),
    bounded below by -1."""
    if buffer < 1:
        raise ValueError(f"the overlong buffer must be >= 1 token, got {buffer}")
    excess = lengths.double() - (limits.to(lengths.device).double() - buffer)  # tokens into the buffer
    return (-excess / buffer).clamp(min=-1.0, max=0.0).float()
