"""model.ppo.drop_zero_std_groups, overlong (mask, penalty) and entropy_after_update in one-step PPO runs, seq2seq
and causal: what each leaves out of the update, adds to the scores or logs; their validation (--print_config:
test_variant_runs.py)."""

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.modules import PPOModule
from lit_rlhf.rewards import Reward
from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

from conftest import ShortnessReward, fit_ppo

MODELS = ["embedded:tiny-t5", "embedded:tiny-gpt2"]


class EqualThenMixedScores(Reward):
    """First call: the same score for every response. Later calls: the first prompt's responses scored 0, -0.05,
    ... in their order (different whatever was sampled), every other prompt's 0 (one group with a signal, the
    others without)."""

    calls = 0

    def compute(self, prompts, responses, references):
        self.calls += 1
        first = [p == prompts[0] and self.calls > 1 for p in prompts]
        return torch.tensor([-sum(first[:i]) / 20.0 if own else 0.0 for i, own in enumerate(first)])


def one_step(model_name, reward, tmp_path, limits=(4, 6), min_new_tokens=1, steps=1, fast_rollout=False, **ppo):
    """A grpo run of ``steps`` steps (2 prompts x 2 samples, one mini-batch; without fast_rollout the old log-probs
    come from the update's own forward: the ratio is exactly 1) with the entropy after the update logged; returns per step the logged
    statistics, the rollout and its advantages, and whether any trainable weight had moved by the step's end."""
    m = PPOModule(
        model_name=model_name, reward=reward, samples_per_prompt=2, rollout_batch_size=2, mini_batch_size=4,
        ppo=PPOSettings(init_kl_coef=0.0, advantage_estimator="grpo", entropy_after_update=True, **ppo),
        generation=GenerationSettings(min_new_tokens=min_new_tokens, max_new_tokens=limits), learning_rate=1e-2,
        weight_decay=0.1,  # AdamW would move the weights even without a gradient: only a step not taken leaves them
        lora=LoraSettings(target_modules=["q", "v", "lm_head"]) if "t5" in model_name else LoraSettings(),
        log_samples_every=0, export_adapter=False, ppo_steps=steps, fast_rollout=fast_rollout,
    )
    before = [p.detach().clone() for p in m.policy.trainable_parameters()]
    steps = []
    log_stats, advantages = m._log_stats, m._advantages

    def record(stats):
        moved = any(not torch.equal(a, b) for a, b in zip(before, m.policy.trainable_parameters()))
        steps[-1].update(stats={k: float(v) for k, v in stats.items()}, moved=moved)
        log_stats(stats)

    def recording_advantages(rollout):
        out = advantages(rollout)
        steps.append(dict(rollout=rollout, advantages=out[3]))
        return out

    def recording_forward_rows(*args, **kwargs):
        out = forward_rows(*args, **kwargs)
        steps[-1].update(entropy=out[0].entropy.detach(), rows=out[2])  # [b, t] of the rows out[2]
        return out

    forward_rows = m.policy.forward_rows
    m._log_stats, m._advantages, m.policy.forward_rows = record, recording_advantages, recording_forward_rows
    fit_ppo(m, tmp_path, batch_size=2, enable_checkpointing=False)
    return steps


@pytest.mark.parametrize("model_name", MODELS)
def test_groups_of_equal_scores_are_left_out_of_the_loss(model_name, tmp_path):
    first, second = one_step(model_name, EqualThenMixedScores(), tmp_path, steps=2, drop_zero_std_groups=True,
                             entropy_coef=0.1)
    # every group's scores equal: no optimizer step (AdamW's weight decay would have moved the weights)
    assert not first["moved"] and not first["rollout"].loss_rows.any()
    assert first["stats"]["env/dropped_group_frac"] == 1.0 and "ppo/grad_norm" not in first["stats"]
    # no weight moved: the entropy after the update is the update's own
    assert_close(first["stats"]["ppo/policy/entropy_after"], first["stats"]["ppo/policy/entropy"])
    # one group with a signal: the loss is a token mean over its responses only (ratio 1: -A - 0.1 x entropy)
    rollout = second["rollout"]
    scores = rollout.raw_scores.view(-1, 2)
    keep = (scores[:, 0] != scores[:, 1]).repeat_interleave(2)
    assert torch.equal(rollout.loss_rows, keep) and keep.any() and not keep.all() and second["moved"]
    rows, entropy = second["rows"].cpu(), second["entropy"]
    mask = rollout.rows.response_mask[rows, :entropy.shape[1]][keep[rows]].float()
    per_token = -second["advantages"][rows, :entropy.shape[1]][keep[rows]] - 0.1 * entropy[keep[rows]]
    assert second["stats"]["ppo/loss/policy"] == pytest.approx(float((per_token * mask).sum() / mask.sum()))
    assert second["stats"]["env/dropped_group_frac"] == 1.0 - float(keep.float().mean())


@pytest.mark.parametrize("model_name", MODELS)
def test_truncated_responses_are_left_out_with_overlong_mask(model_name, tmp_path):
    # end-of-sequence is blocked up to the limit: every response is truncated, the update has nothing to learn
    (step,) = one_step(model_name, ShortnessReward(), tmp_path, limits=(3, 4), min_new_tokens=3, overlong="mask",
                       fast_rollout=True)  # (the cached loop's responses; the penalty's test: generate's)
    stats, rollout = step["stats"], step["rollout"]
    assert not step["moved"] and stats["env/truncated_frac"] == 1.0 and "ppo/grad_norm" not in stats
    assert (rollout.rows.response_mask.sum(1) == 3).all() and not rollout.loss_rows.any()


@pytest.mark.parametrize("model_name", MODELS)
def test_the_overlong_penalty_is_added_to_the_scores(model_name, tmp_path):
    # limit 6, buffer 4: 0 for up to 2 tokens, then -1/4 per token down to -1 at 6
    (step,) = one_step(model_name, ShortnessReward(), tmp_path, limits=(6, 7), overlong="penalty", overlong_buffer=4)
    stats, rollout = step["stats"], step["rollout"]
    lengths = rollout.rows.response_mask.sum(1).float()
    expected = torch.tensor([min(0.0, -(n - 2) / 4) for n in lengths.tolist()])
    assert_close(rollout.scores - rollout.raw_scores, expected)
    assert stats["env/overlong_penalty_mean"] == pytest.approx(float(expected.mean()))
    assert rollout.loss_rows is None and step["moved"]  # nothing left out
    assert abs(stats["ppo/policy/entropy_after"] - stats["ppo/policy/entropy"]) > 1e-6


def test_the_settings_validate_and_name_their_flags():
    for bad, flag in ((dict(overlong="truncate"), "model.ppo.overlong"),
                      (dict(overlong_buffer=0), "model.ppo.overlong_buffer"),
                      (dict(drop_zero_std_groups=True), "model.ppo.drop_zero_std_groups")):  # gae has no groups
        errors = PPOSettings(**bad).errors()
        assert len(errors) == 1 and errors[0].startswith(flag), errors
    assert PPOSettings(drop_zero_std_groups=True, advantage_estimator="rloo").errors() == []
