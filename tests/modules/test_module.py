"""PPOModule end to end on the embedded tiny models: correctness at step 1, learning, checkpoints, export."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.modules import PPOModule

from lit_rlhf.settings import PPOSettings
from lit_rlhf.settings import GenerationSettings, LoraSettings
from lit_rlhf.rewards import ProfanityReward

from conftest import ShortnessReward
from conftest import fit_ppo as fit

SHORT = GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 12))


@pytest.mark.parametrize("model_name", ["embedded:tiny-t5", "embedded:tiny-gpt2"])
def test_first_step_kl_zero_and_first_ratio_exactly_one(model_name, tmp_path, log_ratios):
    # Exact mode: LoRA starts at zero, so policy == reference at the first rollout: KL must be exactly 0, and
    # the first mini-batch's importance ratio exactly 1 (same eval-mode computation as the rollout forward).
    torch.manual_seed(0)
    module = PPOModule(model_name=model_name, reward=ProfanityReward(), generation=SHORT, ppo_steps=1,
                       rollout_batch_size=8, mini_batch_size=4, learning_rate=1e-2, log_samples_every=0,
                       export_adapter=False, fast_rollout=False)
    _, recorder = fit(module, tmp_path)
    assert recorder.history[0]["kl"] == 0.0
    assert len(log_ratios) == 2  # 8 samples / mini-batch 4, one epoch
    assert torch.count_nonzero(log_ratios[0]) == 0
    # the first step moved the weights, so the second mini-batch's ratio is no longer 1
    assert torch.count_nonzero(log_ratios[1]) > 0


def test_fit_learns_a_clear_reward(tmp_path):
    # Rewarding short responses: the policy must learn to end early or pick short tokens. A random tiny model
    # has no shared structure in its output embeddings, so the adapter includes lm_head, which lets PPO learn
    # a per-token preference from every sample (with q/v only, 30 steps are not enough to see it).
    # Rollouts of 8: the last 6 steps' mean beats the first 6's by 1.7, 1.75 and 1.25 with seeds 0, 1, 2.
    L.seed_everything(0)
    module = PPOModule(
        model_name="embedded:tiny-t5", reward=ShortnessReward(), ppo_steps=32, rollout_batch_size=8,
        mini_batch_size=4, learning_rate=1e-2, generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(12, 16)),
        lora=LoraSettings(target_modules=["q", "v", "lm_head"]),
        ppo=PPOSettings(init_kl_coef=0.01), log_samples_every=0, export_adapter=False,
    )
    _, recorder = fit(module, tmp_path, batch_size=8, split="train")  # the prompts the seeds were measured on
    rewards = [h["reward"] for h in recorder.history]
    assert len(rewards) == 32
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.3, rewards


@pytest.mark.parametrize("model_name", ["embedded:tiny-t5", "embedded:tiny-gpt2"])
def test_checkpoint_resume_and_adapter_export(model_name, tmp_path):
    from peft import PeftModel

    from lit_rlhf.models import load_causal_or_seq2seq
    from lit_rlhf.models import resolve_model_path

    def new_module(steps):
        return PPOModule(model_name=model_name, reward=ProfanityReward(), generation=SHORT, ppo_steps=steps,
                         rollout_batch_size=8, mini_batch_size=4, learning_rate=1e-2, log_samples_every=0)

    L.seed_everything(1)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    first, _ = fit(new_module(2), tmp_path, callbacks=[ckpt_cb])
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    # only the trainable weights (LoRA + value head) are stored, not the frozen base
    keys = list(checkpoint["state_dict"])
    assert keys and all("lora_" in k or "value_head" in k for k in keys), keys[:5]
    assert checkpoint["lit_rlhf"]["ppo_step"] == 2
    beta_after_2 = first.lightning_module.kl_ctl.value
    assert checkpoint["lit_rlhf"]["kl_controller"]["value"] == beta_after_2

    resumed_module = new_module(3)
    resumed, recorder = fit(resumed_module, tmp_path / "resumed", ckpt_path=str(last))
    assert resumed_module.ppo_step == 3 and len(recorder.history) == 1  # one more PPO step, not three
    trained = resumed_module.policy
    # the adapter weights resumed from the checkpoint (not re-initialised): LoRA B is non-zero
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)

    # the exported adapter, loaded with plain peft, reproduces the trained policy's log-probs
    adapter_dir = Path(resumed.default_root_dir) / "adapter"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "value_head.pt").exists()
    base = load_causal_or_seq2seq(resolve_model_path(model_name))
    loaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = trained.tokenizer
    enc = tok(["#Person1#: Hello there.\n#Person2#: Hi!"], return_tensors="pt")
    trained.eval()
    response, mask = trained.generate(enc.input_ids, enc.attention_mask, SHORT)
    expected = trained(enc.input_ids, enc.attention_mask, response, mask).logprobs
    original_model = trained.model
    trained.model = loaded  # score with the reloaded adapter through the same code path
    try:
        got = trained(enc.input_ids, enc.attention_mask, response, mask).logprobs
    finally:
        trained.model = original_model
    assert_close(got, expected)


def test_settings_are_validated_before_loading_anything():
    with pytest.raises(ValueError, match="mini_batch_size=3 must divide"):
        PPOModule(rollout_batch_size=16, mini_batch_size=3)
    with pytest.raises(ValueError, match="learning_rate"):
        PPOModule(learning_rate=-1.0)
    with pytest.raises(ValueError, match="ppo_steps"):
        PPOModule(ppo_steps=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        PPOModule(generation=GenerationSettings(max_new_tokens=(10, 5)))
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOModule(ppo=PPOSettings(kl_estimator="bogus"))


def test_full_kl_estimator_runs_and_is_zero_at_start(tmp_path):
    module = PPOModule(model_name="embedded:tiny-t5", reward=ProfanityReward(), generation=SHORT, ppo_steps=1,
                       rollout_batch_size=8, mini_batch_size=4, ppo=PPOSettings(kl_estimator="full"),
                       log_samples_every=0, export_adapter=False)
    _, recorder = fit(module, tmp_path)
    assert recorder.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("model_name", ["embedded:tiny-t5", "embedded:tiny-gpt2"])
def test_fast_rollout_scores_while_sampling(model_name, tmp_path, monkeypatch, log_ratios):
    # fast_rollout takes the old log-probs and values from the sampling loop: no policy re-forward, and at
    # the first step policy == reference, so KL and the first log-ratio are zero up to float rounding
    policy_calls = []
    module = PPOModule(model_name=model_name, reward=ProfanityReward(), generation=SHORT, ppo_steps=2,
                       rollout_batch_size=8, mini_batch_size=4, learning_rate=1e-2, log_samples_every=0,
                       export_adapter=False, fast_rollout=True)
    forward = module.policy.forward
    monkeypatch.setattr(module.policy, "forward", lambda *a, **k: (policy_calls.append(1), forward(*a, **k))[1])
    _, recorder = fit(module, tmp_path)
    assert abs(recorder.history[0]["kl"]) < 1e-4
    assert log_ratios[0].abs().max() < 1e-5
    assert len(policy_calls) == 2 * 2  # only the update's forward passes: 2 steps x 2 mini-batches
    assert all(math.isfinite(h["reward"]) for h in recorder.history)
