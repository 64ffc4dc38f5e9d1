"""PPO math against hand-computed values and an independent per-sample loop implementation."""

import math

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf import objectives


# ------------------------------------------------------------------ independent reference (plain loops)


def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """GAE for one unpadded episode, written straight from the paper with Python floats."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def rows(x: torch.Tensor, mask: torch.Tensor, i: int) -> list[float]:
    return x[i][mask[i].bool()].tolist()


# ------------------------------------------------------------------ masked statistics


def test_masked_mean_and_var_hand_computed():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # kept: 1, 2, 3, 6 -> mean 3; squared deviations 4 + 1 + 0 + 9 = 14; unbiased var 14 / 3
    assert_close(objectives.masked_mean(x, mask), torch.tensor(3.0))
    assert_close(objectives.masked_var(x, mask), torch.tensor(14.0 / 3.0))
    # per-row means: (1 + 2) / 2, (3 + 6) / 2
    assert_close(objectives.masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.5]))


def test_masked_mean_empty_mask_is_zero_not_nan():
    assert objectives.masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_masked_whiten_equals_whiten_of_kept_values():
    torch.manual_seed(2)
    x = torch.randn(4, 6) * 3 + 2
    mask = (torch.rand(4, 6) > 0.3).long()
    kept = x[mask.bool()]
    expected = (kept - kept.mean()) / torch.sqrt(kept.var(unbiased=True) + 1e-8)
    out = objectives.masked_whiten(x, mask)
    assert_close(out[mask.bool()], expected)
    assert (out[~mask.bool()] == 0).all()
    # whitening properties: mean 0, unbiased variance 1 over the masked entries
    assert_close(objectives.masked_mean(out, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(objectives.masked_var(out, mask), torch.tensor(1.0), atol=1e-5, rtol=0)
    # shift_mean=False keeps the mean
    assert_close(objectives.masked_mean(objectives.masked_whiten(x, mask, shift_mean=False), mask), kept.mean(), atol=1e-5, rtol=0)


def test_masked_whiten_reduce_hook_sees_global_statistics():
    # Two "processes" hold different token counts; summing [Σx, Σx², n] through the hook must give the
    # statistics of the concatenation (what an all-reduce does under DDP).
    torch.manual_seed(3)
    x1, m1 = torch.randn(2, 5), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    x2, m2 = torch.randn(3, 5) + 4, torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    other = torch.stack([(x2 * m2).sum(), (x2 * x2 * m2).sum(), m2.sum()]).double()
    calls = []

    def all_reduce(stats):
        calls.append(stats)
        return stats + other

    out = objectives.masked_whiten(x1, m1, reduce_fn=all_reduce)
    kept = torch.cat([x1[m1.bool()], x2[m2.bool()]])
    expected = (x1 - kept.mean()) / torch.sqrt(kept.var() + 1e-8) * m1
    assert len(calls) == 1
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ KL estimators and rewards


def test_kl_estimators_hand_computed():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # d = logp - ref = [0.5, -1.0]
    assert_close(objectives.kl_penalty(logp, ref, "kl"), torch.tensor([[0.5, -1.0]]))
    assert_close(objectives.kl_penalty(logp, ref, "abs"), torch.tensor([[0.5, 1.0]]))
    assert_close(objectives.kl_penalty(logp, ref, "mse"), torch.tensor([[0.125, 0.5]]))


def test_kl_full_is_refused_from_sampled_logprobs():
    # the exact KL needs both distributions: the policy computes it (tests/models/test_lm.py), not kl_penalty
    p = torch.log(torch.tensor([[0.5]]))
    q = torch.log(torch.tensor([[0.25]]))
    with pytest.raises(ValueError, match="full"):
        objectives.kl_penalty(p, q, "full")
    with pytest.raises(ValueError, match="kl_estimator"):
        objectives.kl_penalty(p[..., 0], q[..., 0], "bogus")


def test_compute_rewards_places_score_on_each_last_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1]])  # full, shorter, hole in the middle
    scores = torch.tensor([10.0, 20.0, 30.0])
    # kl (k1) = logp - ref; unmasked it is row 0 [0.5, 0, -0.5]; row 1 [0, -1, 0]; row 2 [0, 0, 0]
    rewards, non_score = objectives.compute_rewards(scores, objectives.kl_penalty(logp, ref, "kl"), mask, kl_coef=0.1)
    # masked positions get no penalty even when the KL given there is not 0
    assert_close(non_score, -0.1 * torch.tensor([[0.5, 0.0, -0.5], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.0, 0.05 + 10.0], [0.0, 0.1 + 20.0, 0.0], [0.0, 0.0, 30.0]])
    assert_close(rewards, expected)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert objectives.last_token_index(mask).tolist() == [2, 0, 0, 2]


# ------------------------------------------------------------------ GAE


def test_gae_hand_computed():
    # one episode of 2 tokens, gamma 1, lam 0.5: r = [0, 1], V = [0.5, 0.25]
    # delta_1 = 1 + 0 - 0.25 = 0.75;   A_1 = 0.75
    # delta_0 = 0 + 0.25 - 0.5 = -0.25; A_0 = -0.25 + 0.5 * 0.75 = 0.125
    adv, ret = objectives.compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 0.5)
    assert_close(adv, torch.tensor([[0.125, 0.75]]))
    assert_close(ret, torch.tensor([[0.625, 1.0]]))


def test_gae_gamma_lam_zero_gives_reward_minus_value():
    torch.manual_seed(4)
    r, v = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.ones(3, 4)
    adv, ret = objectives.compute_gae(r, v, mask, gamma=0.0, lam=0.0)
    assert_close(adv, r - v)
    assert_close(ret, r)


def test_gae_matches_per_sample_loop_with_variable_lengths_and_holes():
    torch.manual_seed(5)
    b, t = 6, 9
    rewards, values = torch.randn(b, t), torch.randn(b, t)
    lengths = torch.tensor([9, 1, 4, 7, 0, 2])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    mask[3, 2] = 0  # a hole in the middle of a row: must behave as if the token were absent
    mask[3, 5] = 0
    # garbage beyond the mask must not leak into the result
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e3))
    adv, ret = objectives.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i in range(b):
        exp_adv, exp_ret = gae_loop(rows(rewards, mask, i), rows(values, mask, i), 0.9, 0.8)
        assert_close(rows(adv, mask, i), exp_adv, atol=1e-5, rtol=1e-5)
        assert_close(rows(ret, mask, i), exp_ret, atol=1e-5, rtol=1e-5)
    assert (adv[~mask.bool()] == 0).all() and (ret[~mask.bool()] == 0).all()


def test_rewards_then_gae_equal_loop_on_padded_batch():
    # The full pipeline on a padded batch (one short sample in the middle) equals the per-sample loop.
    torch.manual_seed(6)
    logp, ref, values = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    scores = torch.tensor([1.0, -2.0, 0.5])
    rewards, _ = objectives.compute_rewards(scores, objectives.kl_penalty(logp, ref), mask, kl_coef=0.2)
    adv, _ = objectives.compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    for i in range(3):
        n = int(mask[i].sum())
        r = [-0.2 * (a - b) for a, b in zip(logp[i, :n].tolist(), ref[i, :n].tolist())]
        r[-1] += scores[i].item()
        exp_adv, _ = gae_loop(r, values[i, :n].tolist(), 1.0, 0.95)
        assert_close(adv[i, :n].tolist(), exp_adv, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ losses


def test_policy_loss_hand_computed_with_clipping():
    # ratios e^0 = 1, e^{ln 1.5} = 1.5 (clipped to 1.2 for A > 0), e^{ln 0.5} = 0.5 (clip 0.8 for A < 0)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    adv = torch.tensor([[2.0, 1.0, -1.0]])
    # token 0: max(-2*1, -2*1) = -2
    # token 1: max(-1*1.5, -1*1.2) = -1.2
    # token 2: max(1*0.5, 1*0.8) = 0.8          -> mean (-2 - 1.2 + 0.8) / 3 = -0.8
    loss = objectives.policy_loss(logp, old, adv, torch.ones(1, 3), clip_range=0.2)
    assert_close(loss, torch.tensor(-0.8))


def test_policy_loss_ignores_masked_tokens_and_gradient_is_clipped():
    logp = torch.log(torch.tensor([[1.0, 1.5, 3.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1e6]])
    loss = objectives.policy_loss(logp, torch.zeros(1, 3), adv, torch.tensor([[1, 1, 0]]), clip_range=0.2)
    loss.backward()
    # token 0 unclipped: d/dlogp (-A ratio)/2 = -0.5; token 1 clipped: no gradient; token 2 masked
    assert_close(logp.grad, torch.tensor([[-0.5, 0.0, 0.0]]))
    assert_close(loss, torch.tensor((-1.0 - 1.2) / 2))


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    # token 0: V_clip = 0.5 + clip(0.5, -0.2, 0.2) = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69
    # token 1: V = V_clip = 0; (0-1)^2 = 1                   -> 0.5 * (1.69 + 1) / 2 = 0.6725
    loss = objectives.value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    assert_close(loss, torch.tensor(0.6725))


def test_diagnostics_ratio_one_gives_zero_clipfrac_and_kl():
    torch.manual_seed(7)
    logp, values = torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    d = objectives.ppo_diagnostics(logp, logp.clone(), values, values.clone(), mask, 0.2, 0.2)
    assert d["policy/clipfrac"].item() == 0.0 and d["val/clipfrac"].item() == 0.0
    assert d["policy/approxkl"].item() == 0.0 and d["policy/approxkl_k3"].item() == 0.0
    assert d["policy/ratio_mean"].item() == 1.0 and d["policy/ratio_max"].item() == 1.0


def test_diagnostics_hand_computed():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 9.0]]))
    mask = torch.tensor([[1, 1, 0]])  # the 9.0 ratio is masked out
    d = objectives.ppo_diagnostics(logp, old, torch.tensor([[0.0, 0.5, 0.0]]), torch.zeros(1, 3), mask, 0.2, 0.2)
    assert_close(d["policy/clipfrac"], torch.tensor(0.5))
    assert_close(d["val/clipfrac"], torch.tensor(0.5))
    assert_close(d["policy/ratio_max"], torch.tensor(1.5))
    assert_close(d["policy/approxkl"], torch.tensor(0.5 * math.log(1.5) ** 2 / 2))
    assert_close(d["policy/approxkl_k3"], torch.tensor((0.5 - math.log(1.5)) / 2))


# ------------------------------------------------------------------ KL controllers


def test_adaptive_kl_controller_update_and_state():
    ctl = objectives.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=16)  # error clip(9/6 - 1) = 0.2 -> beta * (1 + 0.2 * 16/10000)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 16 / 10000))
    ctl.update(current_kl=5.4, n_steps=16)  # error 5.4/6 - 1 = -0.1
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 16 / 10000) * (1 - 0.1 * 16 / 10000))
    restored = objectives.AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()


def test_fixed_kl_controller_is_constant():
    ctl = objectives.FixedKLController(0.3)
    ctl.update(100.0, 16)
    assert ctl.value == 0.3
    other = objectives.FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.3


def test_adaptive_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError):
        objectives.AdaptiveKLController(0.2, target=0.0, horizon=10)


# ------------------------------------------------------------------ scores, mini-batches, step statistics


def test_shape_scores_scales_then_clips():
    scores = torch.tensor([-3.0, 0.5, 2.0])
    # x 2 -> [-6, 1, 4], clipped to [-3, 3] -> [-3, 1, 3]
    assert_close(objectives.shape_scores(scores, scale=2.0, clip=3.0), torch.tensor([-3.0, 1.0, 3.0]))
    assert_close(objectives.shape_scores(scores, scale=2.0, clip=None), torch.tensor([-6.0, 1.0, 4.0]))
    assert_close(objectives.shape_scores(scores), scores)


def test_minibatch_groups_by_length_or_shuffled():
    lengths = torch.tensor([5, 1, 4, 2, 3, 6])
    torch.manual_seed(0)
    by_length = objectives.minibatch_groups(lengths, 2, by_length=True)
    # sorted by length: rows 1 (1), 3 (2) | 4 (3), 2 (4) | 0 (5), 5 (6); the groups come in a random order
    assert sorted(g.tolist() for g in by_length) == [[0, 5], [1, 3], [4, 2]]
    shuffled = objectives.minibatch_groups(lengths, 2, by_length=False)
    rows = sorted(i for g in shuffled for i in g.tolist())
    assert rows == list(range(6)) and all(len(g) == 2 for g in shuffled)
    # with by_length=False the rows are drawn at random: some draw pairs rows of different length classes
    torch.manual_seed(1)
    draws = [{tuple(sorted(g.tolist())) for g in objectives.minibatch_groups(lengths, 2, False)} for _ in range(20)]
    assert any(d != {(0, 5), (1, 3), (2, 4)} for d in draws)


def test_masked_moments_many_equals_one_at_a_time_and_reduces_once():
    torch.manual_seed(7)
    a, b = torch.randn(4), torch.randn(3, 5)
    mask_a, mask_b = torch.ones(4), (torch.rand(3, 5) > 0.4).float()
    calls = []

    def reduce(t):
        calls.append(t.shape)
        return t

    mean, var, n = objectives.masked_moments_many([(a, mask_a), (b, mask_b)], reduce)
    assert calls == [torch.Size([2, 3])]  # one reduction for both statistics
    for i, (x, m) in enumerate([(a, mask_a), (b, mask_b)]):
        values = x[m.bool()]
        assert_close(mean[i].float(), values.mean())
        assert_close(var[i].float(), values.var())
        assert n[i] == len(values)


def test_rollout_statistics_over_processes_equal_those_of_the_concatenated_batch():
    # a second "process" whose sums are added by the reduce function: statistics equal the concatenation's
    torch.manual_seed(8)

    def batch(rows):
        mask = torch.ones(rows, 4)
        mask[0, 2:] = 0
        return dict(scores=torch.randn(rows), kl=torch.randn(rows), non_score=torch.randn(rows, 4),
                    logprobs=-torch.rand(rows, 4), values=torch.randn(rows, 4), returns=torch.randn(rows, 4),
                    raw_advantages=torch.randn(rows, 4), advantages=torch.randn(rows, 4), response_mask=mask,
                    reward_parts={"a": torch.randn(rows)})

    mine, other = batch(3), batch(5)
    other_stats = {}

    def capture(t):
        other_stats["sums"] = t
        return t

    objectives.rollout_statistics(**other, reduce_fn=capture)
    local = objectives.rollout_statistics(**mine, reduce_fn=lambda t: t + other_stats["sums"])
    both = {k: torch.cat([mine[k], other[k]]) for k in mine if k != "reward_parts"}
    expected = objectives.rollout_statistics(**both, reward_parts={"a": torch.cat([mine["reward_parts"]["a"],
                                                                           other["reward_parts"]["a"]])})
    assert local.keys() == expected.keys()
    for key in expected:
        assert_close(local[key], expected[key], msg=key)
    # hand check of two names: the reward mean and the per-token returns mean over real tokens only
    assert_close(expected["env/reward_mean"], both["scores"].mean())
    assert_close(expected["ppo/returns/mean"], both["returns"][both["response_mask"].bool()].mean())
    assert {"env/reward/a_mean", "objective/kl", "ppo/val/var_explained", "tokens/responses_len_mean"} <= set(expected)


def test_combined_micro_batch_statistics_stay_on_their_device():
    # reduced across processes afterwards beside the (GPU) gradient norm: no silent move to the CPU
    parts = [({"loss/policy": torch.ones((), device="meta"), "policy/ratio_max": torch.ones((), device="meta"),
               "policy/clipfrac": torch.ones((), device="meta")}, n) for n in (3, 5)]
    out = objectives.combine_micro_batches(parts)
    assert {v.device.type for v in out.values()} == {"meta"}
