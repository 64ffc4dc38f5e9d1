"""The toxicity report: per-prompt scores -> aggregates -> ``report.json`` (its text, ``report.md``, is
:mod:`lit_rlhf.callbacks.rendering`'s).

Everything in the report's aggregates is computed here from the per-prompt lists that ``report.json`` also
stores, so a reader can recompute (and so check) every number from the file alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from lit_rlhf.callbacks import stats
from lit_rlhf.callbacks.measurement import HeldOutPrompt, Measurement

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


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
    rouge: dict[str, list[float]], pass_at_k: Sequence[float] = (), sample_reward: Sequence[float] = (),
) -> dict[str, float]:
    """The table's row for one pass. Means and population stds over prompts; distinct-n over all responses;
    pass@k and the sampled responses' mean reward when they were measured."""
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
        **({"pass_at_k": _mean(pass_at_k), "sample_reward_mean": _mean(sample_reward)} if pass_at_k else {}),
    }


def _mean(values: Sequence[float]) -> float:
    return stats.mean_std(torch.tensor(values, dtype=torch.float64))[0]


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
    agg_before = pass_aggregates(before.toxicity, before.reward, before.length, before.responses, rouge_before,
                                 before.pass_at_k, before.sample_reward)
    agg_after = pass_aggregates(after.toxicity, after.reward, after.length, after.responses, rouge_after,
                                after.pass_at_k, after.sample_reward)
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
    sampled = bool(before.pass_at_k and after.pass_at_k)
    pass_k = {"pass_at_k": paired_comparison(before.pass_at_k, after.pass_at_k, lower_is_better=False, **compare)
              } if sampled else {}
    per_prompt = {
        **prompt_columns(prompts, references),
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
        **({"pass_at_k_before": before.pass_at_k, "pass_at_k_after": after.pass_at_k,
            "sample_reward_before": before.sample_reward, "sample_reward_after": after.sample_reward} if sampled else {}),
    }
    return {
        **report_head(prompts, settings, warning),
        "before": {**_pass_info(before), **agg_before},
        "after": {**_pass_info(after), **agg_after},
        "toxicity": toxicity,
        "reward": reward,
        **pass_k,
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
    aggregates = pass_aggregates(m.toxicity, m.reward, m.length, m.responses, rouge, m.pass_at_k, m.sample_reward)
    return {
        **report_head(prompts, settings, warning),
        m.stage: {**_pass_info(m), **aggregates},
        "per_prompt": {
            **prompt_columns(prompts, references),
            "response": measurement.responses,
            "toxicity": measurement.toxicity,
            "reward": measurement.reward,
            "length": measurement.length,
            **rouge,
            **({"pass_at_k": m.pass_at_k, "sample_reward": m.sample_reward} if m.pass_at_k else {}),
        },
    }


def report_head(prompts: Sequence[HeldOutPrompt], settings: dict[str, Any], warning: str | None) -> dict[str, Any]:
    """What every report starts with: how many prompts (and merged rows), the settings, the evaluator warning."""
    return {
        "num_prompts": len(prompts),
        "merged_duplicates": sum(p.duplicates for p in prompts),
        "settings": settings,
        "warning": warning,
    }


def prompt_columns(prompts: Sequence[HeldOutPrompt], references: list[list[str]]) -> dict[str, list]:
    """The per-prompt columns that say which prompt a row is: its id, query and references."""
    return {"id": [p.id for p in prompts], "query": [p.query for p in prompts], "references": references}


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
