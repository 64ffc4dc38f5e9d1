"""The lit-rlhf command: every shipped config parses; the embedded default and the recipe config run a step."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import build_tiny_classifier
from lit_rlhf.cli import embedded_config_path, run, with_default_config

# PPO configs (lit-rlhf); the SFT configs (sft_*.yaml, lit-rlhf-sft) are parsed in test_sft.py
CONFIGS = sorted(p for p in Path(__file__).parents[1].joinpath("configs").glob("*.yaml") if not p.name.startswith("sft_"))
QUICK = ["--model.ppo_steps", "2", "--model.generation.max_new_tokens", "[4, 8]", "--data.batch_size", "8",
         "--trainer.enable_progress_bar", "false"]


def test_configs_exist_and_are_packaged():
    names = {p.name for p in CONFIGS}
    assert {"embedded_t5.yaml", "embedded_gpt2.yaml", "detox_flan_t5.yaml", "detox_gpt2.yaml"} <= names
    # the packaged default is the repo's configs/embedded_t5.yaml
    assert Path(embedded_config_path()).read_text() == Path(CONFIGS[0].parent, "embedded_t5.yaml").read_text()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["model_name"] == source["model"]["model_name"]
    # linked values are given once, in the source of the link, so they do not appear at their target
    assert "model_name" not in printed["data"] and "rollout_batch_size" not in printed["model"]


def test_no_config_means_the_embedded_default():
    assert with_default_config(["fit"]) == ["fit", "--config", embedded_config_path()]
    assert with_default_config(["fit", "--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert with_default_config(["--help"]) == ["--help"]


def test_bad_setting_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="mini_batch_size=3 must divide"):
        run(["fit", "--model.mini_batch_size", "3", *QUICK])
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))


def test_embedded_default_fit_logs_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", *QUICK])
    run_dir = Path(cli.trainer.log_dir)
    assert cli.model.ppo_step == 2
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
    from lit_rlhf.tiny import resolve_model_path

    monkeypatch.chdir(tmp_path)
    classifier = build_tiny_classifier(tmp_path / "classifier", ["a tiny vocabulary for the test classifier"])
    recipe = Path(__file__).parents[1] / "configs" / "detox_flan_t5.yaml"
    cli = run([
        "fit", "--config", str(recipe), "--model.model_name", resolve_model_path("embedded:tiny-t5"),
        "--model.reward.init_args.model_name", str(classifier), "--data.dataset", "bundled",
        "--trainer.callbacks", "[]", "--trainer.accelerator", "cpu", "--trainer.devices", "1", *QUICK,
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
