"""PPOModule with model.environment: the loss, the KL and the statistics over the model's own tokens only, KL 0
and ratio 1 at the first step, GAE over the model's tokens, an exact resume, and the settings it refuses."""

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf import objectives
from lit_rlhf.data import PromptDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.settings import GenerationSettings, PPOSettings

from conftest import MetricsRecorder, assert_resume_is_exact, write_jsonl
from scripted_env import ScriptedEnvironment, questions


def fit(module: PPOModule, root: Path) -> MetricsRecorder:
    recorder = MetricsRecorder()
    trainer = L.Trainer(default_root_dir=root, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[recorder])
    data = PromptDataModule(model_name="embedded:tiny-gpt2", dataset=str(write_jsonl(root / "q.jsonl", questions(16))),
                            prompt_column="question", batch_size=2, test_size=0.25)
    trainer.fit(module, data)
    return recorder


@pytest.mark.parametrize("estimator, k", [("grpo", 2), ("gae", 1)])
def test_first_step_trains_only_the_model_tokens_with_kl_zero_and_ratio_one(estimator, k, tmp_path, monkeypatch,
                                                                            log_ratios):
    torch.manual_seed(0)
    module = PPOModule(model_name="embedded:tiny-gpt2", environment=ScriptedEnvironment(max_turns=3),
                       ppo=PPOSettings(advantage_estimator=estimator, init_kl_coef=0.05), samples_per_prompt=k,
                       generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(3, 6)), ppo_steps=1,
                       rollout_batch_size=2, mini_batch_size=2 * k, log_samples_every=0, export_adapter=False)
    rollouts, masks = [], []
    original_rollout, original_objective = module._rollout, objectives.ppo_objective
    monkeypatch.setattr(module, "_rollout", lambda batch: rollouts.append(original_rollout(batch)) or rollouts[-1])

    def recording(*args, **kwargs):
        masks.append(args[6])  # the mask the policy (and value) loss is over
        return original_objective(*args, **kwargs)

    monkeypatch.setattr(objectives, "ppo_objective", recording)
    advantage_masks, original_advantages = [], objectives.compute_advantages
    monkeypatch.setattr(objectives, "compute_advantages",
                        lambda *args: advantage_masks.append(args[4]) or original_advantages(*args))
    logged, original_log = [], module._log_stats
    monkeypatch.setattr(module, "_log_stats", lambda stats: logged.append(stats) or original_log(stats))
    history = fit(module, tmp_path)
    rollout = rollouts[0]
    own, every = rollout.action_mask, rollout.rows.response_mask
    assert (every.sum(1) > own.sum(1) + 3).all()  # the tool's replies (2 of them) are in every sequence...
    first = own[rollout.groups[0]]  # (the first mini-batch's rows)
    assert torch.equal(masks[0], first[:, :masks[0].shape[1]]) and masks[0].sum() == own.sum()  # ...out of the loss
    assert torch.equal(advantage_masks[0], own)  # and of the advantages (GAE skips them, as it skips padding)
    assert history.history[0]["kl"] == 0.0  # fast_rollout is not used: the scoring pass gives the old log-probs
    assert torch.count_nonzero(log_ratios[0]) == 0
    step = next(stats for stats in logged if "env/turns_mean" in stats)
    assert float(step["env/turns_mean"]) == 3.0 and float(step["env/context_full_frac"]) == 0.0
    assert float(step["env/conversation_len_mean"]) == float(every.sum(1).double().mean())
    assert float(step["tokens/responses_len_mean"]) == float(own.sum(1).double().mean())  # the model's tokens
    if estimator == "gae":
        assert (rollout.values * (every - own)).abs().sum() > 0 and torch.isfinite(rollout.values).all()


def test_a_resumed_fit_with_an_environment_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """configs/tool_calc.yaml with the scripted environment (tool replies in every episode): 4 steps in one go,
    or 2 and resumed from that checkpoint, end with the same adapter, bit for bit."""
    from lit_rlhf.cli import run

    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("tool_questions.jsonl"), questions(24))
    assert_resume_is_exact(run, [
        "--config", str(Path(__file__).parents[2] / "configs" / "tool_calc.yaml"),
        "--model.environment", "scripted_env.ScriptedEnvironment", "--model.environment.max_turns", "2",
        "--model.samples_per_prompt", "2", "--data.batch_size", "2", "--model.mini_batch_size", "4",
        "--model.generation.max_new_tokens", "[3, 6]", "--model.ppo_steps", "null", "--trainer.callbacks=[]",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--seed_everything", "3"],
        "adapter/adapter_model.safetensors", steps=4)


def test_settings_an_environment_cannot_work_with_are_refused():
    with pytest.raises(ValueError, match="model.ppo.overlong='mask' .* model.environment"):
        PPOModule(model_name="embedded:tiny-gpt2", environment=ScriptedEnvironment(),
                  ppo=PPOSettings(overlong="mask"))
    with pytest.raises(ValueError, match="model.environment .* decoder-only .* is an encoder-decoder"):
        PPOModule(model_name="embedded:tiny-t5", environment=ScriptedEnvironment())  # before anything is built


def test_sharded_weights_are_refused_in_every_stage(monkeypatch):
    # each process runs its own number of turns: a collective forward of sharded weights would wait forever
    from lit_rlhf.modules import ppo_passes

    module = PPOModule(model_name="embedded:tiny-gpt2", environment=ScriptedEnvironment())
    monkeypatch.setattr(ppo_passes.dist, "weights_sharded", lambda trainer: True)
    monkeypatch.setattr(PPOModule, "trainer", property(lambda self: None))
    for hook in (module.on_validation_start, module.on_test_start, module.on_predict_start):
        with pytest.raises(ValueError, match="model.environment runs a different number of turns"):
            hook()
    module.environment = None  # single-turn: the stages run
    module.on_validation_start()


def test_predict_on_rows_the_environments_reward_cannot_read_writes_unscored_episodes(tmp_path):
    # ToolEnvironment's reward reads `answer`: new questions without it still get their episodes, only no score
    from lit_rlhf.rewards import ToolEnvironment

    train = write_jsonl(tmp_path / "q.jsonl", questions(8))
    new = write_jsonl(tmp_path / "new.jsonl", [{"question": q["question"]} for q in questions(3)])
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    module = PPOModule(model_name="embedded:tiny-gpt2", environment=ToolEnvironment(max_turns=2),
                       generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 6)))
    data = PromptDataModule(model_name="embedded:tiny-gpt2", dataset=str(train), prompt_column="question",
                            predict_path=str(new), eval_batch_size=3)
    with pytest.warns(UserWarning, match=r"model.environment ToolEnvironment reads the column\(s\) \['answer'\]"):
        records = [r for batch in trainer.predict(module, data) for r in batch]
    assert len(records) == 3 and all("score" not in r and r["response"] for r in records)
    data = PromptDataModule(model_name="embedded:tiny-gpt2", dataset=str(train), prompt_column="question",
                            predict_path=str(train), eval_batch_size=4)  # with answers: scored by the environment
    records = [r for batch in trainer.predict(module, data) for r in batch]
    assert len(records) == 8 and all(r["score"] in (0.0, 1.0) and r["scorer"] == "ToolEnvironment" for r in records)
