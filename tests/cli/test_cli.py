"""The lit-rlhf command: every shipped config parses; the embedded default and the recipe config run a step."""

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import build_tiny_classifier
from lit_rlhf.cli import DEFAULT_CONFIG, config_path, packaged_configs, resolve_configs, run, with_default_config
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.modules import PPOModule

# PPO configs (lit-rlhf); the SFT configs (sft_*.yaml, lit-rlhf-sft) are parsed in test_sft.py
CONFIGS = sorted(p for p in Path(__file__).parents[2].joinpath("configs").glob("*.yaml") if not p.name.startswith("sft_"))
TINY = config_path("embedded_t5.yaml")  # the tiny random T5: seconds per run
FLAGS = ["--model.ppo_steps", "2", "--model.generation.max_new_tokens", "[4, 8]", "--data.batch_size", "8",
         "--trainer.enable_progress_bar", "false"]
QUICK = ["--config", TINY, *FLAGS]


def test_configs_exist_and_are_packaged():
    names = {p.name for p in CONFIGS}
    assert {"embedded_t5.yaml", "embedded_gpt2.yaml", "detox_flan_t5.yaml", "detox_gpt2.yaml"} <= names
    # the packaged default is the repo's configs/detox_summarizer.yaml (the offline recipe)
    assert DEFAULT_CONFIG == "detox_summarizer.yaml"
    assert Path(config_path()).read_text() == Path(CONFIGS[0].parent, DEFAULT_CONFIG).read_text()


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
    assert with_default_config(["fit"]) == ["fit", "--config", config_path(DEFAULT_CONFIG)]
    assert with_default_config(["fit", "--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert with_default_config(["--help"]) == ["--help"]


def test_packaged_configs_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside the repository, as with an installed wheel: no configs/ here
    for spelled in ("embedded_grpo.yaml", "configs/embedded_grpo.yaml", "lit_rlhf/configs/embedded_grpo.yaml"):
        assert resolve_configs(["fit", "--config", spelled]) == ["fit", "--config", config_path("embedded_grpo.yaml")]
    assert resolve_configs(["fit", "--config=configs/strategy/ddp.yaml", "--model.ppo_steps", "3"]) == [
        "fit", f"--config={config_path('strategy/ddp.yaml')}", "--model.ppo_steps", "3"]
    with pytest.raises(ValueError, match=r"^--config nowhere.yaml: no such file, and no packaged config of that name "
                                         r"\(packaged: .*embedded_grpo.yaml.*strategy/ddp.yaml"):
        resolve_configs(["fit", "--config", "nowhere.yaml"])
    # the README's command, from here
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "configs/embedded_grpo.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["samples_per_prompt"] == 4
    # a file that exists comes first
    Path("embedded_grpo.yaml").write_text("seed_everything: 1\n")
    assert resolve_configs(["fit", "-c", "embedded_grpo.yaml"]) == ["fit", "-c", "embedded_grpo.yaml"]


@pytest.mark.parametrize("entry", ["run", "run_dpo"])  # lit-rlhf-sft and -rm share -dpo's settings
def test_help_lists_the_packaged_configs(entry, capsys):
    import lit_rlhf.cli.commands as cli_module

    names = packaged_configs()
    assert {"embedded_grpo.yaml", "strategy/ddp.yaml", "offline/local_models.yaml",
            "preferences/dpo_summarizer.yaml"} <= set(names)
    with pytest.raises(SystemExit):
        getattr(cli_module, entry)(["--help"])
    listed = capsys.readouterr().out.split("Packaged configs")[1].split("\n\n")[0].split()
    assert set(names) <= set(listed)


def test_only_a_checkpoint_means_its_runs_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = Path("logs/lightning_logs/version_2")
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    Path(ckpt).write_bytes(b"")  # read later, by the command
    with pytest.raises(ValueError, match=rf"--ckpt_path {ckpt}: no .*config.yaml, the run's settings .*--config FILE"):
        with_default_config(["fit", "--ckpt_path", ckpt])
    (run_dir / "config.yaml").write_text("seed_everything: 0\n")
    run_config = str((run_dir / "config.yaml").absolute())
    for sub in ("fit", "validate", "test", "predict"):  # every subcommand, with the flags given after it
        assert with_default_config([sub, "--ckpt_path", ckpt, "--model.ppo_steps", "9"]) == [
            sub, "--config", run_config, "--ckpt_path", ckpt, "--model.ppo_steps", "9"]
    assert with_default_config(["test", f"--ckpt_path={ckpt}"]) == [
        "test", "--config", run_config, f"--ckpt_path={ckpt}"]
    # a config given is used as it is; a checkpoint outside a run folder needs one
    assert with_default_config(["fit", "--config", "x.yaml", "--ckpt_path", ckpt])[:3] == ["fit", "--config", "x.yaml"]
    Path("elsewhere.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="it is not in a run folder.*--config FILE"):
        with_default_config(["fit", "--ckpt_path", "elsewhere.ckpt"])
    with pytest.raises(ValueError, match="--ckpt_path missing.ckpt: no such file"):
        with_default_config(["test", "--ckpt_path", "missing.ckpt"])


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


# ------------------------------------------------------------------ resume, run folders, failed starts


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-PPO-step run of the embedded default (learning rate given as a flag), copied per test."""
    root = tmp_path_factory.mktemp("finished")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run(["fit", *QUICK, "--model.learning_rate", "0.0025"])
    finally:
        os.chdir(cwd)
    return root / "logs"


@pytest.fixture
def workdir(tmp_path, monkeypatch, finished_run):
    """A fresh working directory holding a copy of ``finished_run``'s logs; returns its last.ckpt."""
    shutil.copytree(finished_run, tmp_path / "logs")
    monkeypatch.chdir(tmp_path)
    return Path("logs/lightning_logs/version_0/checkpoints/last.ckpt")


def run_folders() -> list[str]:
    return sorted(p.name for p in Path("logs/lightning_logs").iterdir())


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the finished-run resume used to loop over empty epochs forever)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_resuming_a_finished_run_stops_at_once(workdir, capsys):
    before = {p: p.stat().st_mtime_ns for p in Path("logs").rglob("*") if p.is_file()}
    with deadline(120):
        cli = run(["fit", "--ckpt_path", str(workdir), *QUICK])
    assert "Nothing to do" in capsys.readouterr().err
    assert cli.model.ppo_step == 0  # not even restored: fit never started
    # nothing written: no new run folder, no file touched
    assert run_folders() == ["version_0"]
    assert {p: p.stat().st_mtime_ns for p in Path("logs").rglob("*") if p.is_file()} == before


def test_finished_module_stops_when_resumed_through_the_trainer(workdir):
    """The same through the Python API (no CLI): the module's hooks stop the trainer."""
    hparams = torch.load(workdir, weights_only=True)["hyper_parameters"]
    hparams.pop("_instantiator")
    module = PPOModule(**{**hparams, "export_adapter": False})
    trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    with deadline(120):
        trainer.fit(module, DialogSumDataModule(model_name="embedded:tiny-t5", batch_size=8), ckpt_path=workdir)
    assert module.ppo_step == 2 and trainer.current_epoch <= 1


def test_a_given_flag_wins_over_the_checkpoint_and_extends_the_run(workdir, capsys):
    with deadline(300):
        cli = run(["fit", "--ckpt_path", str(workdir), *QUICK[:3], "3", *QUICK[4:]])
    err = capsys.readouterr().err
    assert cli.model.ppo_step == 3 and cli.model.hparams.ppo_steps == 3
    # one line per differing setting: the flag given, and a checkpoint value the config does not have
    assert err.count("model.ppo_steps=3 (given) replaces the checkpoint's 2") == 1
    assert "model.learning_rate=0.0025 comes from the checkpoint" in err
    assert cli.model.hparams.learning_rate == pytest.approx(0.0025)
    # the resumed run continues in its own folder: same TensorBoard version, config, report and adapter there
    assert run_folders() == ["version_0"] and Path(cli.trainer.log_dir).resolve() == workdir.parents[1].resolve()
    assert yaml.safe_load((workdir.parents[1] / "config.yaml").read_text())["model"]["ppo_steps"] == 3
    events = EventAccumulator(str(workdir.parents[1]))
    events.Reload()
    assert [e.step for e in events.Scalars("env/reward_mean")] == [1, 2, 3]
    assert torch.load(workdir, weights_only=True)["lit_rlhf"]["ppo_step"] == 3


def test_test_and_validate_write_into_the_checkpoint_run(workdir):
    fit_config = (workdir.parents[1] / "config.yaml").read_text()
    small = ["--data.eval_batch_size", "8", "--data.test_size", "0.002", *QUICK]  # 21 held-out prompts
    validate_cli = run(["validate", "--ckpt_path", str(workdir), *small])
    # the fit config's limit_val_batches=0 is replaced: validate measures every held-out prompt
    assert validate_cli.trainer.limit_val_batches == 1.0
    metrics = validate_cli.trainer.callback_metrics
    assert torch.isfinite(metrics["val/reward_mean"]) and torch.isfinite(metrics["val/kl"])
    test_cli = run(["test", "--ckpt_path", str(workdir), "--trainer.limit_test_batches", "1", *small])
    assert "test/reward_mean" in test_cli.trainer.callback_metrics
    run_dir = workdir.parents[1]
    assert run_folders() == ["version_0"]
    assert (run_dir / "test_report.md").exists()  # the toxicity callback's report of the tested model
    assert (run_dir / "validate_config.yaml").exists() and (run_dir / "test_config.yaml").exists()
    assert (run_dir / "config.yaml").read_text() == fit_config  # the fit's own config is kept
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert "val/reward_mean" in events.Tags()["scalars"] and "test/reward_mean" in events.Tags()["scalars"]


def test_a_missing_checkpoint_is_one_clear_error_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--ckpt_path nowhere/last.ckpt: no such file"):
        run(["fit", "--ckpt_path", "nowhere/last.ckpt", *QUICK])
    assert not Path("logs").exists()


def test_a_start_that_fails_inside_fit_leaves_no_folder(tmp_path, monkeypatch):
    # the train dataloader refuses a batch larger than the data: raised after Lightning made the run folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        run(["fit", *QUICK, "--data.batch_size", "100000", "--model.mini_batch_size", "4"])
    assert not Path("logs/lightning_logs").exists() or run_folders() == []


def test_an_evaluator_that_cannot_load_names_its_setting_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).parents[2] / "configs" / "detox_flan_t5.yaml"
    from lit_rlhf.models import resolve_model_path

    classifier = build_tiny_classifier(tmp_path / "classifier", ["a tiny vocabulary for the test classifier"])
    with pytest.raises(ValueError, match=r"ToxicityCallback's evaluator ClassifierToxicity \(init_args.model_name="
                                         r"'facebook/roberta-hate-speech-dynabench-r4-target'"):
        run(["fit", "--config", str(recipe), "--model.model_name", resolve_model_path("embedded:tiny-t5"),
             "--model.reward.init_args.model_name", str(classifier), "--data.dataset", "bundled",
             "--trainer.accelerator", "cpu", "--trainer.devices", "1", *FLAGS])
    assert not Path("logs").exists()


def test_embedded_gpt2_writes_last_ckpt_and_the_toxicity_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(Path(__file__).parents[2] / "configs" / "embedded_gpt2.yaml"), *FLAGS])
    run_dir = Path(cli.trainer.log_dir)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["lit_rlhf"]["ppo_step"] == 2
    assert json.loads((run_dir / "report.json").read_text())["num_prompts"] > 0


def test_run_folder_of_a_checkpoint(tmp_path):
    from lit_rlhf.runtime import RunFolder, run_folder_of

    folder = run_folder_of("logs/lightning_logs/version_3/checkpoints/last.ckpt")
    assert folder.name == "lightning_logs" and folder.version == 3
    assert folder.path == Path("logs/lightning_logs/version_3").absolute()
    assert run_folder_of("somewhere/last.ckpt") is None
    assert run_folder_of("runs/exp/my_run/checkpoints/x.ckpt").version == "my_run"
    # an absolute path to a run whose ModelCheckpoint stored a relative folder keeps that spelling
    relative = "logs/lightning_logs/version_0/checkpoints"
    (tmp_path / relative).mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        spelled = run_folder_of(tmp_path / relative / "last.ckpt", [relative])
    finally:
        os.chdir(cwd)
    assert spelled == RunFolder("logs", "lightning_logs", 0)


def test_given_flags_win_and_the_rest_comes_from_the_checkpoint():
    from jsonargparse import Namespace

    from lit_rlhf.runtime import combine_with_checkpoint, given_model_keys

    given = given_model_keys(["--config", "x.yaml", "--model.ppo_steps", "105", "--model.generation.top_p=0.9",
                              "--data.batch_size", "8"])
    assert given == ["ppo_steps", "generation.top_p"]
    parsed = Namespace(ppo_steps=105, learning_rate=3e-3, rollout_batch_size=8,
                       generation=Namespace(top_p=0.9, max_new_tokens=[16, 48]))
    stored = Namespace(ppo_steps=100, learning_rate=1e-3, rollout_batch_size=16,
                       generation=Namespace(top_p=1.0, max_new_tokens=(16, 48)))
    combined, notices = combine_with_checkpoint(parsed, stored, given)
    assert combined.ppo_steps == 105 and combined.generation.top_p == 0.9  # given: the flag wins
    assert combined.learning_rate == 1e-3  # not given: the checkpoint's, so the run continues as it was
    assert combined.rollout_batch_size == 16  # a link target: left to the link
    assert len(notices) == 3  # (16, 48) equals [16, 48]; the link target is not compared
    assert notices[0].startswith("model.generation.top_p=0.9 (given)")


COMMANDS_FROM_A_CHECKPOINT = {
    # command: (its entry, the module, a setting given as a flag, another the checkpoint keeps)
    "lit-rlhf-sft": ("run_sft", "lit_rlhf.modules.sft:SFTModule", ("learning_rate", 2e-3, 5e-3), ("warmup_steps", 7)),
    "lit-rlhf-rm": ("run_rm", "lit_rlhf.modules.reward_model:RewardModelModule", ("center_coef", 0.5, 0.01),
                    ("weight_decay", 0.2)),
    "lit-rlhf-dpo": ("run_dpo", "lit_rlhf.modules.dpo:DPOModule", ("beta", 0.9, 0.1), ("label_smoothing", 0.2)),
}


@pytest.mark.parametrize("command", COMMANDS_FROM_A_CHECKPOINT)
def test_every_command_lets_a_given_flag_win_over_its_checkpoint(command, tmp_path, monkeypatch, capsys):
    """As lit-rlhf does: the flag given wins, every other model setting comes from the checkpoint."""
    import importlib

    import lit_rlhf.cli.commands as cli_module

    entry, module_path, (given, flag_value, stored_value), (kept, kept_value) = COMMANDS_FROM_A_CHECKPOINT[command]
    module_name, class_name = module_path.split(":")
    module_class = getattr(importlib.import_module(module_name), class_name)
    monkeypatch.chdir(tmp_path)
    Path("pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    run_dir = Path("logs/lightning_logs/version_0")
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model:\n  model_name: embedded:tiny-gpt2\n"
                                         + ("data:\n  dataset: pairs.jsonl\n" if command != "lit-rlhf-sft" else ""))
    # the hyperparameters the module itself saves (its policy is built later, in configure_model)
    stored = module_class(model_name="embedded:tiny-gpt2", **{given: stored_value, kept: kept_value})
    torch.save({"hyper_parameters": dict(stored.hparams)}, run_dir / "checkpoints" / "last.ckpt")
    # parse, merge and instantiate, without running the subcommand
    monkeypatch.setattr(cli_module.CommonCLI, "_run_subcommand", lambda self, subcommand: None)
    cli = getattr(cli_module, entry)(["fit", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                                      f"--model.{given}", str(flag_value)])
    assert cli.model.hparams[given] == pytest.approx(flag_value)
    assert cli.model.hparams[kept] == pytest.approx(kept_value)
    err = capsys.readouterr().err
    assert f"model.{given}={flag_value!r} (given) replaces the checkpoint's {stored_value!r}" in err
    # its progress bar shows measurements, not the run folder's version number
    assert "v_num" not in cli.trainer.progress_bar_callback.get_metrics(cli.trainer, cli.model)


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


# ------------------------------------------------------------------ help, errors, warnings


def test_help_states_the_default_config_and_lists_rewards_and_evaluators(capsys):
    import inspect

    import lit_rlhf.callbacks.evaluators as evaluators
    import lit_rlhf.rewards as rewards

    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--help"])
    assert exit_info.value.code in (0, None)
    help_text = capsys.readouterr().out
    top = help_text[:600]
    assert "detox_summarizer.yaml" in top and "lit-rlhf fit --print_config" in top
    for module, base in ((rewards, rewards.Reward), (evaluators, evaluators.ToxicityEvaluator)):
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if issubclass(c, base) and c is not base and c.__module__.startswith(module.__name__)]
        assert classes
        for cls in classes:  # one line each: "  Name   what it does"
            assert any(line.split()[:1] == [cls.__name__] for line in help_text.splitlines()), cls.__name__


def test_only_the_subcommand_given_gets_its_full_parser(capsys):
    """Each full subcommand parser reads the trainer's, module's and data module's signatures and docstrings:
    a command builds the one it runs (none for the main --help)."""
    from lit_rlhf.cli import SUBCOMMANDS, needed_subcommands

    assert needed_subcommands(["fit", "--config", "x.yaml", "--help"], SUBCOMMANDS) == {"fit"}
    assert needed_subcommands(["--config", "x.yaml", "test", "--ckpt_path", "a.ckpt"], SUBCOMMANDS) == {"test"}
    assert needed_subcommands(["--help"], SUBCOMMANDS) == set()
    assert needed_subcommands(["--config", "x.yaml"], SUBCOMMANDS) == set(SUBCOMMANDS)  # the config may name it
    with pytest.raises(SystemExit):
        run(["--help"])
    listed = capsys.readouterr().out
    assert all(f"    {sub} " in listed for sub in SUBCOMMANDS)


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--model.learning_rat", "1e-3", "--print_config"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --model.learning_rat" in capsys.readouterr().err


def test_a_user_error_is_one_line_unless_debugging(tmp_path, monkeypatch, capsys):
    from lit_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-rlhf", "fit", "--ckpt_path", "missing.ckpt"])
    monkeypatch.delenv("LIT_RLHF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lit-rlhf: error: --ckpt_path missing.ckpt: no such file  (LIT_RLHF_DEBUG=1 shows the traceback)"]
    monkeypatch.setenv("LIT_RLHF_DEBUG", "1")
    with pytest.raises(ValueError, match="no such file"):
        main()


@pytest.mark.parametrize("case", ["classifier max_length", "reward argument", "data batch_size"])
def test_user_errors_name_the_flag_to_change(case, tmp_path, monkeypatch, capsys):
    """The one line a user sees names the flag (``--model.reward.max_length``), not a constructor argument."""
    from lit_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_RLHF_DEBUG", raising=False)
    classifier = build_tiny_classifier(tmp_path / "classifier", ["a tiny vocabulary"], max_tokens=128)
    flags, message = {
        # the README's reward-model-to-PPO command with a classifier of 128 positions: the reward's default 512
        "classifier max_length": (
            ["--model.reward", "lit_rlhf.rewards.ClassifierReward", "--model.reward.model_name", str(classifier)],
            f"--model.reward.max_length is 512 but {classifier} reads at most 128 tokens; set "
            f"--model.reward.max_length to 128 or less"),
        "reward argument": (["--model.reward", "lit_rlhf.rewards.ProfanityReward", "--model.reward.eps", "0.7"],
                            "--model.reward.eps must be in (0, 0.5), got 0.7"),
        "data batch_size": (["--data.batch_size", "100000", "--model.mini_batch_size", "4"],
                            "data.batch_size=100000 is larger than the"),
    }[case]
    monkeypatch.setattr("sys.argv", ["lit-rlhf", "fit", *QUICK, *flags])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lit-rlhf: error: ") and message in last, last


def test_the_predictions_line_comes_after_the_progress_bar(tmp_path, caplog):
    """The file is written at the end of the predict epoch, while the bar is still open on its line; the line
    saying where comes at the end of predict, after the bar (added before the writer) has closed."""
    from types import SimpleNamespace

    from lit_rlhf.callbacks import PredictionWriter

    writer = PredictionWriter(output_dir=str(tmp_path))
    trainer = SimpleNamespace(world_size=1, global_rank=0, log_dir=None, default_root_dir=str(tmp_path))
    with caplog.at_level("INFO"):
        writer.write_on_epoch_end(trainer, None, [[{"id": "a", "score": 1.0}]], [])
        assert (tmp_path / "predictions.jsonl").is_file() and "Predictions written" not in caplog.text
        writer.on_predict_end(trainer, None)
    assert f"Predictions written to {tmp_path / 'predictions.jsonl'} (1 row)" in caplog.text


def test_only_the_known_harmless_warnings_are_filtered(caplog):
    import logging
    import warnings

    from lit_rlhf.cli import quiet_harmless_warnings

    quiet_harmless_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_harmless_warnings()  # catch_warnings resets the filters it finds; install them inside
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("Model has something else to say")
    assert [str(w.message) for w in caught] == ["Model has something else to say"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("transformers.modeling_utils").warning(
            "The tied weights mapping and config for this model specifies to tie shared.weight to lm_head.weight")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: For seamless cloud logging, ...")
        logging.getLogger("transformers.modeling_utils").warning("a different warning")
    assert [r.getMessage() for r in caplog.records] == ["a different warning"]


def test_test_and_validate_report_only_the_flags_given():
    from jsonargparse import Namespace

    from lit_rlhf.runtime import combine_with_checkpoint

    parsed, stored = Namespace(ppo_steps=100, learning_rate=1e-3), Namespace(ppo_steps=3, learning_rate=2e-3)
    combined, notices = combine_with_checkpoint(parsed, stored, ["learning_rate"], report_kept=False)
    assert (combined.ppo_steps, combined.learning_rate) == (3, 1e-3)
    assert notices == ["model.learning_rate=0.001 (given) replaces the checkpoint's 0.002"]


def test_a_parse_error_is_one_line(capsys):
    # jsonargparse's own errors (a value outside a setting's choices, an unknown or abbreviated flag) exit
    # with status 2 and one line naming the setting, not the usage text
    for flags, expected in ((["--model.ppo.kl_estimator", "bogus"], "model.ppo.kl_estimator"),
                            (["--model.learning_rat", "1e-3"], "--model.learning_rat")):
        with pytest.raises(SystemExit) as info:
            run(["fit", *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and err.startswith("lit-rlhf: error:"), err


@pytest.mark.parametrize("entry", ["run_dpo", "run_sft"])
def test_a_deepspeed_checkpoint_folder_is_left_to_the_strategy(entry, tmp_path, monkeypatch):
    """A DeepSpeed checkpoint is a folder: the command parses it as Lightning does (its strategy reads it),
    not as a missing file."""
    import lit_rlhf.cli.commands as cli_module

    monkeypatch.chdir(tmp_path)
    Path("pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    Path("zero3.ckpt").mkdir()
    monkeypatch.setattr(cli_module.CommonCLI, "_run_subcommand", lambda self, subcommand: None)  # parse only
    data = ["--data.dataset", "pairs.jsonl"] if entry == "run_dpo" else []
    cli = getattr(cli_module, entry)(["fit", "--config", cli_module.config_path(
        "sft_embedded.yaml" if entry == "run_sft" else "preferences/dpo_summarizer.yaml"),
        "--model.model_name", "embedded:tiny-gpt2", *data, "--ckpt_path", "zero3.ckpt"])
    assert cli.config["fit"]["ckpt_path"] == "zero3.ckpt"


def test_prompts_leave_room_for_the_longest_response_the_cli_generates(tmp_path, monkeypatch):
    # the data module learns model.generation.max_new_tokens' longest response (high - 1: the limit is drawn
    # from [low, high)), the room a decoder-only prompt leaves, so the rollout never cuts a prompt's start
    import lit_rlhf.cli.commands as cli_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_module.CommonCLI, "_run_subcommand", lambda self, subcommand: None)  # parse only
    cli = cli_module.run(["fit", *QUICK, "--model.model_name", "embedded:tiny-gpt2",
                          "--model.generation.max_new_tokens", "[4, 20]"])
    assert cli.datamodule.reserve_tokens == 19
    assert cli.datamodule.prompt_format().response_tokens == 19
    jsonl = ["--data", "lit_rlhf.data.PromptDataModule", "--data.dataset", "prompts.jsonl"]
    cli = cli_module.run(["fit", "--model.model_name", "embedded:tiny-gpt2", *FLAGS, *jsonl])
    assert cli.datamodule.reserve_tokens == 7
