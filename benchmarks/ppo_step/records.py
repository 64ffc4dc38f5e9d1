"""What every system's worker records of its steps (phases, totals, tokens, parameter dtypes, profiles) and the
medians the parent reports."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Iterable

from ppo_step.settings import PHASES


def step_record(phases: dict[str, float], total: float, tokens: int) -> dict[str, Any]:
    rec = {p: float(phases.get(p, 0.0)) for p in PHASES if p != "other"}
    rec["other"] = max(0.0, total - sum(rec.values()))
    rec["total"] = total
    rec["tokens"] = tokens
    return rec


def write_profile(prof, path: str, title: str) -> None:
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    Path(path).write_text(f"# {title}\n\n{table}\n")


def parameter_dtypes(system: str, named: Iterable[tuple[str, Any]], dtype: str) -> dict[str, list[str]]:
    """The dtypes of the frozen and of the trained parameters (checked: the frozen weights include ``dtype``,
    every trained one, LoRA and value head, is float32, so AdamW's state is float32 too)."""
    found: dict[str, set[str]] = {"frozen": set(), "trainable": set()}
    for _, p in named:
        found["trainable" if p.requires_grad else "frozen"].add(str(p.dtype).removeprefix("torch."))
    if dtype not in found["frozen"] or found["trainable"] != {"float32"}:
        raise RuntimeError(f"{system}: parameter dtypes {found}, expected frozen {dtype} and trainable float32")
    return {k: sorted(v) for k, v in found.items()}


def summarize(result: dict[str, Any]) -> dict[str, float]:
    steps = result["steps"]
    summary = {p: statistics.median(s[p] for s in steps) for p in (*PHASES, "total")}
    summary["tokens"] = statistics.median(s["tokens"] for s in steps)
    summary["tok_per_s"] = summary["tokens"] / summary["total"]
    summary["n_steps"] = len(steps)
    summary["all_totals"] = [round(s["total"], 2) for s in steps]
    summary.update({k: result["memory"][k] for k in ("steps_peak_mib", "process_peak_mib")})
    return summary
