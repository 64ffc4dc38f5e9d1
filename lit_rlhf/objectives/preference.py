"""Preference losses over tensors: DPO/IPO from the responses' log-probabilities, Bradley-Terry for reward models.

Legend: ``B`` pairs in a batch, ``T`` response tokens.

The losses are pure functions of per-row sequence log-probabilities or rewards (torch only, no loops over rows):

* ``sigmoid``: DPO, Rafailov et al. 2023 (arXiv:2305.18290, eq. 7), with the conservative label smoothing
  of cDPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf, eq. 3);
* ``ipo``: IPO, Azar et al. 2023 (arXiv:2310.12036, eq. 17);
* ``bradley_terry_loss``: a reward model's loss on its rewards of the chosen and rejected responses (Bradley &
  Terry 1952).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal["sigmoid", "ipo"]


def sequence_logps(logprobs: Tensor, response_mask: Tensor, average: bool = False) -> Tensor:
    """Per-row log-probability of each response: the sum of its tokens' log-probs, or with ``average`` their
    mean (TRL's IPO divides by the response length). logprobs, response_mask: [B, T] -> [B]."""
    mask = response_mask.to(logprobs.dtype)
    total = (logprobs * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
    beta: float = 0.1, loss_type: DPOLossType = "sigmoid", label_smoothing: float = 0.0, margin: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss and implicit rewards from the responses' log-probs, [B] each.

    With h = (pc - rc) - (pr - rr), the policy's log-ratio margin of chosen over rejected against the reference's,
    and the logit z = beta h - m (m: each pair's ``margin`` [B], 0 without one):

    * ``sigmoid`` (DPO, arXiv:2305.18290 eq. 7; cDPO's label smoothing eps, Mitchell 2023 eq. 3):
      ``-(1 - eps) logsigmoid(z) - eps logsigmoid(-z)``. The margin is ODPO's offset (Amini et al. 2024,
      arXiv:2402.10571): the chosen response must beat the rejected one by m in implicit reward before
      the loss lets go, with the sign of the reward model's Bradley-Terry margin (``reward_model``);
    * ``ipo`` (arXiv:2310.12036 eq. 17, beta is the paper's tau): ``(h - 1 / (2 beta))^2`` (no margin: IPO
      already regresses h to a fixed target).

    Returns (loss, chosen_rewards, rejected_rewards): the rewards are ``beta (pc - rc)`` and ``beta (pr - rr)``,
    detached (diagnostics)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    check_margin(loss_type, margin is not None)
    if loss_type == "sigmoid":
        logits = beta * h - (margin if margin is not None else 0.0)
        loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"model.loss_type must be sigmoid or ipo, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return loss, chosen_rewards, rejected_rewards


def check_margin(loss_type: str, has_margin: bool) -> None:
    """Refuse per-pair margins (``data.margin_column``) with a loss that has no place for them."""
    if has_margin and loss_type != "sigmoid":
        raise ValueError(f"data.margin_column gives each pair a margin, which model.loss_type={loss_type} does not "
                         "use: use model.loss_type=sigmoid or leave data.margin_column unset")


@torch.no_grad()
def preference_metrics(
    loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen: Tensor, policy_rejected: Tensor,
) -> dict[str, Tensor]:
    """Batch means under TRL's DPOTrainer names: ``loss``, ``rewards/{chosen,rejected,accuracies,margins}``
    (accuracy: the fraction of pairs whose chosen reward is larger) and ``logps/{chosen,rejected}``."""
    return {
        "loss": loss.mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None, center_coef: float = 0.0
) -> Tensor:
    """Bradley-Terry loss of a reward model, mean over the B pairs. Scalar.

    loss = -log σ(r_c - r_r - m) + center_coef · (r_c + r_r)²
    (Bradley & Terry 1952; the margin m as in Llama 2, arXiv:2307.09288 eq. 2; the centering term, which keeps
    rewards near zero mean without changing their order, as in Eisenstein et al. arXiv:2312.09244).
    ``chosen_rewards``, ``rejected_rewards``, ``margin``: [B].
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss.mean()


@torch.no_grad()
def preference_stats(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """``accuracy``: the fraction of pairs with r_c > r_r (ties count as wrong); ``margin``: mean r_c - r_r."""
    diff = (chosen_rewards - rejected_rewards).float()
    return {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
