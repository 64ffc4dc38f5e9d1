"""configs/rlvr_arithmetic.yaml and rlvr_arithmetic_tools.yaml run a GRPO step on the shipped arithmetic models: the
first with the exact-answer reward, its report holding held-out accuracy before and after, the paired change and
pass@k; the second over tool episodes with the environment's reward."""

import json
from pathlib import Path

import pytest
import yaml

from lit_rlhf.cli import run
from lit_rlhf.data import arithmetic

CONFIGS = Path(__file__).parents[2] / "configs"


def quick_fit(name: str, monkeypatch, callbacks) -> object:
    """One GRPO step of ``configs/<name>`` on 40 train and 6 test problems, with ``callbacks(config)`` as the
    trainer's callbacks (no checkpoints); the CLI object."""
    monkeypatch.setattr(arithmetic, "TRAIN_SIZE", 40)  # the same generator, fewer rows to encode
    monkeypatch.setattr(arithmetic, "TEST_SIZE", 6)
    config = yaml.safe_load((CONFIGS / name).read_text())
    config["trainer"]["callbacks"] = callbacks(config)
    config["model"].update(ppo_steps=1, mini_batch_size=8, samples_per_prompt=4, export_adapter=False)
    config["data"]["init_args"].update(batch_size=2)
    Path("quick.yaml").write_text(yaml.safe_dump(config))
    return run(["fit", "--config", "quick.yaml", "--trainer.logger", "false", "--trainer.default_root_dir", "."])


@pytest.mark.usefixtures("datasets_cache")
def test_the_config_runs_a_step_and_reports_accuracy_and_pass_at_k(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def report_only(config):
        callback = config["trainer"]["callbacks"][1]["init_args"]
        callback.update(num_prompts=6, batch_size=3, pass_at_k=2, bootstrap_resamples=50)
        return config["trainer"]["callbacks"][1:]

    cli = quick_fit("rlvr_arithmetic.yaml", monkeypatch, report_only)
    assert cli.model.ppo_step == 1
    report = json.loads(next(tmp_path.rglob("report.json")).read_text())
    assert report["settings"]["reward"] == "FunctionReward(lit_rlhf.rewards.arithmetic:exact_answer)"
    assert report["settings"]["pass_at_k"] == 2 and report["num_prompts"] == 6
    per_prompt = report["per_prompt"]
    assert set(per_prompt["reward_before"]) <= {0.0, 1.0} and set(per_prompt["pass_at_k_after"]) <= {0.0, 1.0}
    assert report["reward"]["difference_mean"] == pytest.approx(
        sum(per_prompt["reward_after"]) / 6 - sum(per_prompt["reward_before"]) / 6)
    assert {"pass_at_k", "sample_reward_mean", "response_length_mean"} <= set(report["after"])


@pytest.mark.usefixtures("datasets_cache")
def test_the_tool_config_runs_a_step_of_episodes(tmp_path, monkeypatch):
    # configs/rlvr_arithmetic_tools.yaml: a GRPO step over tool episodes of the shipped tool model, on the bundled
    # questions, with the environment's reward
    monkeypatch.chdir(tmp_path)
    cli = quick_fit("rlvr_arithmetic_tools.yaml", monkeypatch, lambda config: [])
    assert cli.model.ppo_step == 1 and type(cli.model.environment).__name__ == "ToolEnvironment"
    assert cli.model.policy.tokenizer.chat_template and cli.datamodule.source_columns == ("id", "question", "answer")
