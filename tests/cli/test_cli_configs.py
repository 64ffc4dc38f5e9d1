"""The lit-rlhf commands' configs: every shipped config parses, packaged configs by name from any folder, the
config a command starts from (the packaged default, or a checkpoint's run folder), what parsing alone decides."""

from pathlib import Path

import pytest
import yaml

from cli_flags import FLAGS, QUICK
from lit_rlhf.cli import DEFAULT_CONFIG, config_path, packaged_configs, resolve_configs, run, with_default_config
from lit_rlhf.cli.base import CommonCLI

# PPO configs (lit-rlhf); the SFT configs (sft_*.yaml, lit-rlhf-sft) are parsed in test_sft.py
CONFIGS = sorted(p for p in Path(__file__).parents[2].joinpath("configs").glob("*.yaml") if not p.name.startswith("sft_"))


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
    import lit_rlhf.cli as cli_module

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


@pytest.mark.parametrize("entry", ["run_dpo", "run_sft"])
def test_a_deepspeed_checkpoint_folder_is_left_to_the_strategy(entry, tmp_path, monkeypatch):
    """A DeepSpeed checkpoint is a folder: the command parses it as Lightning does (its strategy reads it),
    not as a missing file."""
    import lit_rlhf.cli as cli_module

    monkeypatch.chdir(tmp_path)
    Path("pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    Path("zero3.ckpt").mkdir()
    monkeypatch.setattr(CommonCLI, "_run_subcommand", lambda self, subcommand: None)  # parse only
    data = ["--data.dataset", "pairs.jsonl"] if entry == "run_dpo" else []
    cli = getattr(cli_module, entry)(["fit", "--config", cli_module.config_path(
        "sft_embedded.yaml" if entry == "run_sft" else "preferences/dpo_summarizer.yaml"),
        "--model.model_name", "embedded:tiny-gpt2", *data, "--ckpt_path", "zero3.ckpt"])
    assert cli.config["fit"]["ckpt_path"] == "zero3.ckpt"


def test_prompts_leave_room_for_the_longest_response_the_cli_generates(tmp_path, monkeypatch):
    # the data module learns model.generation.max_new_tokens' longest response (high - 1: the limit is drawn
    # from [low, high)), the room a decoder-only prompt leaves, so the rollout never cuts a prompt's start
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(CommonCLI, "_run_subcommand", lambda self, subcommand: None)  # parse only
    cli = run(["fit", *QUICK, "--model.model_name", "embedded:tiny-gpt2",
               "--model.generation.max_new_tokens", "[4, 20]"])
    assert cli.datamodule.reserve_tokens == 19
    assert cli.datamodule.prompt_format().response_tokens == 19
    jsonl = ["--data", "lit_rlhf.data.PromptDataModule", "--data.dataset", "prompts.jsonl"]
    cli = run(["fit", "--model.model_name", "embedded:tiny-gpt2", *FLAGS, *jsonl])
    assert cli.datamodule.reserve_tokens == 7
