"""The policy-term variants (clip-higher, GSPO, GSPO-token, CISPO, entropy bonus) against plain-loop references
written from the papers, their gradients against autograd-free formulas, and the ratio-1 invariant."""

import math

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf import objectives
from lit_rlhf.objectives import PolicyVariant

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
VARIANTS = [
    PolicyVariant(clip_range_high=0.28),
    PolicyVariant(importance_sampling="sequence", clip_range_high=0.05),
    PolicyVariant(importance_sampling="sequence_token", clip_range_high=0.05),
    PolicyVariant(loss_type="cispo", clip_range_high=0.1),
    PolicyVariant(loss_type="cispo", importance_sampling="sequence"),
]


def inputs(seed: int = 0, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 4, generator=g) * 3
    new = (old + spread * torch.randn(3, 4, generator=g)).requires_grad_(True)
    return new, old, torch.randn(3, 4, generator=g)


def loop_weight(new, old, i, t, level):
    """The importance weight of token t of row i, from Python floats."""
    new = new.detach()
    n = [u for u in range(4) if MASK[i, u]]
    if level == "token":
        return math.exp(float(new[i, t] - old[i, t]))
    return math.exp(sum(float(new[i, u] - old[i, u]) for u in n) / len(n))


def loop_term(new, old, adv, i, t, v: PolicyVariant, eps=0.2):
    """Token t's loss value and its derivative in that token's own weight-or-logp path, from the papers."""
    w = loop_weight(new, old, i, t, v.importance_sampling)
    high = eps if v.clip_range_high is None else v.clip_range_high
    a = float(adv[i, t])
    if v.loss_type == "cispo":  # MiniMax-M1 eq. 4: -sg[min(w, 1 + eps_high)] * A * logp
        return -min(w, 1 + high) * a * float(new[i, t].detach())
    return max(-a * w, -a * min(max(w, 1 - eps), 1 + high))


def loop_loss(new, old, adv, v, mode):
    per_row = [[loop_term(new, old, adv, i, t, v) for t in range(4) if MASK[i, t]] for i in range(3)]
    if mode == "token_mean":
        return sum(map(sum, per_row)) / sum(map(len, per_row))
    if mode == "sequence_mean":
        return sum(sum(r) / len(r) for r in per_row) / 3
    return sum(map(sum, per_row)) / (3 * 4.0)  # token_sum_norm with norm_constant 4


def objective(new, old, adv, v, mode="token_mean", **kwargs):
    return objectives.ppo_objective(new, old, None, torch.zeros_like(old), adv, torch.zeros_like(old), MASK, 0.2,
                                    0.2, 0.1, mode, 4.0, variant=v, **kwargs)


@pytest.mark.parametrize("mode", objectives.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_each_variant_matches_a_loop_reference_under_every_aggregation(v, mode):
    new, old, adv = inputs()
    loss, stats = objective(new, old, adv, v, mode)
    assert_close(loss, torch.tensor(loop_loss(new, old, adv, v, mode)))
    assert "policy/clipfrac" in stats


def test_defaults_do_todays_float_operations():
    new, old, adv = inputs()
    today, _ = objective(new, old, adv, None)
    for v in (PolicyVariant(), PolicyVariant(entropy_coef=0.0)):
        loss, _ = objective(new, old, adv, v)
        assert torch.equal(loss, today)
    # clip-higher with the same bound is today's number too (another path, same value)
    assert_close(objective(new, old, adv, PolicyVariant(clip_range_high=0.2))[0], today)


def test_clip_higher_clips_only_above_its_own_bound():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 0.75]])).requires_grad_(True)  # ratios 1.25 and 0.75
    adv = torch.ones(1, 2)
    per_token, _ = objectives.policy_term(new, old, adv, torch.ones(1, 2), 0.2, variant=PolicyVariant(clip_range_high=0.28))
    per_token.sum().backward()
    # 1.25 < 1.28: unclipped, gradient -A * r; 0.75 < 0.8 with A > 0: min picks the unclipped -A r too
    assert_close(per_token.detach(), torch.tensor([[-1.25, -0.75]]))
    assert_close(new.grad, torch.tensor([[-1.25, -0.75]]))
    sym, _ = objectives.policy_term(new, old, adv, torch.ones(1, 2), 0.2)
    assert_close(sym.detach(), torch.tensor([[-1.2, -0.75]]))  # today's symmetric bound clips 1.25


def gspo_grads(new, old, adv, level, eps=0.2, high=0.05):
    """d(token_mean loss)/d logp for GSPO and GSPO-token, autograd-free: s_i = exp(mean log-ratio); a token u is
    active when its unclipped term is the max; GSPO spreads sum_u active -A_u s / n_i over the row's tokens, GSPO-token
    gives token t its own -A_t s."""
    n_tokens = int(MASK.sum())
    grad = torch.zeros(3, 4)
    for i in range(3):
        toks = [t for t in range(4) if MASK[i, t]]
        s = loop_weight(new, old, i, toks[0], "sequence")
        active = [float(adv[i, u]) * s if (-adv[i, u] * s >= -adv[i, u] * min(max(s, 1 - eps), 1 + high)) else 0.0
                  for u in range(4)]
        for t in toks:
            grad[i, t] = (-sum(active[u] for u in toks) / len(toks) if level == "sequence" else -active[t]) / n_tokens
    return grad


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_and_gspo_token_gradients(level):
    new, old, adv = inputs(seed=1, spread=0.05)
    loss, _ = objective(new, old, adv, PolicyVariant(importance_sampling=level, clip_range_high=0.05))
    loss.backward()
    assert_close(new.grad, gspo_grads(new.detach(), old, adv, level))


def test_gspo_token_has_gspos_value_and_with_per_row_advantages_its_gradient():
    new, old, _ = inputs(seed=2, spread=0.05)
    adv = torch.randn(3, 1).expand(3, 4)  # one advantage per response (critic-free)
    seq = PolicyVariant(importance_sampling="sequence", clip_range_high=1.0)
    tok = PolicyVariant(importance_sampling="sequence_token", clip_range_high=1.0)
    w_seq = objectives.importance_weights(new, old, MASK, "sequence")
    w_tok = objectives.importance_weights(new, old, MASK, "sequence_token")
    assert_close(w_seq, w_tok)
    assert torch.equal(w_seq[:, 0], w_seq[:, 3])  # one weight per response
    (g_seq,) = torch.autograd.grad(objective(new, old, adv, seq, "sequence_mean")[0], new)
    (g_tok,) = torch.autograd.grad(objective(new, old, adv, tok, "sequence_mean")[0], new)
    assert_close(g_seq, g_tok)  # GSPO paper, section 4.3: the same gradient when A is one per response
    per_token_adv = torch.randn(3, 4)  # per-token advantages: GSPO-token weighs each token by its own
    (g_seq,) = torch.autograd.grad(objective(new, old, per_token_adv, seq, "sequence_mean")[0], new)
    (g_tok,) = torch.autograd.grad(objective(new, old, per_token_adv, tok, "sequence_mean")[0], new)
    assert not torch.allclose(g_seq, g_tok)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_gradient_is_the_stopped_clipped_weight_times_the_advantage(level):
    new, old, adv = inputs(seed=3, spread=0.5)  # ratios well outside [0.8, 1.1]: PPO would zero many tokens
    v = PolicyVariant(loss_type="cispo", clip_range_high=0.1, importance_sampling=level)
    objective(new, old, adv, v)[0].backward()
    n_tokens = int(MASK.sum())
    expected = torch.zeros(3, 4)
    for i in range(3):
        for t in range(4):
            if MASK[i, t]:
                expected[i, t] = -min(loop_weight(new, old, i, t, level), 1.1) * float(adv[i, t]) / n_tokens
    assert_close(new.grad, expected)
    assert (new.grad[MASK.bool()] != 0).all()  # no token loses its gradient


@pytest.mark.parametrize("v", [PolicyVariant(), *VARIANTS], ids=str)
def test_ratio_one_gives_the_unclipped_policy_gradient_for_every_variant(v):
    old = -torch.rand(3, 4) * 3
    new = old.clone().requires_grad_(True)
    adv = torch.randn(3, 1).expand(3, 4)
    loss, stats = objective(new, old, adv, v)
    loss.backward()
    n_tokens = MASK.sum()
    assert_close(new.grad, -adv * MASK / n_tokens)  # the vanilla policy gradient -A d logp
    assert float(stats["policy/clipfrac"]) == 0.0
    if v.loss_type == "ppo":  # the surrogate's value is -mean A
        assert_close(loss, -(adv * MASK).sum() / n_tokens)


@pytest.mark.parametrize("mode", objectives.LOSS_AGGREGATIONS)
def test_entropy_bonus_is_aggregated_like_the_loss(mode):
    new, old, adv = inputs()
    entropy = torch.rand(3, 4, requires_grad=True)
    plain, _ = objective(new, old, adv, PolicyVariant(), mode)
    with_bonus, _ = objective(new, old, adv, PolicyVariant(entropy_coef=0.5), mode, entropy=entropy)
    bonus = objectives.aggregate(entropy.detach(), MASK, mode, 4.0)
    assert_close(with_bonus, plain - 0.5 * bonus)
    with_bonus.backward()
    expected = {"token_mean": MASK / MASK.sum(), "sequence_mean": MASK / MASK.sum(1, keepdim=True) / 3,
                "token_sum_norm": MASK / 12.0}[mode]
    assert_close(entropy.grad, -0.5 * expected)
    with pytest.raises(ValueError, match="entropy"):
        objective(new, old, adv, PolicyVariant(entropy_coef=0.5))


def test_entropy_with_its_gradient_from_the_same_logits():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3))
    from lit_rlhf.models import logprobs_from_logits

    _, diagnostic = logprobs_from_logits(logits, labels, with_entropy=True)
    assert not diagnostic.requires_grad  # today's entropy: a diagnostic
    logp, entropy = logprobs_from_logits(logits, labels, with_entropy=True, entropy_grad=True, chunk_elements=14)
    assert torch.equal(entropy.detach(), diagnostic)
    entropy.sum().backward()
    p = torch.softmax(logits.detach(), -1)
    log_p = torch.log_softmax(logits.detach(), -1)
    # dH/dz_k = -p_k (log p_k + H)
    assert_close(logits.grad, -p * (log_p + entropy.detach().unsqueeze(-1)))
