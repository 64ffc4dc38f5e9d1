"""Settings validate themselves with messages that name the flag (lit_rlhf/settings.py)."""

import pytest

from lit_rlhf import objectives
from lit_rlhf.modules.base import check_precision
from lit_rlhf.settings import (
    GenerationSettings, LoraSettings, PPOSettings, check, lora_settings, run_errors,
)


@pytest.mark.parametrize("settings, message", [
    (LoraSettings(r=0), "model.lora.r and model.lora.alpha must be > 0"),
    (LoraSettings(dropout=1.0), "model.lora.dropout must lie in [0, 1)"),
    (LoraSettings(bias="some"), "model.lora.bias must be one of ['none', 'all', 'lora_only']"),
    (GenerationSettings(max_new_tokens=(10, 5)), "model.generation.max_new_tokens must be [low, high)"),
    (GenerationSettings(max_new_tokens=(0, 5)), "model.generation.max_new_tokens must be [low, high)"),
    (GenerationSettings(min_new_tokens=-1), "model.generation.min_new_tokens must be >= 0"),
    (GenerationSettings(top_k=-2), "model.generation.top_k must be >= 0"),
    (GenerationSettings(top_p=0.0), "model.generation.top_p must lie in (0, 1]"),
    (GenerationSettings(temperature=0.0), "model.generation.temperature must be > 0"),
    (PPOSettings(ppo_epochs=0), "model.ppo.ppo_epochs must be > 0"),
    (PPOSettings(kl_estimator="bogus"), "model.ppo.kl_estimator must be one of ['kl', 'abs', 'mse', 'full']"),
    (PPOSettings(gamma=1.5), "model.ppo.gamma and model.ppo.lam must lie in [0, 1]"),
    (PPOSettings(cliprange=0), "model.ppo.cliprange and model.ppo.cliprange_value must be > 0"),
    (PPOSettings(kl_target=0), "model.ppo.kl_target and model.ppo.kl_horizon must be > 0"),
    (PPOSettings(init_kl_coef=-0.1), "model.ppo.init_kl_coef must be >= 0"),
    (PPOSettings(max_grad_norm=0.0), "model.ppo.max_grad_norm must be > 0"),
    (PPOSettings(score_clip=-1.0), "model.ppo.score_clip must be > 0"),
    (PPOSettings(ratio_threshold=0.0), "model.ppo.ratio_threshold must be > 0"),
    (PPOSettings(advantage_estimator="ppo2"),
     "model.ppo.advantage_estimator must be one of ['gae', 'grpo', 'rloo', 'reinforce_pp'], got 'ppo2'"),
    (PPOSettings(loss_aggregation="mean"),
     "model.ppo.loss_aggregation must be one of ['token_mean', 'sequence_mean', 'token_sum_norm'], got 'mean'"),
])
def test_each_bad_setting_names_its_flag(settings, message):
    errors = settings.errors()
    assert len(errors) == 1 and message in errors[0], errors
    with pytest.raises(ValueError, match="Invalid settings"):
        check(errors)


@pytest.mark.parametrize("value, message", [
    ({"r": 0}, r"model\.lora\.r and model\.lora\.alpha must be > 0, got 0, 32"),
    (LoraSettings(dropout=1.0), r"model\.lora\.dropout must lie in \[0, 1\)"),
    ({"rank": 8}, r"model\.lora has no setting 'rank'; its settings: r, alpha, dropout"),
    ("r=8", r"model\.lora must be LoRA settings .* got str"),
])
def test_lora_settings_are_checked_where_every_module_reads_them(value, message):
    """``lora_settings`` is what PPO, SFT, DPO, the reward model and the policy call: the one check."""
    with pytest.raises(ValueError, match=message):
        lora_settings(value)
    assert lora_settings({"r": 4}).r == 4 and lora_settings(None) == LoraSettings()



def test_defaults_are_valid_and_choice_lists_come_from_the_literals():
    assert LoraSettings().errors() == GenerationSettings().errors() == PPOSettings().errors() == []
    assert objectives.KL_ESTIMATORS == ("kl", "abs", "mse", "full")
    assert not PPOSettings(adaptive_kl=False, kl_target=0).errors()  # the target only matters when adaptive


@pytest.mark.parametrize("args, message", [
    ((None, 1e-3, 16, 3, 8), "model.mini_batch_size=3 must divide the rollout batch data.batch_size=16"),
    ((None, 1e-3, 16, 0, 8), "must be > 0"),
    ((0, 1e-3, 16, 4, 8), "model.ppo_steps must be > 0"),
    ((None, -1.0, 16, 4, 8), "model.learning_rate must be a positive number"),
    ((None, float("nan"), 16, 4, 8), "model.learning_rate must be a positive number"),
    ((None, 1e-3, 16, 4, 0), "model.max_consecutive_skips must be >= 1"),
    ((None, 1e-3, 16, 4, 8, 0), "model.samples_per_prompt must be >= 1"),
    ((None, 1e-3, 16, 4, 8, 1, "rloo"), "it needs model.samples_per_prompt >= 2, got 1"),
])
def test_run_settings_name_their_flag(args, message):
    errors = run_errors(*args)
    assert len(errors) == 1 and message in errors[0], errors


def test_all_problems_are_listed_at_once():
    with pytest.raises(ValueError) as info:
        check(PPOSettings(ppo_epochs=0, cliprange=-1).errors() + GenerationSettings(top_p=2).errors())
    assert str(info.value).count("\n  - ") == 3


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "16"])
def test_float16_precision_is_refused_with_a_pointer_to_bf16(precision):
    with pytest.raises(ValueError, match="bf16-mixed"):
        check_precision(precision)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "64-true"])
def test_other_precisions_are_accepted(precision):
    check_precision(precision)


def test_kl_controller_fixed_or_adaptive():
    fixed = PPOSettings(adaptive_kl=False, init_kl_coef=0.3).kl_controller()
    fixed.update(current_kl=100.0, n_steps=16)
    assert fixed.value == 0.3  # adaptive_kl=False keeps beta where it started
    adaptive = PPOSettings(adaptive_kl=True, init_kl_coef=0.3, kl_target=6.0, kl_horizon=100).kl_controller()
    adaptive.update(current_kl=12.0, n_steps=10)
    # Ziegler et al.: error = clip(12 / 6 - 1, -0.2, 0.2) = 0.2; beta *= 1 + 0.2 * 10 / 100
    assert adaptive.value == pytest.approx(0.3 * 1.02)


def test_base_dtype_is_float32_where_the_base_is_trained_and_the_choice_is_logged(monkeypatch, caplog):
    import logging

    import torch

    from lit_rlhf.settings import resolve_base_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with caplog.at_level(logging.INFO):
        assert resolve_base_dtype("auto", "cuda", "lora", "none", "Frozen base weights") == "bfloat16"
    assert "Frozen base weights in bfloat16 (model.dtype=auto: bfloat16 on a CUDA device" in caplog.text
    assert resolve_base_dtype("auto", "cuda", "full", "none", "Base") == "float32"  # every weight trained
    assert resolve_base_dtype("auto", "cuda", "lora", "all", "Base") == "float32"  # LoRA trains the base's biases
    assert resolve_base_dtype("auto", "cuda", "lora", "lora_only", "Base") == "float32"
    assert resolve_base_dtype("bfloat16", "cpu", "lora", "none", "Base") == "bfloat16"
