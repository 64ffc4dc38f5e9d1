"""A PPO step (T5, value head) and a GRPO step (GPT-2, no value head) with ``model.logprob_chunk_size``: the scoring
passes (policy, values, reference) and the update with the LM head chunk by chunk give the step the whole-logits
run gives, up to float rounding."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import logprobs
from lit_rlhf.modules import PPOModule
from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

from conftest import ShortnessReward, write_jsonl

RUNS = {
    "ppo t5": dict(model_name="embedded:tiny-t5", lora=LoraSettings(target_modules=["q", "v", "lm_head"]),
                   ppo=PPOSettings(init_kl_coef=0.05, ppo_epochs=2)),
    "grpo gpt2": dict(model_name="embedded:tiny-gpt2", lora=LoraSettings(target_modules=["c_attn", "lm_head"]),
                      ppo=PPOSettings(advantage_estimator="grpo", init_kl_coef=0.05, kl_in_loss=True),
                      samples_per_prompt=2),
}


def one_step(run: str, chunk: int, root: Path, monkeypatch) -> tuple[dict, list[dict]]:
    """The step's statistics and each mini-batch's update statistics."""
    chunked_passes = []  # with gradients (the update) or without (the scoring passes)
    original = logprobs.chunked_logprobs
    torch.manual_seed(0)
    m = PPOModule(**RUNS[run], reward=ShortnessReward(), generation=GenerationSettings(max_new_tokens=(4, 7)),
                  rollout_batch_size=2, mini_batch_size=2, learning_rate=1e-2, fast_rollout=False,
                  log_samples_every=0, export_adapter=False, ppo_steps=1, logprob_chunk_size=chunk)
    steps, updates = [], []
    step_stats, minibatch_step = m._step_stats, m._minibatch_step
    m._step_stats = lambda *args: steps.append(step_stats(*args)) or steps[-1]
    m._minibatch_step = lambda *args: updates.append(minibatch_step(*args)) or updates[-1]
    trainer = L.Trainer(default_root_dir=root, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    rows = [{"prompt": f"Summarize: person {i} met person {i + 1} and talked about item {i * 3}."} for i in range(8)]
    root.mkdir(parents=True)
    data = PromptDataModule(model_name=m.hparams.model_name, batch_size=2,
                            dataset=str(write_jsonl(root / "prompts.jsonl", rows)))
    with monkeypatch.context() as patch:
        patch.setattr(logprobs, "chunked_logprobs", lambda *args, **kwargs: chunked_passes.append(
            torch.is_grad_enabled()) or original(*args, **kwargs))
        trainer.fit(m, data)
    assert m.policy.logprob_chunk_size == chunk and m.ppo_step == 1
    assert (True in chunked_passes, False in chunked_passes) == (chunk > 0, chunk > 0)
    return steps[0], updates


@pytest.mark.parametrize("run", RUNS)
def test_a_step_with_chunked_log_probs_equals_the_whole_logits_step(run, tmp_path, monkeypatch):
    plain, plain_updates = one_step(run, 0, tmp_path / "plain", monkeypatch)
    chunked, chunked_updates = one_step(run, 3, tmp_path / "chunked", monkeypatch)
    assert len(chunked_updates) == len(plain_updates) >= 2 and all(u is not None for u in chunked_updates)
    assert float(chunked_updates[0]["ppo/policy/ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    for plain_stats, chunked_stats in ((plain, chunked), *zip(plain_updates, chunked_updates)):
        assert plain_stats.keys() == chunked_stats.keys()
        for k, v in plain_stats.items():
            if not k.startswith("time/"):
                assert float(chunked_stats[k]) == pytest.approx(float(v), rel=1e-4, abs=1e-5), k
