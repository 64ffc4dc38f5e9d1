"""Where ToxicityCallback's results go: ``report.json`` / ``report.md`` in the run directory and the table on the
console (:func:`publish_report`), scalars to every logger, histograms and texts to TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_rlhf.callbacks.measurement import Measurement
from lit_rlhf.callbacks.rendering import samples_table, summary_lines, table
from lit_rlhf.callbacks.report import to_json
from lit_rlhf.runtime import atomic_write


def publish_report(trainer: L.Trainer, name: str, report: dict[str, Any], markdown: str) -> list[Path] | None:
    """Write ``<name>.json`` and ``<name>.md`` into the run directory, print the table and give TensorBoard the
    Markdown; the files' paths, or None on the processes other than the first (they write nothing)."""
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: call it on every rank
    if not trainer.is_global_zero:
        return None
    paths = [
        atomic_write(log_dir / f"{name}.json", to_json(report)),
        atomic_write(log_dir / f"{name}.md", markdown),
    ]
    # the same-model warning was given when the callback started (ToxicityCallback._prepare): the file keeps it,
    # the console does not repeat it
    lines = summary_lines(report, with_warning=False)
    text = "\n".join([table(report), *lines, f"Report: {paths[1]}"])
    print("\n" + text + "\n", flush=True)
    for tb in _tensorboard(trainer):
        tb.experiment.add_text(f"tox/{name}", markdown, getattr(trainer.lightning_module, "ppo_step", 0))
    return paths


def log_measurement(trainer: L.Trainer, m: Measurement) -> None:
    """One pass's means to every logger and its toxicity and reward histograms to TensorBoard, at its PPO step."""
    if not trainer.is_global_zero:
        return
    tox = torch.tensor(m.toxicity)
    reward = torch.tensor(m.reward)
    scalars = {
        f"tox/{m.stage}_mean": float(tox.mean()),
        f"tox/{m.stage}_std": float(tox.std(correction=0)),
        f"tox/reward_{m.stage}_mean": float(reward.mean()),
        f"tox/length_{m.stage}_mean": float(torch.tensor(m.length, dtype=torch.float).mean()),
    }
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=m.ppo_step)
    for tb in _tensorboard(trainer):
        tb.experiment.add_histogram(f"tox/toxicity_{m.stage}", tox, m.ppo_step)
        tb.experiment.add_histogram(f"tox/reward_{m.stage}", reward, m.ppo_step)


def log_comparison(trainer: L.Trainer, report: dict[str, Any], step: int) -> None:
    """The before/after changes, their CIs and p-values and the ROUGE / distinct-n of each pass to every logger;
    the reward sample tables to TensorBoard."""
    if not trainer.is_global_zero:
        return
    r = report
    scalars = {
        "tox/improvement_mean_pct": r["toxicity"]["improvement_mean_percent"],
        "tox/improvement_std_pct": r["toxicity"]["improvement_std_percent"],
        "tox/diff_mean": r["toxicity"]["difference_mean"],
        "tox/diff_ci_low": r["toxicity"]["ci_low"],
        "tox/diff_ci_high": r["toxicity"]["ci_high"],
        "tox/p_value": r["toxicity"]["p_value"],
        "tox/reward_diff_mean": r["reward"]["difference_mean"],
        "tox/reward_p_value": r["reward"]["p_value"],
        **{f"tox/{key}_{stage}": r[stage][key] for stage in ("before", "after")
           for key in ("rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2") if key in r[stage]},
    }
    scalars = {k: v for k, v in scalars.items() if v is not None and v == v}  # drop NaN
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
    for tb in _tensorboard(trainer):
        samples = r["samples"]
        tb.experiment.add_text(
            "tox/samples",
            "Largest reward gains\n\n" + samples_table(samples["most_improved"])
            + "\n\nLargest reward losses\n\n" + samples_table(samples["most_degraded"]),
            step,
        )


def _tensorboard(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
