"""The policy-term variants (model.ppo.cliprange_high, importance_sampling, policy_loss, entropy_coef) in short PPO
runs, seq2seq and causal, critic and critic-free; their settings' validation and --print_config."""

import pytest
import torch
import yaml

from lit_rlhf.cli import run
from lit_rlhf.modules import PPOModule
from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

from conftest import ShortnessReward, fit_ppo

RUNS = [  # (model, settings): every estimator, both model kinds, every variant and aggregation at least once
    ("embedded:tiny-gpt2", dict(advantage_estimator="grpo", importance_sampling="sequence", cliprange_high=0.05,
                                loss_aggregation="sequence_mean", entropy_coef=0.01)),
    ("embedded:tiny-t5", dict(advantage_estimator="rloo", policy_loss="cispo", cliprange_high=4.0,
                              importance_sampling="sequence_token")),
    ("embedded:tiny-t5", dict(advantage_estimator="gae", cliprange_high=0.28, entropy_coef=0.01,
                              loss_aggregation="token_sum_norm")),
    ("embedded:tiny-gpt2", dict(advantage_estimator="reinforce_pp", policy_loss="cispo")),
]


@pytest.mark.parametrize("model_name, settings", RUNS, ids=lambda x: x if isinstance(x, str) else x["advantage_estimator"])
def test_variants_train_on_both_model_kinds(model_name, settings, tmp_path):
    torch.manual_seed(0)
    k = 1 if settings["advantage_estimator"] in ("gae", "reinforce_pp") else 2
    m = PPOModule(
        model_name=model_name, reward=ShortnessReward(), ppo=PPOSettings(init_kl_coef=0.01, **settings),
        samples_per_prompt=k, generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 6)),
        rollout_batch_size=4, mini_batch_size=4 * k, learning_rate=1e-2, log_samples_every=0, export_adapter=False,
        lora=LoraSettings(target_modules=["q", "v", "lm_head"]) if "t5" in model_name else LoraSettings(),
        ppo_steps=2, fast_rollout=False,  # exact rollout: the first update's ratio is exactly 1
    )
    entropies, steps = [], []
    forward_rows, minibatch_step = m.policy.forward_rows, m._minibatch_step

    def recording_forward_rows(*args, **kwargs):
        out = forward_rows(*args, **kwargs)
        entropies.append(out[0].entropy)
        return out

    m.policy.forward_rows = recording_forward_rows
    m._minibatch_step = lambda *args: steps.append(minibatch_step(*args)) or steps[-1]
    fit_ppo(m, tmp_path, batch_size=4, enable_checkpointing=False)
    assert len(steps) == 2 and all(s is not None for s in steps)
    assert steps[0]["ppo/policy/clipfrac"] == 0.0 and steps[0]["ppo/policy/ratio_mean"] == 1.0
    assert all(torch.isfinite(s["ppo/loss/total"]) and s["ppo/policy/entropy"] > 0 for s in steps)
    # the bonus's entropy carries a gradient from the update's own forward; without the bonus it stays a diagnostic
    assert entropies[0].requires_grad == (settings.get("entropy_coef", 0.0) != 0.0)


def test_the_settings_validate_and_name_their_flags():
    assert PPOSettings().policy_variant().plain_ratio
    for bad, flag in ((dict(cliprange_high=-0.1), "model.ppo.cliprange_high"),
                      (dict(importance_sampling="sentence"), "model.ppo.importance_sampling"),
                      (dict(policy_loss="grpo"), "model.ppo.policy_loss"),
                      (dict(entropy_coef=-1.0), "model.ppo.entropy_coef")):
        errors = PPOSettings(**bad).errors()
        assert len(errors) == 1 and errors[0].startswith(flag), errors
    with pytest.raises(ValueError, match="model.ppo.cliprange_high must be > 0"):
        PPOModule(model_name="embedded:tiny-gpt2", reward=ShortnessReward(), ppo=PPOSettings(cliprange_high=-1.0))


def test_print_config_shows_the_variant_settings(capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--model.ppo.cliprange_high", "0.28", "--model.ppo.importance_sampling", "sequence",
             "--model.ppo.overlong", "penalty", "--model.ppo.overlong_buffer", "20", "--print_config"])
    ppo = yaml.safe_load(capsys.readouterr().out)["model"]["ppo"]
    assert ppo["cliprange_high"] == 0.28 and ppo["importance_sampling"] == "sequence"
    assert ppo["policy_loss"] == "ppo" and ppo["entropy_coef"] == 0.0
    # which responses train (test_response_filter_runs.py)
    assert ppo["overlong"] == "penalty" and ppo["overlong_buffer"] == 20
    assert ppo["drop_zero_std_groups"] is False and ppo["entropy_after_update"] is False
