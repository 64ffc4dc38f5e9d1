"""Commands given only a run's checkpoint: ``fit``, ``test`` and ``predict`` start from the run's own config.yaml,
a resumed run's report keeps the run's first "before", and what such runs show (each thing once, no known noise).

One module fixture runs the decoder-only config (configs/embedded_gpt2.yaml, on 100 bundled dialogues) three
times: 2 PPO steps; the same run resumed to 4 with only ``--ckpt_path``; and 4 uninterrupted steps to compare with.
"""

import gzip
import io
import json
import logging
import os
import shutil
import warnings
from contextlib import redirect_stderr, redirect_stdout
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_rlhf.cli import quiet_harmless_warnings, run, run_sft

GPT2 = str(Path(__file__).parents[2] / "configs" / "embedded_gpt2.yaml")
RUN_DIR = Path("logs/lightning_logs/version_0")
LAST = RUN_DIR / "checkpoints" / "last.ckpt"
SAME_MODEL = "the toxicity evaluator is the same model as the training reward"


def small_dialogsum(folder: Path, rows: int = 100) -> Path:
    """The first ``rows`` dialogues of the bundled train split as a local dataset folder (train.jsonl): the
    held-out 20% gives 18 prompts, and tokenizing takes no time."""
    bundled = resources.files("lit_rlhf.assets.dialogsum").joinpath("dialogsum.train.jsonl.gz")
    with gzip.open(bundled.open("rb"), "rt") as lines:
        records = [json.loads(next(lines)) for _ in range(rows)]
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"id": r["fname"], "dialogue": r["dialogue"], "summary": r["summary"]}) + "\n" for r in records))
    return folder


def run_captured(args: list[str], entry=run) -> tuple[object, str]:
    """Run a command in this process; return its CLI object and all it showed: stdout, stderr, Lightning's log
    lines and every warning (each as often as it was given), as one text."""
    out, err, lines = io.StringIO(), io.StringIO(), []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(out), redirect_stderr(err):
            warnings.simplefilter("always")
            quiet_harmless_warnings()  # catch_warnings resets the filters it finds: install them inside
            cli = entry(args)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return cli, "\n".join([out.getvalue(), err.getvalue(), *lines, *(str(w.message) for w in caught)])


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_runs")
    data = small_dialogsum(root / "dialogsum")
    # a second ModelCheckpoint keeps every PPO step: 2 optimizer steps per PPO step (8 prompts, mini-batches of 4)
    flags = ["--model.generation.max_new_tokens", "[4, 8]", "--data.batch_size", "8", "--data.dataset", str(data),
             "--trainer.enable_progress_bar", "false",
             "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
             "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1"]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        first, first_output = run_captured(["fit", "--config", GPT2, "--model.ppo_steps", "2", *flags])
        first_report = json.loads((RUN_DIR / "report.json").read_text())
        resumed, resumed_output = run_captured(["fit", "--ckpt_path", str(LAST), "--model.ppo_steps", "4"])
        straight, _ = run_captured(["fit", "--config", GPT2, "--model.ppo_steps", "4", *flags])
    finally:
        os.chdir(cwd)
    return SimpleNamespace(root=root, first=first, first_output=first_output, first_report=first_report,
                           resumed=resumed, resumed_output=resumed_output, straight=straight)


def test_resuming_with_only_the_checkpoint_continues_the_run_as_configured(gpt2_runs):
    resumed, straight, root = gpt2_runs.resumed, gpt2_runs.straight, gpt2_runs.root
    assert resumed.model.ppo_step == straight.model.ppo_step == 4
    assert Path(resumed.trainer.log_dir) == RUN_DIR  # the run's own folder (relative to the run's directory)
    # the run's reward, data and callbacks, not the packaged default's
    assert type(resumed.model.reward).__name__ == type(straight.model.reward).__name__ == "CompositeReward"
    assert resumed.model.reward.describe() == straight.model.reward.describe()
    assert dict(resumed.datamodule.hparams) == dict(straight.datamodule.hparams)
    assert resumed.datamodule.hparams.dataset == str(root / "dialogsum")
    callbacks = [[(type(c).__name__, getattr(c, "num_prompts", None)) for c in cli.trainer.callbacks]
                 for cli in (resumed, straight)]
    assert callbacks[0] == callbacks[1]
    # config.yaml is rewritten with the run's settings: the uninterrupted run's, but for the checkpoint resumed
    configs = [yaml.safe_load((root / f"logs/lightning_logs/version_{v}/config.yaml").read_text()) for v in (0, 1)]
    assert configs[0].pop("ckpt_path") == str(LAST) and configs[1].pop("ckpt_path") is None
    assert configs[0] == configs[1]
    # same prompts, RNG, optimizer and KL state after the resume: on the CPU the weights are bit-identical
    expected, got = (load_file(root / f"logs/lightning_logs/version_{v}/adapter/adapter_model.safetensors")
                     for v in (1, 0))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_a_resumed_run_reports_its_first_before_against_the_end(gpt2_runs):
    root, first = gpt2_runs.root, gpt2_runs.first_report
    report = json.loads((root / RUN_DIR / "report.json").read_text())
    straight = json.loads((root / "logs/lightning_logs/version_1/report.json").read_text())
    assert (report["before"]["ppo_step"], report["after"]["ppo_step"]) == (0, 4)
    for key in ("toxicity_before", "reward_before", "response_before"):
        assert report["per_prompt"][key] == first["per_prompt"][key]  # the stored measurement, not a new one
    assert report["per_prompt"] == straight["per_prompt"]  # as if the run had not stopped
    assert "| before " in (root / RUN_DIR / "report.md").read_text()
    assert "before (PPO step" not in (root / RUN_DIR / "report.md").read_text()


def test_periodic_checkpoints_are_named_by_ppo_step(gpt2_runs):
    folder = gpt2_runs.root / RUN_DIR / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    # the first run wrote steps 1-2, the resumed one 3-4, into the same folder; last.ckpt keeps its name
    assert names == ["last.ckpt", *(f"ppo_step={k}.ckpt" for k in range(1, 5))]
    assert torch.load(folder / "ppo_step=3.ckpt", weights_only=True)["lit_rlhf"]["ppo_step"] == 3


def test_a_run_shows_each_thing_once_and_no_known_noise(gpt2_runs):
    shown = gpt2_runs.first_output
    assert shown.count(SAME_MODEL) == 1  # the warning at the start; report.md keeps it too
    assert SAME_MODEL in (gpt2_runs.root / "logs/lightning_logs/version_1/report.md").read_text()
    assert "Trainable params" in shown and "FLOPs" not in shown and "Total Flops" not in shown
    assert "💡" not in shown  # Lightning's litlogger / litmodels tips
    resumed = gpt2_runs.resumed_output
    assert "exists and is not empty" not in resumed  # the resumed run's own checkpoints/ folder
    assert "Restoring states from the checkpoint path" not in resumed
    assert resumed.count("Restored all states from the checkpoint at") == 1
    events = EventAccumulator(str(gpt2_runs.root / RUN_DIR))
    events.Reload()
    assert "hp_metric" not in events.Tags()["scalars"]  # TensorBoard's placeholder of -1
    assert [e.step for e in events.Scalars("env/reward_mean")] == [1, 2, 3, 4]


@pytest.fixture
def run_copy(gpt2_runs, tmp_path, monkeypatch):
    """A working directory holding a copy of the resumed 4-step run (logs/lightning_logs/version_0)."""
    shutil.copytree(gpt2_runs.root / RUN_DIR, tmp_path / RUN_DIR)
    monkeypatch.chdir(tmp_path)
    return tmp_path / RUN_DIR


def test_test_with_only_the_checkpoint_uses_the_run_config(run_copy, gpt2_runs):
    cli, shown = run_captured(["test", "--ckpt_path", str(LAST), "--trainer.limit_test_batches", "1"])
    assert cli.model.reward.describe() == gpt2_runs.straight.model.reward.describe()
    assert cli.datamodule.hparams.dataset == str(gpt2_runs.root / "dialogsum")
    report = json.loads((run_copy / "test_report.json").read_text())
    assert (report["before"]["ppo_step"], report["after"]["ppo_step"]) == (0, 4)  # the run's stored "before"
    assert (run_copy / "test_config.yaml").exists()
    assert "Loaded model weights from the checkpoint" not in shown and "Restoring states" not in shown


def test_predict_with_only_the_checkpoint_says_where_it_wrote(run_copy):
    dialogues = Path("dialogues.jsonl")
    # with a summary: the run's reward includes ROUGE against the reference
    dialogues.write_text("".join(json.dumps({"id": f"d{i}", "dialogue": f"#Person1#: Hello {i}.\n#Person2#: Hi.",
                                             "summary": "They greet."}) + "\n" for i in range(3)))
    _, shown = run_captured(["predict", "--ckpt_path", str(LAST), "--data.predict_path", str(dialogues)])
    written = RUN_DIR / "predictions.jsonl"
    assert f"Predictions written to {written} (3 rows)" in shown.splitlines()
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["d0", "d1", "d2"] and all("score" in r for r in rows)  # the run's reward
    assert "Loaded model weights from the checkpoint" not in shown and "Restoring states" not in shown
    assert "💡" not in shown
    assert sorted(p.name for p in Path("logs/lightning_logs").iterdir()) == ["version_0"]


def test_predict_on_dialogues_without_references_writes_unscored_responses(run_copy):
    # the run's reward compares with a reference summary, which new dialogues do not have
    dialogues = Path("new_dialogues.jsonl")
    dialogues.write_text("".join(json.dumps({"id": f"n{i}", "dialogue": f"#Person1#: Bye {i}.\n#Person2#: Bye."})
                                 + "\n" for i in range(2)))
    _, shown = run_captured(["predict", "--ckpt_path", str(LAST), "--data.predict_path", str(dialogues)])
    rows = [json.loads(line) for line in (RUN_DIR / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["n0", "n1"] and all(r["summary"] for r in rows)
    assert not any("score" in r for r in rows)
    assert "the predictions are written without a score" in shown


def test_sft_predict_without_a_checkpoint_makes_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d.jsonl").write_text(json.dumps({"id": "a", "dialogue": "#Person1#: Hi.\n#Person2#: Hello."}) + "\n")
    _, shown = run_captured(["predict", "--model.model_name", "embedded:tiny-t5", "--model.max_new_tokens", "4",
                             "--data.predict_path", "d.jsonl", "--data.dataset", str(small_dialogsum(tmp_path / "ds")),
                             "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"], entry=run_sft)
    assert "Predictions written to logs/predictions.jsonl (1 row)" in shown.splitlines()
    assert [json.loads(line)["id"] for line in Path("logs/predictions.jsonl").read_text().splitlines()] == ["a"]
    assert sorted(p.name for p in Path("logs").iterdir()) == ["predict_config.yaml", "predictions.jsonl"]
    assert "💡" not in shown  # no ModelCheckpoint configured: Lightning's litmodels tip
