"""Resuming lit-rlhf runs and their run folders: a finished run stops at once, a flag given wins over the
checkpoint (in every command) and extends the run in its own folder, test and validate write there, and a start
that fails leaves no folder behind."""

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

from cli_flags import FLAGS, QUICK
from conftest import build_tiny_classifier
from lit_rlhf.cli import run
from lit_rlhf.cli.base import CommonCLI
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.modules import PPOModule

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

    import lit_rlhf.cli as cli_module

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
    monkeypatch.setattr(CommonCLI, "_run_subcommand", lambda self, subcommand: None)
    cli = getattr(cli_module, entry)(["fit", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                                      f"--model.{given}", str(flag_value)])
    assert cli.model.hparams[given] == pytest.approx(flag_value)
    assert cli.model.hparams[kept] == pytest.approx(kept_value)
    err = capsys.readouterr().err
    assert f"model.{given}={flag_value!r} (given) replaces the checkpoint's {stored_value!r}" in err
    # its progress bar shows measurements, not the run folder's version number
    assert "v_num" not in cli.trainer.progress_bar_callback.get_metrics(cli.trainer, cli.model)
