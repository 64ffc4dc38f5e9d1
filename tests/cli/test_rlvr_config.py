"""configs/rlvr_arithmetic.yaml runs: GRPO steps on the shipped arithmetic model with the exact-answer reward, and
its report holds held-out accuracy before and after, the paired change and pass@k."""

import json
from pathlib import Path

import pytest
import yaml

from lit_rlhf.cli import run
from lit_rlhf.data import arithmetic

CONFIG = Path(__file__).parents[2] / "configs" / "rlvr_arithmetic.yaml"


@pytest.mark.usefixtures("datasets_cache")
def test_the_config_runs_a_step_and_reports_accuracy_and_pass_at_k(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(arithmetic, "TRAIN_SIZE", 40)  # the same generator, fewer rows to encode
    monkeypatch.setattr(arithmetic, "TEST_SIZE", 6)
    config = yaml.safe_load(CONFIG.read_text())
    callback = config["trainer"]["callbacks"][1]["init_args"]
    callback.update(num_prompts=6, batch_size=3, pass_at_k=2, bootstrap_resamples=50)
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][1:]  # no checkpoints
    config["model"].update(ppo_steps=1, mini_batch_size=8, samples_per_prompt=4, export_adapter=False)
    config["data"]["init_args"].update(batch_size=2)
    Path("quick.yaml").write_text(yaml.safe_dump(config))
    cli = run(["fit", "--config", "quick.yaml", "--trainer.logger", "false", "--trainer.default_root_dir", "."])
    assert cli.model.ppo_step == 1
    report = json.loads(next(tmp_path.rglob("report.json")).read_text())
    assert report["settings"]["reward"] == "FunctionReward(lit_rlhf.rewards.arithmetic:exact_answer)"
    assert report["settings"]["pass_at_k"] == 2 and report["num_prompts"] == 6
    per_prompt = report["per_prompt"]
    assert set(per_prompt["reward_before"]) <= {0.0, 1.0} and set(per_prompt["pass_at_k_after"]) <= {0.0, 1.0}
    assert report["reward"]["difference_mean"] == pytest.approx(
        sum(per_prompt["reward_after"]) / 6 - sum(per_prompt["reward_before"]) / 6)
    assert {"pass_at_k", "sample_reward_mean", "response_length_mean"} <= set(report["after"])
