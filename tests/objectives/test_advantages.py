"""Critic-free advantages (GRPO, RLOO, REINFORCE++), k3 KL and loss aggregation: hand-computed values,
invariants, and checks against obvious per-sample / per-group Python loops."""

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf import objectives
from lit_rlhf.models import full_kl_per_token


def discounted_returns_loop(rewards: list[float], gamma: float) -> list[float]:
    """G_t = r_t + gamma G_{t+1} for one unpadded response, with Python floats."""
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


# ------------------------------------------------------------------ choices and validation


def test_choice_lists_come_from_the_literals():
    assert objectives.ADVANTAGE_ESTIMATORS == ("gae", "grpo", "rloo", "reinforce_pp")
    assert objectives.LOSS_AGGREGATIONS == ("token_mean", "sequence_mean", "token_sum_norm")
    assert set(objectives.GROUP_ESTIMATORS) <= set(objectives.CRITIC_FREE_ESTIMATORS) <= set(objectives.ADVANTAGE_ESTIMATORS)


def test_scores_must_split_into_whole_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        objectives.grpo_advantages(torch.arange(6.0), 4)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        objectives.rloo_advantages(torch.arange(6.0), 1)


# ------------------------------------------------------------------ GRPO


def test_grpo_hand_computed():
    scores = torch.tensor([0.0, 3.0, 6.0, 2.0, 2.0, 2.0])
    # group 0: mean 3, deviations [-3, 0, 3], unbiased var (9 + 0 + 9) / 2 = 9, std 3 -> [-1, 0, 1] with eps 0
    # group 1: all equal -> 0
    assert_close(objectives.grpo_advantages(scores, 3, eps=0.0), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # default eps 1e-4 is added to the std (TRL): 3 / (3 + 1e-4)
    a = 3.0 / 3.0001
    assert_close(objectives.grpo_advantages(scores, 3), torch.tensor([-a, 0.0, a, 0.0, 0.0, 0.0]))
    # Dr. GRPO: no scaling, r - mean
    assert_close(objectives.grpo_advantages(scores, 3, scale=False), torch.tensor([-3.0, 0.0, 3.0, 0.0, 0.0, 0.0]))


def test_grpo_matches_per_group_loop():
    torch.manual_seed(0)
    k, scores = 4, torch.randn(20) * 3 + 1
    out = objectives.grpo_advantages(scores, k, eps=1e-4)
    out_unscaled = objectives.grpo_advantages(scores, k, scale=False)
    for g in range(len(scores) // k):
        group = scores[g * k:(g + 1) * k].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev: unbiased, as TRL and OpenRLHF
        for j, r in enumerate(group):
            assert out[g * k + j].item() == pytest.approx((r - mean) / (std + 1e-4), rel=1e-5, abs=1e-6)
            assert out_unscaled[g * k + j].item() == pytest.approx(r - mean, rel=1e-5, abs=1e-6)
    # each group is centred; scaled groups have unit std (up to eps)
    assert_close(out.view(-1, k).mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    assert_close(out.view(-1, k).std(1), torch.ones(5), atol=1e-3, rtol=0)


def test_grpo_all_equal_group_gives_zero_advantage_and_finite_loss():
    # In float32 the mean of three 51.958351135253906 is not that number: the rounding noise divided by eps
    # would be an advantage of about -0.036 (checked by hand with torch), not 0.
    r = 51.958351135253906
    g = torch.tensor([r] * 3)
    assert ((g - g.mean()) / (g.std() + 1e-4)).abs().max() > 0.01  # the naive formula on this group
    assert (objectives.grpo_advantages(torch.tensor([r] * 3 + [0.3] * 3), 3) == 0).all()
    scores = torch.tensor([1000.1] * 4 + [0.3] * 4)
    adv = objectives.grpo_advantages(scores, 4)
    assert (adv == 0).all()
    torch.manual_seed(8)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]] * 2)
    old = torch.randn(8, 3)
    logp = old.clone().requires_grad_(True)
    per_token = objectives.policy_loss_per_token(
        logp, old, objectives.broadcast_to_tokens(adv, mask), 0.2, ref_logprobs=old - 0.1, kl_coef=0.05
    )
    for mode in objectives.LOSS_AGGREGATIONS:
        loss = objectives.aggregate(per_token, mask, mode, norm_constant=3)
        (grad,) = torch.autograd.grad(loss, logp, retain_graph=True)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert loss.item() > 0  # only the KL term remains: beta * k3 > 0 where ref != logp


# ------------------------------------------------------------------ RLOO


def test_rloo_hand_computed():
    scores = torch.tensor([0.0, 3.0, 6.0, 1.0, 2.0, 6.0])
    # group 0: sum 9; baselines (9-0)/2 = 4.5, (9-3)/2 = 3, (9-6)/2 = 1.5 -> [-4.5, 0, 4.5]
    # group 1: sum 9; baselines 4, 3.5, 1.5                             -> [-3, -1.5, 4.5]
    assert_close(objectives.rloo_advantages(scores, 3), torch.tensor([-4.5, 0.0, 4.5, -3.0, -1.5, 4.5]))


def test_rloo_with_two_samples_is_plus_minus_the_difference():
    torch.manual_seed(1)
    for _ in range(20):
        scores = torch.randn(10) * 5
        adv = objectives.rloo_advantages(scores, 2).view(-1, 2)
        r = scores.view(-1, 2)
        assert_close(adv[:, 0], r[:, 0] - r[:, 1])
        assert_close(adv[:, 1], r[:, 1] - r[:, 0])


def test_rloo_matches_per_group_loop_and_scaled_grpo_relation():
    torch.manual_seed(2)
    k, scores = 4, torch.randn(12)
    out = objectives.rloo_advantages(scores, k)
    for g in range(3):
        group = scores[g * k:(g + 1) * k].tolist()
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            assert out[g * k + i].item() == pytest.approx(r - sum(others) / (k - 1), rel=1e-5, abs=1e-6)
    # RLOO = k / (k - 1) * (r - group mean)
    assert_close(out, k / (k - 1) * objectives.grpo_advantages(scores, k, scale=False), atol=1e-6, rtol=1e-5)


def test_broadcast_to_tokens_and_kl_shaped_scores():
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    expected = torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, -1.0]])
    assert_close(objectives.broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask), expected)
    kl = torch.tensor([[0.5, 1.0, 9.0], [2.0, 7.0, -1.0]])
    # row 0: 1 - 0.1 * (0.5 + 1) = 0.85; row 1: 2 - 0.1 * (2 - 1) = 1.9 (the 9 and the 7 are masked)
    assert_close(objectives.kl_shaped_scores(torch.tensor([1.0, 2.0]), kl, mask, 0.1), torch.tensor([0.85, 1.9]))


# ------------------------------------------------------------------ REINFORCE++


def test_reinforce_pp_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 99.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])  # a hole in row 1: its 99 is not a token
    adv, ret = objectives.reinforce_pp_advantages(rewards, mask, gamma=0.5)
    # row 0: G_2 = 2, G_1 = 0 + 0.5 * 2 = 1, G_0 = 1 + 0.5 * 1 = 1.5
    # row 1: G_2 = 1, G_0 = 3 + 0.5 * 1 = 3.5 (the hole is skipped, not discounted over)
    assert_close(ret, torch.tensor([[1.5, 1.0, 2.0], [3.5, 0.0, 1.0]]))
    # whitening over the 5 tokens: mean 9 / 5 = 1.8; deviations -0.3, -0.8, 0.2, 1.7, -0.8;
    # squares sum .09 + .64 + .04 + 2.89 + .64 = 4.3; unbiased var 4.3 / 4 = 1.075
    s = math.sqrt(1.075)
    expected = torch.tensor([[-0.3 / s, -0.8 / s, 0.2 / s], [1.7 / s, 0.0, -0.8 / s]])
    assert_close(adv, expected, atol=1e-6, rtol=1e-5)


def test_reinforce_pp_with_holes_equals_masked_positions_removed():
    torch.manual_seed(3)
    b, t = 5, 8
    rewards = torch.randn(b, t)
    mask = (torch.rand(b, t) > 0.35).long()
    mask[2] = 0  # an empty response
    noisy = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e4))  # garbage must not leak
    adv, ret = objectives.reinforce_pp_advantages(noisy, mask, gamma=0.9)
    # the same rows with masked positions removed, left-justified, padded at the end
    lengths = mask.sum(1)
    packed, packed_mask = torch.zeros(b, t), (torch.arange(t)[None] < lengths[:, None]).long()
    for i in range(b):
        packed[i, : lengths[i]] = rewards[i][mask[i].bool()]
    adv_p, ret_p = objectives.reinforce_pp_advantages(packed, packed_mask, gamma=0.9)
    for i in range(b):
        assert_close(ret[i][mask[i].bool()], ret_p[i, : lengths[i]])
        assert_close(adv[i][mask[i].bool()], adv_p[i, : lengths[i]])
        # and the returns equal the per-sample loop
        assert_close(ret[i][mask[i].bool()].tolist(), discounted_returns_loop(rewards[i][mask[i].bool()].tolist(), 0.9),
                     atol=1e-5, rtol=1e-5)
    assert (adv[~mask.bool()] == 0).all() and (ret[~mask.bool()] == 0).all()


def test_reinforce_pp_reduce_fn_whitens_over_the_global_batch():
    # A fake all-reduce that doubles the sums is what a second process holding the same batch contributes:
    # the result must equal the computation on the batch concatenated with itself.
    torch.manual_seed(4)
    rewards, mask = torch.randn(3, 6), torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 1, 0]])
    adv, ret = objectives.reinforce_pp_advantages(rewards, mask, 1.0, reduce_fn=lambda s: 2 * s)
    adv2, ret2 = objectives.reinforce_pp_advantages(torch.cat([rewards, rewards]), torch.cat([mask, mask]), 1.0)
    assert_close(adv, adv2[:3])
    assert_close(ret, ret2[:3])
    # and it differs from the local whitening (n - 1 vs 2n - 1 in the variance): the hook is really used
    assert not torch.allclose(adv, objectives.reinforce_pp_advantages(rewards, mask, 1.0)[0])


# ------------------------------------------------------------------ k3 KL


def test_k3_hand_computed_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0 + math.log(2.0), -2.0 - math.log(2.0), -0.5]])
    # d = ref - logp = [ln 2, -ln 2, 0]: e^d - d - 1 = [2 - ln 2 - 1, 1/2 + ln 2 - 1, 0]
    kl = objectives.k3_kl(logp, ref)
    assert_close(kl, torch.tensor([[1.0 - math.log(2.0), math.log(2.0) - 0.5, 0.0]]))
    # d/dlogp = 1 - e^d = [-1, 1/2, 0]
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert_close(grad, torch.tensor([[-1.0, 0.5, 0.0]]))


def test_k3_nonnegative_zero_at_equality_and_exact_in_expectation():
    torch.manual_seed(5)
    logp, ref = torch.randn(64, 32) * 3, torch.randn(64, 32) * 3
    assert (objectives.k3_kl(logp, ref) >= 0).all()
    assert (objectives.k3_kl(logp, logp) == 0).all()
    # tiny differences are kept (expm1), not rounded to 0: e^d - d - 1 ~ d^2 / 2
    assert objectives.k3_kl(torch.tensor([0.0]), torch.tensor([1e-3])).item() == pytest.approx(0.5e-6, rel=1e-3)
    # E_{v ~ p}[k3] = sum_v q(v) - sum_v p log(q/p) - 1 = KL(p || q): the exact KL ("full") for a whole distribution
    p = torch.log_softmax(torch.randn(3, 4, 7), -1)
    q = torch.log_softmax(torch.randn(3, 4, 7), -1)
    expectation = (p.exp() * objectives.k3_kl(p, q)).sum(-1)
    assert_close(expectation, full_kl_per_token(p, q), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ per-token loss and aggregation


def test_aggregate_hand_computed_and_masked_values_do_not_leak():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("inf")], [7.0, 8.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # row 2 is an empty response
    # token_mean: (1 + 2 + 4) / 3 tokens
    assert_close(objectives.aggregate(per_token, mask, "token_mean"), torch.tensor(7.0 / 3.0))
    # sequence_mean over the 2 non-empty rows: ((1 + 2) / 2 + 4 / 1) / 2 = 2.75
    assert_close(objectives.aggregate(per_token, mask, "sequence_mean"), torch.tensor(2.75))
    # token_sum_norm: 7 / (3 rows * 4)
    assert_close(objectives.aggregate(per_token, mask, "token_sum_norm", norm_constant=4), torch.tensor(7.0 / 12.0))
    with pytest.raises(ValueError, match="norm_constant"):
        objectives.aggregate(per_token, mask, "token_sum_norm")
    with pytest.raises(ValueError, match=r"model\.ppo\.loss_aggregation"):
        objectives.aggregate(per_token, mask, "sum")
    # an all-empty mini-batch gives 0, not NaN
    assert objectives.aggregate(per_token, torch.zeros_like(mask), "sequence_mean").item() == 0.0


def test_aggregate_matches_loop_and_token_mean_of_per_token_loss_is_policy_loss():
    torch.manual_seed(6)
    logp, old, adv = torch.randn(5, 7) * 0.3, torch.randn(5, 7) * 0.3, torch.randn(5, 7)
    mask = (torch.rand(5, 7) > 0.3).long()
    per_token = objectives.policy_loss_per_token(logp, old, adv, 0.2)
    assert_close(objectives.aggregate(per_token, mask, "token_mean"), (per_token * mask).sum() / mask.sum())
    assert_close(objectives.policy_loss(logp, old, adv, mask, 0.2), (per_token * mask).sum() / mask.sum())
    rows = [per_token[i][mask[i].bool()].tolist() for i in range(5)]
    seq = [sum(r) / len(r) for r in rows if r]
    assert objectives.aggregate(per_token, mask, "sequence_mean").item() == pytest.approx(sum(seq) / len(seq), rel=1e-5)
    total = sum(sum(r) for r in rows)
    assert objectives.aggregate(per_token, mask, "token_sum_norm", 7).item() == pytest.approx(total / (5 * 7), rel=1e-5)


def test_policy_loss_per_token_hand_computed_with_k3_term():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    adv = torch.tensor([[2.0, 1.0, -1.0]])
    ref = logp + torch.tensor([[math.log(2.0), 0.0, 0.0]])
    # surrogate (as in test_ppo): [-2, max(-1.5, -1.2) = -1.2, max(0.5, 0.8) = 0.8]
    # k3 with d = ref - logp = [ln 2, 0, 0]: [1 - ln 2, 0, 0]; beta 0.5
    out = objectives.policy_loss_per_token(logp, old, adv, 0.2, ref_logprobs=ref, kl_coef=0.5)
    assert_close(out, torch.tensor([[-2.0 + 0.5 * (1.0 - math.log(2.0)), -1.2, 0.8]]))
    assert_close(objectives.policy_loss_per_token(logp, old, adv, 0.2), torch.tensor([[-2.0, -1.2, 0.8]]))
    with pytest.raises(ValueError, match="ref_logprobs"):
        objectives.policy_loss_per_token(logp, old, adv, 0.2, kl_coef=0.1)
    # one advantage per sample broadcasts as [B, 1]; a bare [B] is refused (it would broadcast along T)
    # A = 1: [-1, max(-1.5, -1.2), max(-0.5, -0.8)] = [-1, -1.2, -0.5]
    assert_close(objectives.policy_loss_per_token(logp, old, torch.tensor([[1.0]]), 0.2), torch.tensor([[-1.0, -1.2, -0.5]]))
    with pytest.raises(ValueError, match="broadcast_to_tokens"):
        objectives.policy_loss_per_token(logp, old, torch.tensor([1.0]), 0.2)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "token_sum_norm"])
def test_aggregate_reduce_fn_gives_the_global_mean_under_gradient_averaging(mode):
    # Two processes with different token counts. With reduce_fn summing [count, 1] over both, the mean over
    # processes of their losses (and of their gradients, as DDP averages them) is the loss of the concatenation.
    torch.manual_seed(7)
    x1 = torch.randn(2, 5, requires_grad=True)
    x2 = torch.randn(3, 5, requires_grad=True)
    m1 = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    m2 = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])

    def counts(m):  # what each process contributes to the all-reduce
        n = {"token_mean": m.sum(), "sequence_mean": (m.sum(1) > 0).sum(), "token_sum_norm": m.shape[0]}[mode]
        return torch.tensor([float(n), 1.0], dtype=torch.float64)

    loss1 = objectives.aggregate(x1, m1, mode, 5, reduce_fn=lambda s: s + counts(m2))
    loss2 = objectives.aggregate(x2, m2, mode, 5, reduce_fn=lambda s: s + counts(m1))
    x = torch.cat([x1, x2]).detach().requires_grad_(True)
    global_loss = objectives.aggregate(x, torch.cat([m1, m2]), mode, 5)
    assert_close((loss1 + loss2) / 2, global_loss)
    g1, g2 = torch.autograd.grad(loss1, x1)[0], torch.autograd.grad(loss2, x2)[0]
    (g,) = torch.autograd.grad(global_loss, x)
    assert_close(torch.cat([g1, g2]) / 2, g)
    if mode == "token_mean":  # 9 vs 3 tokens: the per-process mean would weigh them differently
        local = (objectives.aggregate(x1, m1, mode) + objectives.aggregate(x2, m2, mode)) / 2
        assert not torch.allclose(local, global_loss)


# ------------------------------------------------------------------ group statistics


def test_group_stats_hand_computed_and_global():
    scores = torch.tensor([0.0, 3.0, 6.0, 2.0, 2.0, 2.0])
    stats = objectives.group_stats(scores, 3)
    # group means 3 and 2 -> 2.5; stds 3 and 0 -> 1.5; one of two groups all equal -> 0.5
    assert_close(stats["env/group_reward_mean"], torch.tensor(2.5))
    assert_close(stats["env/group_reward_std"], torch.tensor(1.5))
    assert_close(stats["env/group_zero_std_frac"], torch.tensor(0.5))
    # another process holding one group [1, 1, 4] (mean 2, std sqrt(3), not all equal)
    other = torch.tensor([2.0, math.sqrt(3.0), 0.0, 1.0], dtype=torch.float64)
    stats = objectives.group_stats(scores, 3, reduce_fn=lambda s: s + other)
    assert_close(stats["env/group_reward_mean"], torch.tensor(7.0 / 3.0))
    assert_close(stats["env/group_reward_std"], torch.tensor((3.0 + math.sqrt(3.0)) / 3.0))
    assert_close(stats["env/group_zero_std_frac"], torch.tensor(1.0 / 3.0))
    # k = 1: no within-group spread, and every "group" is trivially all equal
    assert objectives.group_stats(scores, 1)["env/group_reward_std"].item() == 0.0
