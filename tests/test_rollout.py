"""The one generate -> decode -> score path and the policy's scoring of rows, as every caller uses them:
training, validation during fit, the toxicity callback (lit_rlhf/rollout.py, Policy.score)."""

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lit_rlhf import rollout as ro
from lit_rlhf.callbacks import ProfanityToxicity, ToxicityCallback
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.settings import PPOSettings
from lit_rlhf.models import Policy, ResponseBatch
from lit_rlhf.rewards import CompositeReward, ProfanityReward, ReferenceSimilarityReward
from lit_rlhf.settings import GenerationSettings, LoraSettings

SHORT = GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 10))


def small_module(**kwargs) -> PPOModule:
    defaults = dict(reward=ProfanityReward(), generation=SHORT, ppo_steps=2, rollout_batch_size=8,
                    mini_batch_size=4, learning_rate=1e-2, log_samples_every=0, export_adapter=False)
    return PPOModule(**{**defaults, **kwargs})


def fit(module: PPOModule, root: Path, **trainer_kwargs) -> L.Trainer:
    kwargs = dict(default_root_dir=root, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  limit_val_batches=0, num_sanity_val_steps=0)
    trainer = L.Trainer(**{**kwargs, **trainer_kwargs})
    # the bundled test split: 1,500 dialogues to filter and encode, not 12,460
    trainer.fit(module, DialogSumDataModule(model_name=module.hparams.model_name, batch_size=8, eval_batch_size=4,
                                            split="test"))
    return trainer


def trained_weights(module: PPOModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ Policy.score


@pytest.fixture(scope="module")
def rows() -> tuple[Policy, ResponseBatch]:
    torch.manual_seed(0)
    policy = Policy("embedded:tiny-t5", lora=LoraSettings(r=4, alpha=4))
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # a policy that differs from its reference
            torch.nn.init.normal_(p, std=0.3)
    tok = policy.tokenizer
    tok.padding_side = "right"
    enc = tok(["#Person1#: Hello there.", "#Person2#: A much longer line of dialogue, with words.", "Hi", "Yes."],
              return_tensors="pt", padding=True)
    torch.manual_seed(1)
    response, mask = policy.generate(enc.input_ids, enc.attention_mask, GenerationSettings(min_new_tokens=1, max_new_tokens=(2, 9)))
    return policy, ResponseBatch(enc.input_ids, enc.attention_mask, response, mask)


def test_score_in_groups_equals_one_row_at_a_time(rows):
    policy, batch = rows
    grouped = policy.score(batch, [torch.tensor([3, 0]), torch.tensor([1, 2])])
    for i in range(4):
        single = policy.score(batch, [torch.tensor([i])])
        t = int(batch.response_mask[i].sum())
        for field in ("logprobs", "values", "ref_logprobs"):
            assert_close(getattr(grouped, field)[i, :t], getattr(single, field)[i, :t], atol=1e-5, rtol=1e-5)
    outside = ~batch.response_mask.bool()
    assert (grouped.logprobs[outside] == 0).all() and (grouped.ref_logprobs[outside] == 0).all()
    assert not torch.equal(grouped.logprobs, grouped.ref_logprobs)  # the adapter changes the policy


def test_collect_times_both_phases_from_the_first_step(rows):
    # the module's PhaseTimer is an empty dict (falsy) before its first step: it must still be used
    policy, batch = rows
    timer = ro.PhaseTimer()
    prompts = {"input_ids": batch.query_ids[:2], "attention_mask": batch.query_mask[:2], "query": ["a", "b"]}
    ro.collect(policy, ProfanityReward(), prompts, SHORT, torch.tensor([3, 5]), timer=timer)
    assert set(timer) == {"time/ppo/generate", "time/ppo/reward"}
    assert timer["time/ppo/generate"] > 0


def test_score_is_in_eval_mode_whatever_the_policy_mode(rows):
    # dropout must never reach the rollout's scores: the policy sets eval mode for the pass and restores it
    policy, batch = rows
    policy.train()
    a = policy.score(batch, [torch.arange(4)])
    b = policy.score(batch, [torch.arange(4)])
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.ref_logprobs, b.ref_logprobs)
    assert policy.training


def test_full_kl_is_the_exact_kl_and_zero_without_adapter_change():
    policy = Policy("embedded:tiny-t5", lora=LoraSettings(r=4, alpha=4))  # LoRA B = 0: policy == reference
    tok = policy.tokenizer
    tok.padding_side = "right"
    enc = tok(["#Person1#: Hello there."], return_tensors="pt")
    torch.manual_seed(0)
    response, mask = policy.generate(enc.input_ids, enc.attention_mask, GenerationSettings(max_new_tokens=(5, 6)))
    out = policy.score(ResponseBatch(enc.input_ids, enc.attention_mask, response, mask), [torch.arange(1)], full_kl=True)
    assert torch.equal(out.kl, torch.zeros_like(out.kl))
    assert torch.equal(out.logprobs, out.ref_logprobs)


# ------------------------------------------------------------------ evaluation isolated from training


def test_validation_during_fit_leaves_the_training_run_unchanged(tmp_path):
    # validation samples with its own seeded stream inside isolate_rng: a fit that validates after every PPO
    # step ends with the same weights, bit for bit, as one that never validates
    L.seed_everything(0)
    plain = small_module()
    fit(plain, tmp_path / "plain")
    L.seed_everything(0)
    validated = small_module()
    trainer = fit(validated, tmp_path / "validated", limit_val_batches=1, val_check_interval=1)
    assert "val/reward_mean" in trainer.callback_metrics and "val/kl" in trainer.callback_metrics
    expected, got = trained_weights(plain), trained_weights(validated)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_evaluation_is_seeded_and_restores_every_rng():
    settings = GenerationSettings(max_new_tokens=(4, 30))
    state = torch.get_rng_state()
    with ro.evaluation_rng(7, 5, settings) as limits:
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)
    with ro.evaluation_rng(7, 5, settings) as again:
        assert torch.equal(torch.rand(3), first) and torch.equal(again, limits)
    assert ((4 <= limits) & (limits < 30)).all()


# ------------------------------------------------------------------ the toxicity callback on the same path


def test_callback_makes_the_same_number_of_generation_calls_on_every_rank(monkeypatch):
    # 5 prompts in chunks of 2 -> 3 chunks over 2 processes: rank 0 takes chunks 0 and 2, rank 1 chunk 1 and
    # one padding call (with sharded weights each generation step is a collective: equal counts or a hang)
    callback = ToxicityCallback(evaluator=ProfanityToxicity(), num_prompts=5, batch_size=2, progress=False)
    callback.prompts = [SimpleNamespace(row=i) for i in range(5)]
    calls = []
    monkeypatch.setattr(callback, "_measure_chunk", lambda trainer, module, k: calls.append(k) or [(k, "", 0.0, 0.0, 0)])
    for rank, expected_rows in ((0, [0, 2]), (1, [1])):
        calls.clear()
        trainer = SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0)
        mine = list(range(rank, 3, 2))
        rows = callback.measure_chunks(trainer, None, mine)
        assert len(calls) == 2
        assert [r[0] for r in rows] == expected_rows  # the padding call's rows are dropped


def test_callback_fits_prompts_to_the_context_like_training(tmp_path, monkeypatch):
    # the callback's generation goes through rollout.generate_responses, which fits prompts to a causal
    # model's context before sampling (as training does)
    module = small_module(model_name="embedded:tiny-gpt2", rollout_batch_size=4, mini_batch_size=2)
    fitted = []
    original = module.policy.fit_prompts

    def recording(ids, mask, max_new_tokens):
        fitted.append(ids.shape)
        return original(ids, mask, max_new_tokens)

    monkeypatch.setattr(module.policy, "fit_prompts", recording)
    data = DialogSumDataModule(model_name="embedded:tiny-gpt2", batch_size=4, eval_batch_size=4, split="test")
    data.prepare_data()
    data.setup("fit")
    callback = ToxicityCallback(evaluator=ProfanityToxicity(), num_prompts=4, batch_size=4, progress=False)
    trainer = SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True, datamodule=data,
                              global_step=0, progress_bar_callback=None)
    measured = callback.measure(trainer, module, "before")
    assert len(fitted) == 1 and fitted[0][0] == 4
    assert len(measured.responses) == 4


# ------------------------------------------------------------------ training paths nothing else exercises


def test_reward_parts_are_logged_per_component(tmp_path):
    reward = CompositeReward([ProfanityReward(), ReferenceSimilarityReward()], weights=[1.0, 10.0])
    module = small_module(reward=reward, ppo_steps=1)
    recorded = []
    original = module._step_stats
    module._step_stats = lambda *args: recorded.append(original(*args)) or recorded[-1]
    fit(module, tmp_path)
    stats = recorded[0]
    parts = reward.last_components
    assert set(parts) == {"profanity", "rouge1_fmeasure"}
    for name, values in parts.items():
        assert_close(stats[f"env/reward/{name}_mean"], values.float().mean())
    # the parts add up, with their weights, to the logged reward mean
    weighted = sum(w * parts[n].float().mean() for w, n in zip(reward.weights, reward.names))
    assert_close(stats["env/reward_mean"], weighted, rtol=1e-5, atol=1e-5)


def test_several_ppo_epochs_reshuffle_the_minibatches(tmp_path, monkeypatch):
    module = small_module(ppo=PPOSettings(ppo_epochs=3), ppo_steps=1)
    groups_seen = []
    original = module._minibatch_step

    def recording(opt, rollout, advantages, returns, idx):
        groups_seen.append(tuple(sorted(idx.tolist())))
        return original(opt, rollout, advantages, returns, idx)

    monkeypatch.setattr(module, "_minibatch_step", recording)
    trainer = fit(module, tmp_path)
    assert trainer.global_step == 3 * 2  # 3 epochs x (8 samples / mini-batch 4)
    epochs = [set(groups_seen[i:i + 2]) for i in (0, 2, 4)]
    for epoch in epochs:  # each epoch covers every row once
        assert sorted(r for g in epoch for r in g) == list(range(8))
    assert epochs[1] != epochs[0] or epochs[2] != epochs[0]  # later epochs draw new mini-batches


@pytest.mark.parametrize("whiten", [True, False])
def test_whitening_of_advantages_is_optional(whiten):
    module = small_module(ppo=PPOSettings(whiten_advantages=whiten))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rollout = ro.Rollout(
        rows=ResponseBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long), mask),
        scores=torch.tensor([1.0, -2.0]), logprobs=torch.full((2, 4), -1.0) * mask,
        values=torch.tensor([[0.5, 0.2, 0.1, 0.0], [0.0, 0.3, -0.1, 0.4]]), ref_logprobs=torch.full((2, 4), -1.2) * mask,
        groups=[torch.arange(2)])
    kl, non_score, raw, advantages, returns = module._advantages(rollout)
    assert_close(kl, 0.2 * mask.float())  # k1: logp - ref = -1 - (-1.2) on real tokens
    if whiten:
        real = advantages[mask.bool()]
        assert_close(real.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
        assert_close(real.std(), torch.tensor(1.0), atol=1e-3, rtol=0)
    else:
        assert torch.equal(advantages, raw)
