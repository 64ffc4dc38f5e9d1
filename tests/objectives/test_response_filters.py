"""Responses left out of the policy loss (groups of equal scores, truncated responses) and DAPO's overlong penalty,
against hand-computed values."""

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf import objectives
from lit_rlhf.objectives import PolicyVariant

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
ADVANTAGES = torch.tensor([[1.0, 2.0, 3.0, 9.0], [10.0, 10.0, 9.0, 9.0], [0.5, 0.5, 0.5, 0.5]])
KEEP = torch.tensor([True, False, True])


def test_zero_std_rows_mark_whole_groups_of_equal_scores():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    assert objectives.zero_std_rows(scores, 2).tolist() == [True, True, False, False, True, True]
    assert objectives.zero_std_rows(scores, 3).tolist() == [False] * 6
    nearly = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, 1e-7])  # equal means exactly equal
    assert objectives.zero_std_rows(nearly, 3).tolist() == [True] * 3 + [False] * 3
    with pytest.raises(ValueError, match="groups of 4"):
        objectives.zero_std_rows(scores, 4)


def test_overlong_penalty_is_dapos_soft_punishment():
    # L_max 10, L_cache 4: 0 up to 6 tokens, then -1/4 per token, -1 at the limit (and beyond)
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    assert objectives.overlong_penalty(lengths, torch.full((6,), 10), 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # each response's own limit is its L_max; a buffer longer than the limit punishes from the first token
    penalty = objectives.overlong_penalty(torch.tensor([4, 4, 1]), torch.tensor([5, 100, 3]), 4)
    assert_close(penalty, torch.tensor([-0.75, 0.0, -0.5]))
    with pytest.raises(ValueError, match=">= 1 token"):
        objectives.overlong_penalty(lengths, lengths, 0)


def objective(logprobs, mode, loss_rows=None, counts=None, mask=MASK, advantages=ADVANTAGES, entropy=None):
    zeros = torch.zeros_like(advantages)
    return objectives.ppo_objective(
        logprobs, logprobs.detach(), None, zeros, advantages, zeros, mask, 0.2, 0.2, 0.1, mode, 4.0, counts=counts,
        loss_rows=loss_rows, variant=PolicyVariant(entropy_coef=0.0 if entropy is None else 0.1), entropy=entropy)


@pytest.mark.parametrize("mode, expected", [
    ("token_mean", -(1 + 2 + 3 + 4 * 0.5) / 7),  # the kept rows' 7 tokens
    ("sequence_mean", -(2.0 + 0.5) / 2),  # the mean of the kept rows' means
    ("token_sum_norm", -(6 + 2) / (2 * 4.0)),  # 2 kept rows x the constant 4
])
def test_the_loss_is_a_mean_over_the_kept_rows_only(mode, expected):
    # ratio 1: every kept token's loss is -A (no clipping binds); row 1's large advantages must not count
    logprobs = (-torch.rand(3, 4)).requires_grad_(True)
    loss, stats = objective(logprobs, mode, KEEP)
    assert_close(loss, torch.tensor(expected))
    # the same as the loss of the kept rows alone
    kept = objective(logprobs[KEEP].detach(), mode, mask=MASK[KEEP], advantages=ADVANTAGES[KEEP])[0]
    assert_close(loss, kept)
    loss.backward()
    assert (logprobs.grad[1] == 0).all() and (logprobs.grad[0, :3] != 0).all() and (logprobs.grad[2] != 0).all()
    # the diagnostics still describe every response token
    assert stats["policy/ratio_mean"] == 1.0


def test_micro_batches_over_kept_rows_add_up_and_leave_out_the_entropy_bonus_too():
    logprobs = (-torch.rand(3, 4)).requires_grad_(True)
    entropy = torch.rand(3, 4, requires_grad=True)
    whole = objective(logprobs, "token_mean", KEEP, entropy=entropy)[0]
    counts = objectives.loss_counts(MASK, "token_mean", False, KEEP)
    assert counts[0] == 7
    parts = [objective(logprobs[rows], "token_mean", KEEP[rows], counts, MASK[rows], ADVANTAGES[rows],
                       entropy[rows])[0] for rows in (slice(0, 2), slice(2, 3))]
    assert_close(parts[0] + parts[1], whole)
    whole.backward()
    assert (entropy.grad[1] == 0).all()
    assert_close(entropy.grad[0, :3], torch.full((3,), -0.1 / 7))


def test_nothing_kept_gives_a_zero_loss_and_no_gradient():
    logprobs = (-torch.rand(3, 4)).requires_grad_(True)
    loss = objective(logprobs, "sequence_mean", torch.zeros(3, dtype=torch.bool))[0]
    loss.backward()
    assert loss == 0.0 and (logprobs.grad == 0).all()


def test_every_row_kept_is_todays_loss():
    logprobs = -torch.rand(3, 4)
    for mode in objectives.LOSS_AGGREGATIONS:
        assert torch.equal(objective(logprobs, mode, torch.ones(3, dtype=torch.bool))[0], objective(logprobs, mode)[0])
