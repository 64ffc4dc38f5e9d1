"""A run folder written by lit_rlhf 0.3's flat layout (tests/fixtures/run_0_3: its config names
``lit_rlhf.prompts.PromptDataModule``) resumes with today's packages, and old module paths read the new ones."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_rlhf.cli import run
from lit_rlhf.data import PromptDataModule
from lit_rlhf.moved import MOVED_MODULES, current_class_path

FIXTURE = Path(__file__).parents[1] / "fixtures" / "run_0_3"
CKPT = "logs/lightning_logs/version_0/checkpoints/last.ckpt"


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    shutil.copy(FIXTURE / "prompts.jsonl", tmp_path)
    shutil.copy(FIXTURE / "my_rewards.py", tmp_path)
    shutil.copytree(FIXTURE / "version_0", tmp_path / "logs" / "lightning_logs" / "version_0")
    monkeypatch.chdir(tmp_path)
    for old in MOVED_MODULES:
        monkeypatch.delitem(sys.modules, old, raising=False)  # each test sees the first import's warning
    return tmp_path


def test_validate_of_an_old_run_loads_its_weights_and_classes(old_run):
    stored = torch.load(CKPT, map_location="cpu", weights_only=True)["state_dict"]
    with pytest.warns(FutureWarning, match=r"lit_rlhf\.prompts is now lit_rlhf\.data"):
        cli = run(["validate", "--ckpt_path", CKPT, "--trainer.enable_progress_bar", "false"])
    assert type(cli.datamodule) is PromptDataModule
    assert type(cli.model.reward).__name__ == "FunctionReward"
    weights = cli.model.state_dict()
    assert stored.keys() <= weights.keys()
    for name, value in stored.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)


def test_fit_extends_an_old_run_and_writes_todays_paths(old_run):
    with pytest.warns(FutureWarning, match=r"lit_rlhf\.prompts is now lit_rlhf\.data"):
        cli = run(["fit", "--ckpt_path", CKPT, "--model.ppo_steps", "2", "--trainer.enable_progress_bar", "false"])
    assert cli.model.ppo_step == 2
    assert Path(cli.trainer.log_dir) == Path("logs/lightning_logs/version_0")
    config = yaml.safe_load(Path("logs/lightning_logs/version_0/config.yaml").read_text())
    assert config["data"]["class_path"] == "lit_rlhf.data.PromptDataModule"
    assert Path("logs/lightning_logs/version_0/adapter/adapter_model.safetensors").is_file()


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_every_old_module_reads_its_new_package(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning, match=f"{old} is now {MOVED_MODULES[old]}"):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED_MODULES[old])
    for name in getattr(new, "__all__", [n for n in vars(new) if not n.startswith("_")]):
        assert getattr(module, name) is getattr(new, name)
    with pytest.raises(AttributeError):
        module.no_such_name


def test_old_modules_find_names_in_the_files_of_their_new_package(monkeypatch):
    from lit_rlhf.data.formats import PromptFormat
    from lit_rlhf.settings import PPOSettings

    for old in ("lit_rlhf.prompts", "lit_rlhf.module"):
        monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning):
        prompts, module = importlib.import_module("lit_rlhf.prompts"), importlib.import_module("lit_rlhf.module")
    assert prompts.PromptFormat is PromptFormat  # a name lit_rlhf.data does not export
    assert module.PPOSettings is PPOSettings  # an old module's import from lit_rlhf.settings
    with pytest.raises(AttributeError, match="moved it to lit_rlhf.data"):
        prompts.no_such_name


def test_python_m_of_an_old_command_runs_the_new_one():
    done = subprocess.run([sys.executable, "-m", "lit_rlhf.sampled_pairs", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and "--out OUT" in done.stdout  # the new module's command line
    assert "lit_rlhf.sampled_pairs is now lit_rlhf.data.sampled_pairs" in done.stderr


def test_a_class_path_is_rewritten_only_to_a_name_the_new_package_exports():
    assert current_class_path("lit_rlhf.prompts.PromptDataModule") == "lit_rlhf.data.PromptDataModule"
    assert current_class_path("lit_rlhf.module.PPOModule") == "lit_rlhf.modules.PPOModule"
    assert current_class_path("lit_rlhf.prompts.PromptFormat") == "lit_rlhf.prompts.PromptFormat"  # not exported
    assert current_class_path("lit_rlhf.rewards.ProfanityReward") == "lit_rlhf.rewards.ProfanityReward"
