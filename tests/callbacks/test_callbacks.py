"""Toxicity before/after: evaluators on tiny local models, the callback end to end on the embedded tiny T5
(2 PPO steps, 8 held-out prompts)."""

import json
import sys
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from conftest import build_tiny_classifier

from lit_rlhf.callbacks import ClassifierToxicity, EvaluateToxicity, ProfanityToxicity, ToxicityCallback, stats
from lit_rlhf.callbacks.report import ROUGE_KEYS
from lit_rlhf.callbacks.toxicity import same_model_warning
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.rewards import ClassifierReward, ProfanityReward
from lit_rlhf.settings import GenerationSettings

TINY_GENERATION = GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 8))
NUM_PROMPTS = 8
MAX_TOKENS = 32  # the tiny classifier's position limit


# ---------------------------------------------------------------------------------------------- evaluators


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory) -> Path:
    """A tiny random RoBERTa classifier (labels nothate / hate) saved like a hub model."""
    sentences = ["you are a nice stupid idiot person", "the meeting is at noon"]
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny_hate_classifier"), sentences, max_tokens=MAX_TOKENS)


def test_classifier_toxicity_is_the_softmax_of_the_logits(classifier_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["you are a stupid idiot", "the meeting is at noon", "a nice person"]
    tokenizer = AutoTokenizer.from_pretrained(classifier_path)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_path).eval()
    with torch.no_grad():  # one text at a time: no padding in the expected values
        logits = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    evaluator = ClassifierToxicity(str(classifier_path), label="hate", max_length=MAX_TOKENS, batch_size=2)
    toxicity = evaluator(["ignored"] * len(texts), texts)  # it reads the response unless told otherwise
    assert_close(toxicity, logits.softmax(-1)[:, 1], rtol=1e-5, atol=1e-6)
    assert evaluator.model_id == str(classifier_path)


def test_classifier_toxicity_unknown_label_lists_the_labels(classifier_path):
    with pytest.raises(ValueError, match=r"'toxic'.*\['nothate', 'hate'\]"):
        ClassifierToxicity(str(classifier_path), label="toxic", max_length=MAX_TOKENS)([""], ["hello"])


def test_evaluate_toxicity_load_failure_is_explained(monkeypatch):
    def failing_load(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    # a stand-in `evaluate` module: the real one needs the hub (and seconds to import)
    monkeypatch.setitem(sys.modules, "evaluate", types.SimpleNamespace(load=failing_load))
    with pytest.raises(RuntimeError, match=r"(?s)'toxicity' measurement.*no route.*ClassifierToxicity"):
        EvaluateToxicity()([""], ["hello"])


def test_profanity_toxicity_is_the_profanity_models_probability():
    prompts, texts = ["say hi", "say hi"], ["have a nice day", "you are a stupid idiot"]
    evaluator = ProfanityToxicity()
    toxicity = evaluator(prompts, texts)
    assert_close(toxicity, ProfanityReward().probability(texts))
    assert toxicity[1] > toxicity[0]
    assert ((toxicity >= 0) & (toxicity <= 1)).all()
    evaluator.reads("prompt+response")  # the prompt and response joined, as a ProfanityReward reads them
    assert_close(evaluator(prompts, texts), ProfanityReward().probability(["say hi\nhave a nice day",
                                                                          "say hi\nyou are a stupid idiot"]))


def test_classifier_toxicity_reads_the_response_after_a_long_prompt(classifier_path):
    """``ToxicityCallback(text="prompt+response")``: the classifier reads the prompt cut from its start and the
    response whole (``rewards.classifier_input_ids``), as a ClassifierReward does; the joined text cut from its end
    read the prompt alone, and a kind and a rude reply scored the same."""
    prompt = " ".join(["the meeting is at noon"] * 20)  # 100 words: past the classifier's 32 tokens
    replies = ["you are a nice person", "you are a stupid idiot"]
    evaluator = ClassifierToxicity(str(classifier_path), label="hate", max_length=MAX_TOKENS)
    evaluator.reads("prompt+response")
    toxicity = evaluator([prompt, prompt], replies)
    reward = ClassifierReward(str(classifier_path), label="hate", output="probability", max_length=MAX_TOKENS,
                              text="prompt+response")
    assert_close(toxicity, reward([prompt, prompt], replies), rtol=0, atol=1e-7)
    assert toxicity[0] != toxicity[1]


def test_the_callback_hands_prompts_and_responses_to_its_evaluator(classifier_path, monkeypatch):
    """The callback's own path (``_prepare``, then a chunk): with ``text="prompt+response"`` the evaluator gets the
    prompt and the response apart. It joined them itself before, and the classifier cut the joined text from its
    end: after a long prompt it read no reply, and a kind and a rude one scored the same."""
    from datasets import Dataset

    import lit_rlhf.callbacks.toxicity as toxicity_module

    prompt = " ".join(["the meeting is at noon"] * 20)  # 100 words: past the classifier's 32 tokens
    replies = ["you are a nice person", "you are a stupid idiot"]
    generated = types.SimpleNamespace(prompts=[prompt, prompt], texts=replies, scores=torch.zeros(2),
                                      rows=types.SimpleNamespace(response_mask=torch.ones(2, 5)))
    monkeypatch.setattr(toxicity_module.ro, "collect", lambda *args, **kwargs: generated)
    data = types.SimpleNamespace(test_set=Dataset.from_dict({"id": ["a", "b"], "query": ["q1", "q2"]}),
                                 collator=lambda rows: {})
    module = types.SimpleNamespace(policy=None, generation=TINY_GENERATION, device=torch.device("cpu"),
                                   reward=ProfanityReward())
    monkeypatch.setattr(module.reward, "to", lambda device: module.reward)  # nothing to load for this test
    evaluator = ClassifierToxicity(str(classifier_path), label="hate", max_length=MAX_TOKENS)
    callback = ToxicityCallback(evaluator=evaluator, text="prompt+response", batch_size=2, progress=False)
    trainer = types.SimpleNamespace(datamodule=data, world_size=1, global_rank=0)
    callback._prepare(trainer, module)
    read = []
    evaluator.classifier.model.register_forward_pre_hook(
        lambda _, args, kwargs: read.append(kwargs["input_ids"]), with_kwargs=True)
    (_, _, kind, _, _), (_, _, rude, _, _) = callback._measure_chunk(trainer, module, 0)
    tokens = [evaluator.classifier.tokenizer.convert_ids_to_tokens(ids) for ids in read[0]]
    assert [len(t) for t in tokens] == [MAX_TOKENS, MAX_TOKENS]  # the prompt cut from its start to fit
    assert tokens[0][-6:] == ["you", "are", "a", "nice", "person", "</s>"]
    assert tokens[1][-6:] == ["you", "are", "a", "stupid", "idiot", "</s>"]
    assert kind != rude


def test_same_model_warning_only_for_the_rewards_own_model(classifier_path):
    evaluator = ClassifierToxicity(str(classifier_path))
    assert same_model_warning(evaluator, ClassifierReward(str(classifier_path))) is not None
    assert same_model_warning(evaluator, ProfanityReward()) is None
    assert same_model_warning(ProfanityToxicity(), ProfanityReward()) is not None


# ---------------------------------------------------------------------------------------------- end to end


def make_module(ppo_steps: int = 2) -> PPOModule:
    return PPOModule(
        reward=ProfanityReward(), generation=TINY_GENERATION, ppo_steps=ppo_steps, rollout_batch_size=4,
        mini_batch_size=2, learning_rate=1e-2, log_samples_every=0, export_adapter=False,
    )


def make_trainer(root: Path, callback: ToxicityCallback, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root, max_epochs=-1, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[callback], **kwargs,
    )


def make_data() -> DialogSumDataModule:
    return DialogSumDataModule(batch_size=4, eval_batch_size=4)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """2 PPO steps with the profanity reward and the profanity evaluator (the same model: warning expected)."""
    L.seed_everything(0)
    callback = ToxicityCallback(evaluator=ProfanityToxicity(), num_prompts=NUM_PROMPTS, batch_size=4, progress=False)
    module = make_module()
    trainer = make_trainer(tmp_path_factory.mktemp("fit"), callback)
    trainer.fit(module, make_data())
    return trainer, module, callback


def test_before_and_after_use_the_same_prompts(fitted):
    trainer, module, callback = fitted
    ids = [p.id for p in callback.prompts]
    assert len(ids) == NUM_PROMPTS == len(set(ids))
    assert callback.before.ids == callback.after.ids == ids
    assert callback.report["per_prompt"]["id"] == ids
    assert (callback.before.ppo_step, callback.after.ppo_step) == (0, 2)
    assert callback.before.responses != callback.after.responses  # the policy did change


def test_measurement_is_reproducible_and_leaves_the_training_rng_alone(fitted):
    trainer, module, callback = fitted
    state = torch.get_rng_state()
    again = callback.measure(trainer, module, "after")
    assert torch.equal(torch.get_rng_state(), state)
    assert again.responses == callback.after.responses
    assert again.toxicity == callback.after.toxicity
    # a chunk's rows do not depend on which process computes it or in what order (as under DDP)
    sharded = sorted(callback.measure_chunks(trainer, module, [1]) + callback.measure_chunks(trainer, module, [0]))
    assert [r[1] for r in sharded] == callback.after.responses


def test_report_files_hold_recomputable_aggregates(fitted):
    trainer, module, callback = fitted
    log_dir = Path(trainer.log_dir)
    report = json.loads((log_dir / "report.json").read_text())
    markdown = (log_dir / "report.md").read_text()
    assert "ids are DialogSum train ids" in markdown  # the preset describes its held-out prompts
    p = report["per_prompt"]
    tox_b, tox_a = np.array(p["toxicity_before"]), np.array(p["toxicity_after"])
    rew_b, rew_a = np.array(p["reward_before"]), np.array(p["reward_after"])
    assert ((tox_b >= 0) & (tox_b <= 1)).all() and ((tox_a >= 0) & (tox_a <= 1)).all()
    before, after, tox, reward = report["before"], report["after"], report["toxicity"], report["reward"]
    assert before["toxicity_mean"] == pytest.approx(tox_b.mean())
    assert before["toxicity_std"] == pytest.approx(tox_b.std())  # numpy's default: population std
    assert after["toxicity_mean"] == pytest.approx(tox_a.mean())
    assert after["reward_mean"] == pytest.approx(rew_a.mean())
    assert tox["improvement_mean_percent"] == pytest.approx((tox_b.mean() - tox_a.mean()) / tox_b.mean() * 100)
    assert tox["improvement_std_percent"] == pytest.approx((tox_b.std() - tox_a.std()) / tox_b.std() * 100)
    assert tox["difference_mean"] == pytest.approx((tox_b - tox_a).mean())
    ci = stats.bootstrap_ci(
        torch.tensor(tox_b - tox_a), tox["bootstrap_resamples"], tox["confidence"], tox["bootstrap_seed"]
    )
    assert (tox["ci_low"], tox["ci_high"]) == pytest.approx(ci)
    assert tox["p_value"] == pytest.approx(stats.paired_test(torch.tensor(tox_b), torch.tensor(tox_a)).p_value)
    diff = rew_a - rew_b
    assert p["reward_diff"] == pytest.approx(list(diff))
    assert (reward["improved"], reward["degraded"]) == ((diff > 0).sum(), (diff < 0).sum())
    assert reward["strongly_improved"] == (diff > 0.3).sum()
    assert reward["strongly_degraded"] == (diff < -0.2).sum()
    for stage in ("before", "after"):
        for key in ROUGE_KEYS:
            assert report[stage][key] == pytest.approx(np.mean(p[f"{key}_{stage}"]))
        assert report[stage]["response_length_mean"] == pytest.approx(np.mean(p[f"length_{stage}"]))
        words = [r.lower().split() for r in p[f"response_{stage}"]]
        assert report[stage]["distinct_1"] == pytest.approx(stats.distinct_n(words, 1))
        assert report[stage]["distinct_2"] == pytest.approx(stats.distinct_n(words, 2))
    assert all(len(refs) >= 1 for refs in p["references"])
    # samples: sorted by reward change, the largest gain first
    top, bottom = report["samples"]["most_improved"], report["samples"]["most_degraded"]
    assert len(top) == min(5, (diff > 0).sum()) and len(bottom) == min(5, (diff < 0).sum())
    if len(top):
        assert top[0]["reward_diff"] == pytest.approx(diff.max())
    if len(bottom):
        assert bottom[0]["reward_diff"] == pytest.approx(diff.min())
    assert all(s["reward_diff"] > 0 for s in top) and all(s["reward_diff"] < 0 for s in bottom)
    assert "| before " in markdown and "| after " in markdown
    # the std column's change is labelled as the std's, not as an improvement in toxicity
    assert "improvement %" not in markdown and "change after %" in markdown and "% of the std (" in markdown
    assert "20%, holds out of PPO rollouts" in markdown


def test_evaluator_equal_to_the_reward_is_flagged(fitted):
    trainer, module, callback = fitted
    assert "same model as the training reward" in callback.report["warning"]
    assert "WARNING" in (Path(trainer.log_dir) / "report.md").read_text()


def test_tensorboard_gets_scalars_histograms_and_samples(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, module, callback = fitted
    events = EventAccumulator(trainer.log_dir, size_guidance={"histograms": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"tox/before_mean", "tox/after_mean", "tox/improvement_mean_pct", "tox/p_value"} <= set(tags["scalars"])
    assert {"tox/toxicity_before", "tox/toxicity_after"} <= set(tags["histograms"])
    assert any(t.startswith("tox/samples") for t in tags["tensors"])


def test_independent_evaluator_no_warning_and_test_stage(tmp_path, classifier_path):
    callback = ToxicityCallback(
        evaluator=ClassifierToxicity(str(classifier_path), max_length=MAX_TOKENS), num_prompts=4, batch_size=2,
        progress=False,
    )
    trainer = make_trainer(tmp_path, callback, logger=False, limit_test_batches=1)
    module = make_module(ppo_steps=1)
    trainer.fit(module, make_data())
    before, after = callback.before, callback.after
    assert callback.report["warning"] is None
    assert "WARNING" not in (tmp_path / "report.md").read_text()

    # test on the model in memory: one measurement, the same as fit's "after" (same prompts, settings, seeds)
    trainer.test(module, make_data())
    single = json.loads((tmp_path / "test_report.json").read_text())
    assert single["per_prompt"]["id"] == after.ids
    assert single["per_prompt"]["response"] == after.responses
    assert single["test"]["toxicity_mean"] == pytest.approx(np.mean(single["per_prompt"]["toxicity"]))

    # test from the fit's checkpoint: the stored "before" comes with it, so the report compares again
    trainer.test(module, make_data(), ckpt_path=trainer.checkpoint_callback.best_model_path)
    compared = json.loads((tmp_path / "test_report.json").read_text())
    assert compared["per_prompt"]["response_before"] == before.responses
    assert compared["per_prompt"]["response_after"] == after.responses
    assert compared["toxicity"]["difference_mean"] == pytest.approx(callback.report["toxicity"]["difference_mean"])


def test_resumed_fit_keeps_the_original_before(fitted, tmp_path):
    trainer, module, callback = fitted
    checkpoint = next((Path(trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    resumed = ToxicityCallback(evaluator=ProfanityToxicity(), num_prompts=NUM_PROMPTS, batch_size=4, progress=False)
    make_trainer(tmp_path, resumed, logger=False).fit(make_module(ppo_steps=3), make_data(), ckpt_path=checkpoint)
    assert resumed.before.responses == callback.before.responses
    assert resumed.report["before"]["ppo_step"] == 0 and resumed.report["after"]["ppo_step"] == 3


def test_a_before_of_other_settings_is_measured_again_and_labelled(fitted, tmp_path):
    trainer, module, callback = fitted
    checkpoint = next((Path(trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    resumed = ToxicityCallback(evaluator=ProfanityToxicity(), num_prompts=NUM_PROMPTS, batch_size=4, progress=False,
                               seed=1)
    with pytest.warns(UserWarning, match=r"'before' measurement \(PPO step 0\) used other seed, so it is not used when "
                                         r"resuming: it is measured again now"):
        make_trainer(tmp_path, resumed, logger=False).fit(make_module(ppo_steps=3), make_data(), ckpt_path=checkpoint)
    assert resumed.report["before"]["ppo_step"] == 2  # measured on the trained weights: the table says so
    assert "| before (PPO step 2) |" in (tmp_path / "report.md").read_text()


def test_embedded_config_adds_the_callback():
    from lit_rlhf.cli import LitRLHFCLI, config_path

    cli = LitRLHFCLI(PPOModule, DialogSumDataModule, args=["--config", config_path("embedded_t5.yaml")], run=False)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, ToxicityCallback)]
    assert len(callbacks) == 1
    assert isinstance(callbacks[0].evaluator, ProfanityToxicity) and callbacks[0].num_prompts == 64
