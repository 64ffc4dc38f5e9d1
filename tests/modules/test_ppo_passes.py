"""The scoring passes a PPO step skips: no reference at init_kl_coef 0, no old-log-prob pass in an on-policy
critic-free update (same weights as with the pass); the default run still runs both."""

import lightning as L
import pytest
import torch

from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import Policy
from lit_rlhf.modules import PPOModule
from lit_rlhf.modules import ppo as ppo_module
from lit_rlhf.modules.ppo_passes import old_logprobs_from_update
from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

from conftest import ShortnessReward, write_jsonl


@pytest.fixture
def forwards(monkeypatch):
    """Calls of the policy's forward (current weights) and of its reference forward."""
    counts = {"policy": 0, "reference": 0}
    for name, key in (("forward", "policy"), ("reference_forward", "reference")):
        original = getattr(Policy, name)

        def counting(self, *args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Policy, name, counting)
    return counts


def grpo(model_name: str, ppo: dict | None = None, **kwargs) -> PPOModule:
    """GRPO on 2 prompts x 2 samples, the rollout as one mini-batch, one epoch: on-policy."""
    settings = {**dict(advantage_estimator="grpo", init_kl_coef=0.05, kl_in_loss=True), **(ppo or {})}
    defaults = dict(
        model_name=model_name, reward=ShortnessReward(), ppo=PPOSettings(**settings), samples_per_prompt=2,
        generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(6, 9)), rollout_batch_size=2,
        mini_batch_size=4, learning_rate=1e-2, fast_rollout=False, log_samples_every=0, export_adapter=False,
        ppo_steps=2, lora=LoraSettings(target_modules=["q", "v"]) if "t5" in model_name else LoraSettings(),
    )
    return PPOModule(**{**defaults, **kwargs})


def fit(m: PPOModule, root, batch_size: int = 2, validate: bool = False) -> list[dict]:
    """Fit on the CPU on 40 short prompts (then validate, with ``validate``); the statistics each step logged."""
    root.mkdir(parents=True, exist_ok=True)
    logged = []
    original = m._log_stats
    m._log_stats = lambda stats: logged.append({k: float(v) for k, v in stats.items()}) or original(stats)
    trainer = L.Trainer(default_root_dir=root, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=int(validate), num_sanity_val_steps=0)
    rows = [{"prompt": f"Summarize: person {i} met person {i + 1} at {i % 7} and talked about item {i * 3}."}
            for i in range(40)]
    data = PromptDataModule(model_name=m.hparams.model_name, dataset=str(write_jsonl(root / "prompts.jsonl", rows)),
                            batch_size=batch_size, eval_batch_size=4)
    trainer.fit(m, data)
    if validate:
        logged.append(trainer.validate(m, datamodule=data, verbose=False)[0])
    return logged


def trainable(m: PPOModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_name", ["embedded:tiny-gpt2", "embedded:tiny-t5"])
def test_on_policy_update_skips_the_old_logprob_pass_with_the_same_weights(model_name, forwards, monkeypatch, tmp_path):
    torch.manual_seed(0)
    skipping = grpo(model_name)
    logged = fit(skipping, tmp_path / "skip")
    # per step: the update's forward only (one micro-batch), and the reference (KL in the loss)
    assert forwards == {"policy": 2, "reference": 2}
    monkeypatch.setattr(ppo_module, "old_logprobs_from_update", lambda *args: False)
    torch.manual_seed(0)
    scoring = grpo(model_name)
    logged_scoring = fit(scoring, tmp_path / "score")
    assert forwards == {"policy": 2 + 4, "reference": 4}  # the scoring pass is back
    # the same old log-probs (the same forward in the same grouping and mode): exactly the same step
    for (name, a), b in zip(trainable(skipping).items(), trainable(scoring).values()):
        assert torch.equal(a, b), name
    assert any(bool(p.abs().sum() > 0) for n, p in trainable(skipping).items() if "lora_B" in n)  # (0 at the start)
    for step, other in zip(logged, logged_scoring):
        assert step.keys() == other.keys()
        assert {k: v for k, v in step.items() if not k.startswith("time/")} == \
            {k: v for k, v in other.items() if not k.startswith("time/")}
    assert logged[1]["ppo/policy/ratio_mean"] == 1.0 and logged[1]["objective/kl"] != 0  # the weights moved


def test_no_reference_at_kl_coef_0(forwards, tmp_path):
    torch.manual_seed(0)
    # a reference model that would fail to load: at init_kl_coef 0 nothing loads it
    m = grpo("embedded:tiny-gpt2", ppo={"init_kl_coef": 0.0, "kl_in_loss": False}, ppo_steps=1,
             reference_model=str(tmp_path / "no-such-model"))
    logged = fit(m, tmp_path, validate=True)
    assert m.policy.reference is None and m.policy_kwargs["reference_model"] is None
    assert forwards == {"policy": 1, "reference": 0}  # the update's forward; no reference, no old-log-prob pass
    assert "objective/kl" not in logged[0]  # no reference: no KL to report (not a 0 that hides the drift)
    assert logged[0]["objective/kl_coef"] == 0 and logged[0]["ppo/mean_non_score_reward"] == 0
    assert m.kl_ctl.value == 0  # the adaptive controller multiplies: 0 stays 0
    assert "val/reward_mean" in logged[-1] and "val/kl" not in logged[-1]  # validation: no reference pass either


def test_default_run_keeps_both_passes(forwards, tmp_path):
    torch.manual_seed(0)
    m = PPOModule(reward=ShortnessReward(), ppo_steps=1, log_samples_every=0, export_adapter=False,
                  generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(3, 5)), fast_rollout=False)
    fit(m, tmp_path, batch_size=16)
    # mini-batches of 4 of 16: the scoring pass (4 forwards) before the update (4), and the reference (4)
    assert forwards == {"policy": 8, "reference": 4}


@pytest.mark.parametrize("change, expected", [
    ({}, True), ({"fast": True}, False), ({"n_groups": 2}, False), ({"critic": True}, False),
    ({"dropout": True}, False), ({"ppo_epochs": 2}, False), ({"kl_in_loss": False}, False),
    ({"kl_in_loss": False, "init_kl_coef": 0.0}, True), ({"kl_estimator": "full"}, False),
    ({"kl_estimator": "full", "init_kl_coef": 0.0}, True),
])
def test_when_the_update_gives_the_old_logprobs(change, expected):
    settings = {"advantage_estimator": "grpo", "kl_in_loss": True}
    settings.update({k: v for k, v in change.items() if k in ("ppo_epochs", "kl_in_loss", "init_kl_coef", "kl_estimator")})
    ppo = PPOSettings(**settings)
    args = dict(n_groups=1, fast=False, critic=False, dropout=False)
    args.update({k: v for k, v in change.items() if k in args})
    assert old_logprobs_from_update(ppo, **args) is expected
