"""Preference losses (DPO, cDPO, IPO, ODPO's margin; Bradley-Terry) and their statistics, by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.objectives import bradley_terry_loss, dpo_loss, preference_stats, sequence_logps


def test_losses_match_hand_computed_values():
    """Formulas compared with TRL's ``DPOTrainer.dpo_loss`` (trl/trainer/dpo_trainer.py: sigmoid with
    label_smoothing, ipo ``(logits - 1/(2 beta))**2``, rewards ``beta * (policy - reference)`` logps)."""
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0])
    # h = (pc - rc) - (pr - rr) = [1 - (-1), -1 - 1] = [2, -2]
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert_close(loss, torch.tensor([-math.log(sig(1.0)), -math.log(sig(-1.0))]))
    assert_close(chosen, torch.tensor([0.5, -0.5]))  # 0.5 * (pc - rc)
    assert_close(rejected, torch.tensor([-0.5, 0.5]))  # 0.5 * (pr - rr)
    # cDPO, eps = 0.1: -(0.9) log sig(1) - 0.1 log sig(-1) for the first pair
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    expected = [-0.9 * math.log(sig(x)) - 0.1 * math.log(sig(-x)) for x in (1.0, -1.0)]
    assert_close(smoothed, torch.tensor(expected))
    # IPO, beta = 0.5: (h - 1)^2 = [1, 9]
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert_close(ipo, torch.tensor([1.0, 9.0]))


def test_a_margin_offsets_the_dpo_logit():
    # ODPO: loss = -log sigma(beta h - m); h = [2, -2] as above, beta = 0.5, m = [0.5, -1] -> logits [0.5, 0]
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0])
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, margin=torch.tensor([0.5, -1.0]))
    assert_close(loss, torch.tensor([math.log1p(math.exp(-0.5)), math.log(2.0)]))
    with pytest.raises(ValueError, match="data.margin_column.*model.loss_type=ipo"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", margin=torch.tensor([0.5, -1.0]))


def test_sequence_logps_sum_or_mean_over_the_response_mask():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert_close(sequence_logps(logprobs, mask), torch.tensor([-3.0, -3.0]))
    assert_close(sequence_logps(logprobs, mask, average=True), torch.tensor([-1.5, -3.0]))


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log σ(1) = log(1 + e^-1) = 0.31326; -log σ(-1) = log(1 + e) = 1.31326; mean 0.81326
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    # margin 1 on the first pair: -log σ(0) = log 2; the second pair -log σ(-1 - 0.5)
    margin = torch.tensor([1.0, 0.5])
    expected = (math.log(2) + math.log1p(math.exp(1.5))) / 2
    assert_close(bradley_terry_loss(chosen, rejected, margin), torch.tensor(expected))
    # centering 0.1 adds 0.1 * mean((2 + 1)^2, (0 + 1)^2) = 0.1 * 5 = 0.5
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2 + 0.5
    assert_close(bradley_terry_loss(chosen, rejected, center_coef=0.1), torch.tensor(expected))


def test_preference_stats_count_ties_as_wrong():
    stats = preference_stats(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 0.0, 4.0]))
    assert_close(stats["accuracy"], torch.tensor(1 / 3))
    assert_close(stats["margin"], torch.tensor(0.0))
