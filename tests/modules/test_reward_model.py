"""RewardModelModule: the Bradley-Terry loss by hand, a short fit that learns a rule, the export that
ClassifierReward loads as it is."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.modules import RewardModelModule
from lit_rlhf.rewards import ClassifierReward
from lit_rlhf.settings import LoraSettings
from conftest import assert_resume_is_exact, fake_sharding, good_bad_pairs, write_jsonl

# small files are converted into each test's folder, not the user's datasets cache
pytestmark = pytest.mark.usefixtures("datasets_cache")


def test_fit_learns_a_rule_and_the_export_loads_as_classifier_reward(tmp_path):
    L.seed_everything(0)  # the new head's initial weights
    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, good_bad_pairs(60))
    dm = PreferenceDataModule(model_name="embedded:tiny-gpt2", dataset=str(source), test_size=0.2, batch_size=8,
                              eval_batch_size=12, classifier_inputs=True)
    module = RewardModelModule("embedded:tiny-gpt2", lora=LoraSettings(r=8, alpha=16, dropout=0.0),
                               learning_rate=1e-2, center_coef=0.01)
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]
    # an untrained head may rank this rule's pairs either way (the last word decides); trained, it must be right
    # by a clear margin
    assert after["val/accuracy"] > 0.9 and after["val/margin"] > max(before["val/margin"], 0.0) + 1.0
    assert after["val/loss"] < before["val/loss"]

    reward = ClassifierReward(model_name=str(tmp_path / "reward_model"), label="reward", text="prompt+response")
    reward.setup()
    batch = next(iter(dm.val_dataloader()))
    chosen = reward.compute(batch["query"], batch["chosen"], None)
    rejected = reward.compute(batch["query"], batch["rejected"], None)
    assert (chosen > rejected).float().mean() > 0.9
    # the export scores exactly as the trained module
    with torch.no_grad():
        torch.testing.assert_close(chosen, module.pair_rewards(batch)[0], rtol=1e-4, atol=1e-4)


def test_bad_settings_name_their_flag():
    with pytest.raises(ValueError, match="model.center_coef"):
        RewardModelModule("embedded:tiny-gpt2", center_coef=-1.0)
    with pytest.raises(ValueError, match="model.lora.r"):
        RewardModelModule("embedded:tiny-gpt2", lora=LoraSettings(r=0))
    module = RewardModelModule("embedded:tiny-gpt2", finetune="full")
    with pytest.raises(ValueError, match="PreferenceDataModule"):
        module.pair_rewards({"input_ids": torch.ones(1, 2, dtype=torch.long)})


def test_a_reward_model_refuses_pairs_without_classifier_inputs(tmp_path):
    """A data module left as for DPO (no classifier inputs) is refused before the first step, naming the flag."""
    source = write_jsonl(tmp_path / "pairs.jsonl", good_bad_pairs(10))
    dm = PreferenceDataModule(model_name="embedded:tiny-gpt2", dataset=str(source), batch_size=4)
    module = RewardModelModule("embedded:tiny-gpt2", finetune="full")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="data.classifier_inputs=true"):
        trainer.fit(module, datamodule=dm)
    assert module.model is None  # refused before the model loads


def test_an_encoder_classifier_gets_one_output_and_exports(tmp_path):
    from conftest import build_tiny_classifier

    pairs = good_bad_pairs(20)
    words = [w for r in pairs for t in r.values() for w in t.split()] + ["?"]
    build_tiny_classifier(tmp_path / "roberta", words)
    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, pairs)
    dm = PreferenceDataModule(model_name=str(tmp_path / "roberta"), dataset=str(source), batch_size=4,
                              classifier_inputs=True)
    module = RewardModelModule(str(tmp_path / "roberta"), finetune="full", export_dir=str(tmp_path / "rm"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    reward = ClassifierReward(model_name=str(tmp_path / "rm"), label="reward", text="prompt+response")
    reward.setup()
    assert reward.model.config.id2label == {0: "reward"} and reward.label_index == 0
    assert reward.compute(["a prompt"], ["the cat is good"], None).shape == (1,)


def test_long_prompts_train_within_the_classifier_limit_and_it_reads_each_response(tmp_path):
    """A classifier with 16 positions and prompts of ~40 tokens: each side is cut to 16 tokens from the prompt's
    start, the two responses stay whole (so their rewards differ), and a pair whose response alone is longer
    than the classifier reads is dropped and counted."""
    from conftest import build_tiny_classifier

    pairs = [{**p, "prompt": " ".join([p["prompt"]] * 6)} for p in good_bad_pairs(12)]
    pairs.append({"prompt": "what about it?", "chosen": "the cat is good " * 5, "rejected": "the cat is bad"})
    words = [w for r in pairs for t in r.values() for w in t.split()] + ["?"]
    build_tiny_classifier(tmp_path / "roberta", words, max_tokens=16)
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    dm = PreferenceDataModule(model_name=str(tmp_path / "roberta"), dataset=str(source), batch_size=4,
                              test_size=0.25, shuffle=False, classifier_inputs=True)
    module = RewardModelModule(str(tmp_path / "roberta"), finetune="full", export_dir=str(tmp_path / "rm"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=dm)  # past the position limit this was an IndexError
    assert dm.summary()["skipped_too_long"] == 1
    batch = next(iter(dm.val_dataloader()))
    tokens = dm.tokenizer.convert_ids_to_tokens
    for i in range(len(batch["id"])):
        chosen = batch["chosen_input_ids"][i][batch["chosen_attention_mask"][i].bool()].tolist()
        rejected = batch["rejected_input_ids"][i][batch["rejected_attention_mask"][i].bool()].tolist()
        assert len(chosen) == len(rejected) == 16
        assert tokens(chosen)[-5:-1] == batch["chosen"][i].split() and tokens(rejected)[-1] == "</s>"
        assert tokens(rejected)[-5:-1] == batch["rejected"][i].split()
    with torch.no_grad():
        chosen_rewards, rejected_rewards = module.pair_rewards(batch)
    assert (chosen_rewards != rejected_rewards).all()


def test_lit_rlhf_rm_fits_exports_and_tests_from_the_checkpoint(tmp_path, monkeypatch):
    from lit_rlhf.cli import run_rm

    monkeypatch.chdir(tmp_path)
    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, good_bad_pairs(20))
    common = ["--model.model_name", "embedded:tiny-gpt2", "--data.dataset", str(source), "--data.batch_size", "4",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    cli = run_rm(["fit", *common, "--trainer.max_steps", "2", "--model.lora.r", "4"])
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "reward_model" / "config.json").is_file() and (log_dir / "config.yaml").is_file()
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    tested = run_rm(["test", *common, "--ckpt_path", str(ckpt)])
    assert {"test/loss", "test/accuracy", "test/margin"} <= set(tested.trainer.callback_metrics)

    # predict: the reward of each (prompt, response) row, as the exported model gives it to PPO
    rows = [{"id": f"q{i}", "prompt": p["prompt"], "response": p[side]}
            for i, p in enumerate(good_bad_pairs(3)) for side in ("chosen", "rejected")]
    write_jsonl(tmp_path / "to_score.jsonl", rows)
    # only the checkpoint: the run's config.yaml gives the model and data settings
    run_rm(["predict", "--ckpt_path", str(ckpt), "--data.predict_path", str(tmp_path / "to_score.jsonl")])
    records = [json.loads(line) for line in (log_dir / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prompt"], r["response"]) for r in records] == [(r["id"], r["prompt"], r["response"]) for r in rows]
    reward = ClassifierReward(model_name=str(log_dir / "reward_model"), label="reward", text="prompt+response")
    reward.setup()
    expected = reward.compute([r["prompt"] for r in rows], [r["response"] for r in rows], None)
    torch.testing.assert_close(torch.tensor([r["score"] for r in records]), expected, rtol=1e-4, atol=1e-4)
    write_jsonl(tmp_path / "no_response.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="data.response_column='response'"):
        run_rm(["predict", *common, "--ckpt_path", str(ckpt), "--data.predict_path", str(tmp_path / "no_response.jsonl")])
    write_jsonl(tmp_path / "null_response.jsonl", [{"id": "x", "prompt": "hi", "response": None}])
    with pytest.raises(ValueError, match="every row has a null or empty 'response'.*row 'x'"):
        run_rm(["predict", "--ckpt_path", str(ckpt), "--data.predict_path", str(tmp_path / "null_response.jsonl")])


def test_a_response_only_reward_model_predicts_from_its_checkpoint_alone(tmp_path, monkeypatch):
    """A reward model trained with data.classifier_text=response scores the response alone in predict, given only
    its checkpoint (the run's config.yaml holds the setting), as ClassifierReward(text=response) does in PPO;
    the rows need no prompt column."""
    from lit_rlhf.cli import run_rm

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", good_bad_pairs(20))
    cli = run_rm(["fit", "--model.model_name", "embedded:tiny-gpt2", "--data.dataset", "pairs.jsonl",
                  "--data.classifier_text", "response", "--data.batch_size", "4", "--trainer.max_steps", "2",
                  "--model.lora.r", "4", "--trainer.enable_progress_bar", "false"])
    log_dir = Path(cli.trainer.log_dir)
    rows = [{"response": "the cat is good"}, {"response": "the dog is bad"}, {"response": "the cat is good"}]
    write_jsonl(tmp_path / "responses.jsonl", rows)
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    run_rm(["predict", "--ckpt_path", str(ckpt), "--data.predict_path", str(tmp_path / "responses.jsonl")])
    scores = [json.loads(line)["score"] for line in (log_dir / "predictions.jsonl").read_text().splitlines()]
    reward = ClassifierReward(model_name=str(log_dir / "reward_model"), label="reward", text="response")
    reward.setup()
    expected = reward.compute([""] * 3, [r["response"] for r in rows], None)
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-4, atol=1e-4)


def test_a_resumed_reward_model_fit_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """4 steps, then resumed from that checkpoint to 8: the exported reward model equals that of 8 steps in one
    go, bit for bit (prompt stream position, optimizer, step and the dropout's RNG states come back)."""
    from lit_rlhf.cli import run_rm

    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("pairs.jsonl"), good_bad_pairs(40))
    assert_resume_is_exact(run_rm, [
        "--model.model_name", "embedded:tiny-gpt2", "--data.dataset", "pairs.jsonl", "--data.batch_size", "4",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.lora.r", "4",
        "--trainer.limit_val_batches", "0", "--seed_everything", "3"], "reward_model/model.safetensors")


def classifier_batch(module: RewardModelModule) -> dict:
    texts = ["what about the cat?\nthe dog is good", "a prompt\nthe lake is bad and long"]
    encoded = module.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.mark.parametrize("sharding", ["deepspeed_zero3", "fsdp"])
def test_the_export_writes_the_gathered_weights_when_they_are_sharded(sharding, tmp_path, monkeypatch):
    # Under ZeRO-3 or FSDP a process holds a shard of each weight: the export gathers them all (the frozen base
    # too: the adapter is merged into it) through distributed.export_weights, PPO's export path. Faked: the live
    # weights are zeros except inside the strategy's gathering, which puts the trained weights back.
    from types import SimpleNamespace

    torch.manual_seed(0)
    module = RewardModelModule("embedded:tiny-gpt2", export_dir=str(tmp_path / "rm"))
    module.configure_model()
    module.eval()  # no lora dropout
    with torch.no_grad():  # a trained adapter and head: outputs away from the base's
        for name, param in module.model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    batch = classifier_batch(module)
    with torch.no_grad():
        expected = module.rewards(**batch)
    params = list(module.model.parameters())
    strategy = fake_sharding(sharding, module, params, monkeypatch)
    module.trainer = SimpleNamespace(world_size=2, is_global_zero=True, strategy=strategy, datamodule=None)
    module.on_fit_end()

    reward = ClassifierReward(model_name=str(tmp_path / "rm"), label="reward", output="logit")
    reward.setup()
    with torch.no_grad():
        exported = reward.model(**batch).logits[:, 0]
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-4)
    assert all(not p.abs().sum() for p in params)  # the training model was not changed by the export


def test_model_dtype_halves_the_frozen_base_and_keeps_the_trained_weights_float32():
    module = RewardModelModule("embedded:tiny-gpt2", dtype="bfloat16")
    module.configure_model()
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in module.model.named_parameters() if not p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert any("score" in n for n in trained)  # the head peft trains in full, in float32 too
    rewards = module.rewards(**classifier_batch(module))
    assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    rewards.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in trained.items() if "score" in n)
    with pytest.raises(ValueError, match="model.dtype=bfloat16"):
        RewardModelModule("embedded:tiny-gpt2", finetune="full", dtype="bfloat16")
    assert RewardModelModule("embedded:tiny-gpt2").hparams.dtype == "auto"
