"""configs/rlvr_arithmetic_tools.yaml runs: a GRPO step over tool episodes of the shipped tool model, on the
bundled questions, with the environment's reward; the model's own tokens only are trained."""

from pathlib import Path

import pytest
import yaml

from lit_rlhf.cli import run
from lit_rlhf.data import arithmetic

CONFIG = Path(__file__).parents[2] / "configs" / "rlvr_arithmetic_tools.yaml"


@pytest.mark.usefixtures("datasets_cache")
def test_the_tool_config_runs_a_step_of_episodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(arithmetic, "TRAIN_SIZE", 40)  # the same generator, fewer rows to encode
    monkeypatch.setattr(arithmetic, "TEST_SIZE", 6)
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"] = []  # no checkpoints
    config["model"].update(ppo_steps=1, mini_batch_size=8, samples_per_prompt=4, export_adapter=False)
    config["data"]["init_args"].update(batch_size=2)
    Path("quick.yaml").write_text(yaml.safe_dump(config))
    cli = run(["fit", "--config", "quick.yaml", "--trainer.logger", "false", "--trainer.default_root_dir", "."])
    assert cli.model.ppo_step == 1 and type(cli.model.environment).__name__ == "ToolEnvironment"
    assert cli.model.policy.tokenizer.chat_template and cli.datamodule.source_columns == ("id", "question", "answer")
