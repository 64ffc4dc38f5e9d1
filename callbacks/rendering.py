"""The toxicity report as text: the before/after table, the statistics under it, the samples tables and the
whole ``report.md`` (:func:`markdown`), all from the report's dict (``lit_rlhf.callbacks.report``)."""

from __future__ import annotations

import json
import math
from typing import Any

COLUMNS = (
    ("toxicity_mean", "mean toxicity"),
    ("toxicity_std", "std toxicity"),
    ("reward_mean", "mean reward"),
    ("reward_std", "std reward"),
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("pass_at_k", "pass@k"),
    ("sample_reward_mean", "sampled reward"),
    ("response_length_mean", "length (tokens)"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
)
"""The before/after table's columns: aggregate key, header."""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def _change(decrease_percent: float | None, of: str = "") -> str:
    """A relative decrease (``stats.improvement_percent``) as the signed change after vs before, with its
    direction in words: ``-20.58% (lower)``, so that a sign cannot be read the wrong way."""
    if decrease_percent is None or not math.isfinite(decrease_percent):
        return "n/a"
    change = -decrease_percent
    direction = "lower" if change < 0 else "higher" if change > 0 else "unchanged"
    return f"{change:+.2f}%{of} ({direction})"


def _aligned(rows: list[list[str]]) -> str:
    """A Markdown table whose columns line up in plain text too (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def table(report: dict[str, Any]) -> str:
    """The before/after table in Markdown (also what is printed at the end of fit); ROUGE columns only when the
    prompts have references."""
    stages = [stage for stage in ("before", "after", "test") if stage in report]
    columns = [(key, header) for key, header in COLUMNS if not stages or key in report[stages[0]]]
    k = report.get("settings", {}).get("pass_at_k")
    rows = [["", *(f"pass@{k}" if key == "pass_at_k" and k else header for key, header in columns)]]
    for stage in stages:
        rows.append([_stage_label(report, stage), *(_fmt(report[stage][key]) for key, _ in columns)])
    if "toxicity" in report:
        tox = report["toxicity"]
        # the relative change after vs before (negative: lower after); the second is the spread's, not toxicity's
        cells = [_change(tox["improvement_mean_percent"]), _change(tox["improvement_std_percent"], " of the std")]
        rows.append(["change after %", *cells, *[""] * (len(columns) - 2)])
    after = "after" if "after" in report else "test"
    if "before" in report and after in report and "rouge1" in report["before"]:
        # how much of the summaries' overlap with the references is kept (100%: summary quality unchanged)
        rows.append(["retained %", *(_retained(report["before"][key], report[after][key]) if key.startswith("rouge")
                                     else "" for key, _ in columns)])
    return _aligned(rows)


def _stage_label(report: dict[str, Any], stage: str) -> str:
    """The row's name; a 'before' not measured before training says at which PPO step it was measured."""
    step = report[stage].get("ppo_step", 0)
    return f"before (PPO step {step})" if stage == "before" and step else stage


def _retained(before: float | None, after: float | None) -> str:
    """after / before in percent ("" when before is 0 or missing)."""
    if not before or after is None or before != before or after != after:
        return ""
    return f"{100.0 * after / before:.1f}%"


def summary_lines(report: dict[str, Any], with_warning: bool = True) -> list[str]:
    """The statistics under the table: paired differences, CIs, tests, counts, and (``with_warning``) the
    evaluator warning."""
    out = []
    if with_warning and report.get("warning"):
        out.append(f"**WARNING:** {report['warning']}")
    settings = report["settings"]
    out.append(
        f"{report['num_prompts']} held-out prompts ({settings.get('held_out', 'the held-out split')}); "
        f"toxicity = {settings['evaluator']} on the {settings['text']}; "
        f"reward = {settings['reward']}."
    )
    merged, asked = report.get("merged_duplicates", 0), settings.get("num_prompts")
    if merged:
        out.append(
            f"{merged} further held-out rows repeat one of these prompts and were merged into it: each prompt is "
            f"generated and scored once (its rows' references pooled for ROUGE), so {report['num_prompts']} prompts "
            f"were measured" + (f" where num_prompts={asked} was asked for." if asked and asked > report["num_prompts"]
                                else ".")
        )
    stages = [report[stage] for stage in ("before", "after", "test") if stage in report]
    if stages and not any("rouge1" in stage for stage in stages):
        out.append("No ROUGE: the held-out prompts have no references (set data.reference_column to score them).")
    k = settings.get("pass_at_k")
    for name, label in (("toxicity", "Toxicity decrease"), ("reward", "Reward increase"), ("pass_at_k", f"pass@{k} increase")):
        if name not in report:
            continue
        c = report[name]
        out.append(
            f"{label} ({c['difference']}, per prompt): mean {_fmt(c['difference_mean'])}, "
            f"{c['confidence'] * 100:g}% BCa bootstrap CI [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] "
            f"({c['bootstrap_resamples']} resamples of the prompts, seed {c['bootstrap_seed']}); "
            f"{c['test']}, two-sided: p = {_p(c['p_value'])}; "
            f"improved {c['improved']}, degraded {c['degraded']}, unchanged {c['unchanged']}."
        )
    if any(name in report and report[name]["test"].startswith("Wilcoxon") for name in ("toxicity", "reward")):
        out.append(
            "Why both: the CI is of the mean change, which a few large changes can move; the Wilcoxon signed-rank "
            "test asks whether the per-prompt changes lean one way: whether their pseudo-median (the Hodges-Lehmann "
            "estimate, the median of all pairwise (Walsh) averages of the changes) is 0, so a CI that includes 0 "
            "beside a small p means most prompts moved one way while a few moved far the other."
        )
    if "reward" in report:
        r = report["reward"]
        out.append(
            f"Strongly improved (reward gain > {r['strong_gain_threshold']:g}): {r['strongly_improved']}; "
            f"strongly degraded (reward loss > {r['strong_loss_threshold']:g}): {r['strongly_degraded']}."
        )
    if k:
        out.append(f"pass@{k}: share of prompts with one of {k} sampled responses of reward > 0 (sampling on, the "
                   "measurement's other settings); sampled reward: those samples' mean reward.")
    timings = [f"{stage} {report[stage]['seconds']:.1f}s (PPO step {report[stage]['ppo_step']})"
               for stage in ("before", "after", "test") if stage in report]
    out.append("Generation and scoring passes: " + ", ".join(timings) + ".")
    return out


def _cell(text: str, limit: int = 300) -> str:
    text = text.replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= limit else "…" + text[-limit:]


def samples_table(samples: list[dict[str, Any]]) -> str:
    lines = [
        "| id | query | response before | response after | reward before | reward after | reward diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in samples:
        lines.append(
            f"| {s['id']} | {_cell(s['query'])} | {_cell(s['response_before'])} | {_cell(s['response_after'])} | "
            f"{_fmt(s['reward_before'])} | {_fmt(s['reward_after'])} | {_fmt(s['reward_diff'])} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any], title: str = "Reward and toxicity before and after training") -> str:
    """The report in Markdown. The title names both measures: on prompts without toxicity in them the reward is
    what the run is about, toxicity a side measurement."""
    parts = [f"# {title}", "", table(report), "", *[f"- {line}" for line in summary_lines(report)]]
    if "samples" in report:
        for title, key, none in (("Largest reward gains", "most_improved", "No prompt gained reward."),
                                 ("Largest reward losses", "most_degraded", "No prompt lost reward.")):
            rows = report["samples"][key]
            parts += ["", f"## {title}", "", samples_table(rows) if rows else none]
    parts += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2, default=str), "```", ""]
    return "\n".join(parts)
