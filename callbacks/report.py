"""The toxicity report: per-prompt scores -> aggregates -> ``report.json`` and ``report.md``.

Everything in the report's aggregates is computed here from the per-prompt lists that ``report.json`` also
stores, so a reader can recompute (and so check) every number from the file alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_rlhf.callbacks import stats

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")

COLUMNS = (
    ("toxicity_mean", "mean toxicity"),
    ("toxicity_std", "std toxicity"),
    ("reward_mean", "mean reward"),
    ("reward_std", "std reward"),
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("response_length_mean", "length (tokens)"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
)
"""The before/after table's columns: aggregate key, header."""


@dataclass
class HeldOutPrompt:
    """One held-out dialogue: its first row in the data module's ``test_set`` and all its reference summaries."""

    row: int
    id: str
    query: str
    references: list[str]
    """Every reference summary of this dialogue in the held-out split (DialogSum's test split has three)."""
    duplicates: int = 0
    """Further held-out rows with the same prompt, merged into this one (measured once, their references pooled)."""


@dataclass
class Measurement:
    """One generation pass over the held-out prompts, in prompt order."""

    stage: str
    ids: list[str] = field(default_factory=list)
    """The prompts' ids, in order (the same list before and after)."""
    responses: list[str] = field(default_factory=list)
    toxicity: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    """Response length in tokens (end-of-sequence included)."""
    ppo_step: int = 0
    global_step: int = 0
    seconds: float = 0.0


def rouge_per_prompt(responses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F of each response against all references of its dialogue (the best-matching one counts,
    as ``rouge_score``'s ``accumulate="best"``). torchmetrics' default tokenisation, no stemming. Empty when a
    prompt has no reference (the data has no reference column): no ROUGE then."""
    from torchmetrics.functional.text.rouge import rouge_score

    if not all(references):
        return {}
    out: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for response, refs in zip(responses, references):
        # rouge_score averages over a batch, so each response is scored on its own
        scores = rouge_score([response], [list(refs)], accumulate="best", rouge_keys=ROUGE_KEYS)
        for key in ROUGE_KEYS:
            out[key].append(float(scores[f"{key}_fmeasure"]))
    return out


def pass_aggregates(
    toxicity: Sequence[float], reward: Sequence[float], length: Sequence[int], responses: Sequence[str],
    rouge: dict[str, list[float]],
) -> dict[str, float]:
    """The table's row for one pass. Means and population stds over prompts; distinct-n over all responses."""
    tox_mean, tox_std = stats.mean_std(torch.tensor(toxicity, dtype=torch.float64))
    reward_mean, reward_std = stats.mean_std(torch.tensor(reward, dtype=torch.float64))
    tokens = [stats.words(r) for r in responses]
    return {
        "toxicity_mean": tox_mean,
        "toxicity_std": tox_std,
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        **{key: stats.mean_std(torch.tensor(rouge[key], dtype=torch.float64))[0] for key in ROUGE_KEYS if key in rouge},
        "response_length_mean": stats.mean_std(torch.tensor(length, dtype=torch.float64))[0],
        "distinct_1": stats.distinct_n(tokens, 1),
        "distinct_2": stats.distinct_n(tokens, 2),
    }


def paired_comparison(
    before: Sequence[float], after: Sequence[float], lower_is_better: bool, bootstrap_resamples: int,
    confidence: float, seed: int, test_method: stats.PairedTestMethod,
) -> dict[str, Any]:
    """Mean paired change (oriented so that positive = better), its bootstrap CI, a paired test, counts."""
    b = torch.tensor(before, dtype=torch.float64)
    a = torch.tensor(after, dtype=torch.float64)
    gain = (b - a) if lower_is_better else (a - b)  # [N], > 0: this prompt got better
    low, high = stats.bootstrap_ci(gain, bootstrap_resamples, confidence, seed)
    test = stats.paired_test(b, a, test_method, seed=seed)
    return {
        "difference": "before - after" if lower_is_better else "after - before",
        "difference_mean": float(gain.mean()) if len(gain) else math.nan,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "bootstrap_resamples": bootstrap_resamples,
        "bootstrap_seed": seed,
        "test": test.test,
        "statistic": test.statistic,
        "p_value": test.p_value,
        "improved": int((gain > 0).sum()),
        "degraded": int((gain < 0).sum()),
        "unchanged": int((gain == 0).sum()),
    }


def build_report(
    prompts: Sequence[HeldOutPrompt], before: Measurement, after: Measurement, settings: dict[str, Any],
    warning: str | None, *, num_samples: int, strong_gain: float, strong_loss: float,
    bootstrap_resamples: int, confidence: float, seed: int, test_method: stats.PairedTestMethod,
) -> dict[str, Any]:
    """The whole before/after report as a JSON-ready dict (aggregates + every per-prompt score)."""
    ids = [p.id for p in prompts]
    if before.ids != ids or after.ids != ids:
        raise ValueError("before and after were not measured on the same prompts; they cannot be compared")
    references = [p.references for p in prompts]
    rouge_before = rouge_per_prompt(before.responses, references)
    rouge_after = rouge_per_prompt(after.responses, references)
    agg_before = pass_aggregates(before.toxicity, before.reward, before.length, before.responses, rouge_before)
    agg_after = pass_aggregates(after.toxicity, after.reward, after.length, after.responses, rouge_after)
    compare = dict(bootstrap_resamples=bootstrap_resamples, confidence=confidence, seed=seed, test_method=test_method)
    toxicity = paired_comparison(before.toxicity, after.toxicity, lower_is_better=True, **compare)
    for moment in ("mean", "std"):
        toxicity[f"improvement_{moment}_percent"] = stats.improvement_percent(
            agg_before[f"toxicity_{moment}"], agg_after[f"toxicity_{moment}"]
        )
    reward = paired_comparison(before.reward, after.reward, lower_is_better=False, **compare)
    reward_diff = [a - b for a, b in zip(after.reward, before.reward)]
    reward.update(
        strong_gain_threshold=strong_gain,
        strong_loss_threshold=strong_loss,
        strongly_improved=sum(d > strong_gain for d in reward_diff),
        strongly_degraded=sum(d < -strong_loss for d in reward_diff),
    )
    per_prompt = {
        "id": [p.id for p in prompts],
        "query": [p.query for p in prompts],
        "references": references,
        "response_before": before.responses,
        "response_after": after.responses,
        "toxicity_before": before.toxicity,
        "toxicity_after": after.toxicity,
        "reward_before": before.reward,
        "reward_after": after.reward,
        "reward_diff": reward_diff,
        "length_before": before.length,
        "length_after": after.length,
        **{f"{k}_before": v for k, v in rouge_before.items()},
        **{f"{k}_after": v for k, v in rouge_after.items()},
    }
    return {
        "num_prompts": len(prompts),
        "merged_duplicates": sum(p.duplicates for p in prompts),
        "settings": settings,
        "warning": warning,
        "before": {**_pass_info(before), **agg_before},
        "after": {**_pass_info(after), **agg_after},
        "toxicity": toxicity,
        "reward": reward,
        "samples": reward_samples(per_prompt, num_samples),
        "per_prompt": per_prompt,
    }


def build_single_report(
    prompts: Sequence[HeldOutPrompt], measurement: Measurement, settings: dict[str, Any], warning: str | None
) -> dict[str, Any]:
    """One pass (the test stage: the checkpoint's model) with its per-prompt scores."""
    references = [p.references for p in prompts]
    rouge = rouge_per_prompt(measurement.responses, references)
    m = measurement
    aggregates = pass_aggregates(m.toxicity, m.reward, m.length, m.responses, rouge)
    return {
        "num_prompts": len(prompts),
        "merged_duplicates": sum(p.duplicates for p in prompts),
        "settings": settings,
        "warning": warning,
        m.stage: {**_pass_info(m), **aggregates},
        "per_prompt": {
            "id": [p.id for p in prompts],
            "query": [p.query for p in prompts],
            "references": references,
            "response": measurement.responses,
            "toxicity": measurement.toxicity,
            "reward": measurement.reward,
            "length": measurement.length,
            **rouge,
        },
    }


def _pass_info(m: Measurement) -> dict[str, Any]:
    return {"ppo_step": m.ppo_step, "global_step": m.global_step, "seconds": m.seconds}


def reward_samples(per_prompt: dict[str, list], k: int) -> dict[str, list[dict[str, Any]]]:
    """The (at most) k prompts whose reward rose most and the k whose reward fell most (the recipe's sorted
    table); a prompt whose reward did not change is in neither."""
    order = sorted(range(len(per_prompt["id"])), key=lambda i: per_prompt["reward_diff"][i], reverse=True)
    fields = ("id", "query", "response_before", "response_after", "reward_before", "reward_after", "reward_diff",
              "toxicity_before", "toxicity_after")

    def row(i: int) -> dict[str, Any]:
        return {name: per_prompt[name][i] for name in fields}

    diff = per_prompt["reward_diff"]
    gains = [i for i in order if diff[i] > 0]  # only rows that gained / lost: a table of losses lists no gain
    losses = [i for i in reversed(order) if diff[i] < 0]
    return {"most_improved": [row(i) for i in gains[:k]], "most_degraded": [row(i) for i in losses[:k]]}


# ---------------------------------------------------------------------------------------------- rendering


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
    rows = [["", *(header for _, header in columns)]]
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
    for name, label in (("toxicity", "Toxicity decrease"), ("reward", "Reward increase")):
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


# ---------------------------------------------------------------------------------------------- writing


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity: non-finite numbers become null
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n"
