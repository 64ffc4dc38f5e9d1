"""The lit-rlhf command runs: the embedded default and the recipe configs (with local stand-ins) run PPO steps,
log, export and test from a checkpoint; a bad setting stops before anything is written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli_flags import FLAGS, QUICK
from conftest import build_tiny_classifier
from lit_rlhf.cli import run

def test_bad_setting_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="mini_batch_size=3 must divide"):
        run(["fit", *QUICK, "--model.mini_batch_size", "3"])
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))


def test_embedded_default_fit_logs_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the module's seed and the data module's are separate settings: different values must not clash
    cli = run(["fit", *QUICK, "--model.seed", "3"])
    run_dir = Path(cli.trainer.log_dir)
    assert cli.model.ppo_step == 2
    assert (cli.model.hparams.seed, cli.datamodule.hparams.seed) == (3, 0)
    # links: the data module's tokenizer follows the policy, the module sees the rollout batch
    assert cli.datamodule.hparams.model_name == cli.model.hparams.model_name == "embedded:tiny-t5"
    assert cli.model.hparams.rollout_batch_size == cli.datamodule.hparams.batch_size == 8
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for name in ["env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/loss/value",
                 "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/returns/mean", "ppo/val/vpred",
                 "ppo/policy/advantages_mean", "objective/entropy", "env/reward_std", "time/ppo/generate"]:
        assert name in scalars, name
    # metrics are logged against the PPO step, not the optimizer step
    assert [e.step for e in events.Scalars("env/reward_mean")] == [1, 2]
    assert "samples/text_summary" in events.Tags()["tensors"]  # the prompt/response/reward table
    adapter = run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 32
    assert (run_dir / "config.yaml").exists()


def test_recipe_config_runs_with_local_models(tmp_path, monkeypatch):
    """configs/detox_flan_t5.yaml with its hub names overridden by local copies: policy and reward classifier."""
    from lit_rlhf.models import resolve_model_path

    monkeypatch.chdir(tmp_path)
    classifier = build_tiny_classifier(tmp_path / "classifier", ["a tiny vocabulary for the test classifier"])
    recipe = Path(__file__).parents[2] / "configs" / "detox_flan_t5.yaml"
    cli = run([
        "fit", "--config", str(recipe), "--model.model_name", resolve_model_path("embedded:tiny-t5"),
        "--model.reward.init_args.model_name", str(classifier), "--data.dataset", "bundled",
        "--trainer.callbacks", "[]", "--trainer.accelerator", "cpu", "--trainer.devices", "1", *FLAGS,
    ])
    assert cli.model.ppo_step == 2
    assert cli.model.hparams.learning_rate == pytest.approx(1.41e-5)
    assert cli.model.hparams.lora == {"r": 32, "alpha": 32, "dropout": 0.05, "target_modules": ["q", "v"], "bias": "none"}
    assert type(cli.model.reward).__name__ == "ClassifierReward" and cli.model.reward.label == "nothate"


def test_test_stage_from_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit_cli = run(["fit", *QUICK, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                   "--trainer.callbacks.save_last=true"])
    last = next(Path(fit_cli.trainer.log_dir).rglob("last.ckpt"))
    test_cli = run(["test", "--ckpt_path", str(last), "--trainer.limit_test_batches", "1",
                    "--data.eval_batch_size", "4", *QUICK])
    metrics = test_cli.trainer.callback_metrics
    for name in ["test/reward_mean", "test/kl", "test/response_length"]:
        assert name in metrics and torch.isfinite(metrics[name])
    # responses are sampled within the configured limits
    assert 1 <= float(metrics["test/response_length"]) <= 8


def test_embedded_gpt2_writes_last_ckpt_and_the_toxicity_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(Path(__file__).parents[2] / "configs" / "embedded_gpt2.yaml"), *FLAGS])
    run_dir = Path(cli.trainer.log_dir)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["lit_rlhf"]["ppo_step"] == 2
    assert json.loads((run_dir / "report.json").read_text())["num_prompts"] > 0


def test_offline_overlay_runs_the_recipe_on_local_copies(tmp_path, monkeypatch):
    """configs/offline/local_models.yaml over the FLAN-T5 recipe, with stand-ins at the paths it names."""
    from lit_rlhf.data import load_bundled_dialogsum
    from lit_rlhf.models import resolve_model_path

    monkeypatch.chdir(tmp_path)
    shutil.copytree(resolve_model_path("embedded:tiny-t5"), "local/flan-t5-base")
    bundled = load_bundled_dialogsum()
    build_tiny_classifier(Path("local/roberta-hate-speech-dynabench-r4-target"),
                          [" ".join(bundled["train"].select(range(400))["dialogue"])])
    for split, rows in (("train", 1500), ("validation", 20), ("test", 20)):
        bundled[split].select(range(rows)).to_json(f"local/dialogsum/{split}.jsonl")
    configs = Path(__file__).parents[2] / "configs"
    cli = run(["fit", "--config", str(configs / "detox_flan_t5.yaml"), "--config",
               str(configs / "offline" / "local_models.yaml"), "--trainer.accelerator", "cpu",
               "--trainer.devices", "1", *FLAGS])
    assert cli.model.ppo_step == 2
    assert cli.model.hparams.model_name == "./local/flan-t5-base" == cli.datamodule.hparams.model_name
    # the overlay changes only the reward's model: the recipe's label and output are kept
    reward = cli.model.reward
    assert (reward.model_name, reward.label, reward.output) == (
        "./local/roberta-hate-speech-dynabench-r4-target", "nothate", "logit")
    assert cli.datamodule.summary()["source"] == 1500
    report = json.loads((Path(cli.trainer.log_dir) / "report.json").read_text())
    assert report["num_prompts"] == 200
    assert "./local/roberta-hate-speech-dynabench-r4-target" in report["settings"]["evaluator"]
