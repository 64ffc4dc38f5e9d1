"""The report's tables and lines of one section: the workload table with its ratios, the goals, GRPO against PPO,
the phases above the FLOP limit and the decode-step table."""

from __future__ import annotations

import math
from typing import Any, Callable

from ppo_step.limits import decode_rows_summary
from ppo_step.settings import DECODE_ROWS, DTYPE_SHORT, LIT_PPO_SYSTEMS, PHASES, SYSTEM_LABELS, SYSTEMS, ModelSize


def fmt_quantiles(q: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" if k == "mean" else f"{k} {v:.0f}" for k, v in q.items())


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def ratio(a: dict | None, b: dict | None, key: str = "total") -> float | None:
    if not a or not b or not b.get(key):
        return None
    return a[key] / b[key]


def ratio_columns(sec: dict[str, Any]) -> list[tuple[str, str]]:
    """The ratio columns of a section's table: (header, row key); bf16 tables add TRL batched of the fp32 run
    of the same workload on the same machine (row key ``trl_batched_fp32``, see ``fp32_baseline``)."""
    tag = "" if sec["run"]["dtype"] == "float32" else " " + DTYPE_SHORT[sec["run"]["dtype"]]
    columns = [(f"÷ TRL batched{tag}", "trl_batched"), (f"÷ TRL loop{tag}", "trl_loop"), (f"÷ floor{tag}", "floor"),
               (f"÷ FLOP limit{tag}", "flop_limit")]
    if tag:
        columns.append(("÷ TRL batched fp32", "trl_batched_fp32"))
    return columns


def fp32_baseline(sec: dict[str, Any], context: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """TRL batched's row of the float32 run of ``sec``'s workload, if that run was on the same machine with the
    same threads (None otherwise)."""
    run = sec["run"]
    other = context.get(section_key(run["workload"], "float32"))
    if other is None or run["dtype"] == "float32":
        return None
    same = run.get("machine") and other["run"].get("machine") == run["machine"] and other["run"]["threads"] == run["threads"]
    return other["rows"].get("trl_batched") if same else None


def section_key(workload: str, dtype: str) -> str:
    return f"{workload}/{dtype}"


def workload_table(sec: dict[str, Any], context: dict[str, dict[str, Any]]) -> str:
    rows, run = sec["rows"], sec["run"]
    columns = ratio_columns(sec)
    base = {key: rows.get(key) for _, key in columns}
    base["trl_batched_fp32"] = fp32_baseline(sec, context)
    head = ("| system | s/step | generate | reward | forward | advantages | update | other | resp. tok/s "
            "| peak RSS steps (MiB) | process peak (MiB) | " + " | ".join(h for h, _ in columns) + " |")
    lines = [f"### Workload {run['workload']}, {run['dtype']}: seconds per PPO step (median), by phase", "", head,
             "|" + "---|" * (11 + len(columns))]
    for system in (*SYSTEMS, "flop_limit", "flop_limit_grpo"):
        s = rows.get(system)
        if s is None:
            continue
        cells = [SYSTEM_LABELS[system], fmt(s["total"])] + [fmt(s.get(p)) for p in PHASES]
        cells += [fmt(s["tok_per_s"], 1), fmt(s.get("steps_peak_mib"), 0), fmt(s.get("process_peak_mib"), 0)]
        grpo = system in ("lit_rlhf_grpo", "flop_limit_grpo")  # against its own FLOP limit
        for _, key in columns:
            against = rows.get("flop_limit_grpo") if grpo and key == "flop_limit" else base[key]
            cells.append(fmt(ratio(s, against)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios are this system's seconds per step ÷ the other's (below 1: faster). FLOP-limit phases: "
              "generate = one forward, forward = the reference forward, update = two forwards."]
    if run["dtype"] != "float32":
        lines.append("÷ TRL batched fp32: TRL batched of the float32 table of this workload, " + (
            "measured on the same machine with the same threads." if base["trl_batched_fp32"] else
            "not available (no float32 run of TRL batched on this machine and threads in the results file)."))
    if "flop_limit_grpo" in rows:
        lines.append("GRPO (4 prompts × 4 samples, the 16 lengths of PPO's step, no value head) is divided by its own "
                     "FLOP limit, which runs the encoder once per prompt in generation.")
    return "\n".join(lines)


# The speed and memory goals, by (workload, dtype): speed-ups vs TRL batched in the section's dtype ("trl") and
# in float32 on the same machine ("trl32"), vs the recipe's loop ("loop"); time ÷ floor at most "floor"; the
# fraction of the FLOP limit reached at least "flop_fraction", or time ÷ FLOP limit at most "flop_ratio"; peak
# RSS ÷ TRL batched at most "rss".
GOALS: dict[tuple[str, str], dict[str, float]] = {
    ("A", "float32"): {"trl": 1.35, "floor": 1.05, "flop_fraction": 0.85, "rss": 0.7},
    ("A", "bfloat16"): {"trl": 1.5, "trl32": 1.7, "floor": 1.05, "rss": 0.7},
    ("B", "float32"): {"trl": 2.0, "loop": 3.0, "flop_ratio": 1.6, "rss": 0.7},
    ("B", "bfloat16"): {"trl": 2.0, "trl32": 3.0, "rss": 0.7},
}


def goals(sec: dict[str, Any], context: dict[str, dict[str, Any]]) -> list[str]:
    """The goals of ``GOALS``, checked for each lit_rlhf PPO variant that ran, against TRL in the section's dtype
    (and, for bf16, against TRL batched in fp32 on the same machine)."""

    def check(text: str, value: float | None, ok: Callable[[float], bool]) -> str:
        if value is None:
            return f"  - {text}: not measured"
        return f"  - {text}: {value:.2f} — {'met' if ok(value) else 'NOT met'}"

    rows, name, dtype = sec["rows"], sec["run"]["workload"], sec["run"]["dtype"]
    tag = "" if dtype == "float32" else " " + DTYPE_SHORT[dtype]
    trl, loop, trl32 = rows.get("trl_batched"), rows.get("trl_loop"), fp32_baseline(sec, context)
    goal = GOALS.get((name, dtype), {})
    out = []
    for system in LIT_PPO_SYSTEMS:
        lit = rows.get(system)
        if not lit:
            continue
        out.append(f"- {SYSTEM_LABELS[system]}, workload {name}, {dtype}:")
        at_least = [("trl", f"speed-up vs TRL batched{tag}", ratio(trl, lit)),
                    ("trl32", "speed-up vs TRL batched fp32", ratio(trl32, lit)),
                    ("loop", f"speed-up vs TRL loop{tag}", ratio(loop, lit)),
                    ("flop_fraction", "fraction of the FLOP limit", ratio(rows.get("flop_limit"), lit))]
        at_most = [("floor", "time ÷ floor", ratio(lit, rows.get("floor"))),
                   ("flop_ratio", "time ÷ FLOP limit", ratio(lit, rows.get("flop_limit"))),
                   ("rss", f"peak RSS during steps ÷ TRL batched{tag}", ratio(lit, trl, "steps_peak_mib")),
                   ("rss", f"process peak RSS ÷ TRL batched{tag}", ratio(lit, trl, "process_peak_mib"))]
        for key, text, value in at_least:
            if key in goal:
                out.append(check(f"{text} (goal ≥ {goal[key]})", value, lambda v, g=goal[key]: v >= g))
        for key, text, value in at_most:
            if key in goal:
                out.append(check(f"{text} (goal ≤ {goal[key]})", value, lambda v, g=goal[key]: v <= g))
    return out + grpo_lines(name, rows)


def grpo_lines(name: str, rows: dict[str, dict[str, float]]) -> list[str]:
    """GRPO against PPO with fast_rollout on the same responses count (no goal: what a critic-free step costs)."""
    grpo, ppo = rows.get("lit_rlhf_grpo"), rows.get("lit_rlhf_fast")
    if not grpo:
        return []
    out = [f"- {SYSTEM_LABELS['lit_rlhf_grpo']} ÷ {SYSTEM_LABELS['lit_rlhf_fast']}, workload {name} "
           "(same 16 responses per step):"]
    for text, key in (("time per step", "total"), ("generate", "generate"), ("forward", "forward"),
                      ("update", "update"), ("peak RSS during steps", "steps_peak_mib"),
                      ("process peak RSS", "process_peak_mib")):
        value = ratio(grpo, ppo, key)
        out.append(f"  - {text}: " + ("not measured" if value is None else f"{value:.2f}"))
    return out


def phase_excess_line(rows: dict[str, dict[str, float]], system: str = "lit_rlhf_fast") -> str | None:
    """Where the seconds of ``system``'s step above the FLOP limit go: each phase against its FLOP-limit phase."""
    lit, limit = rows.get(system), rows.get("flop_limit")
    if not lit or not limit:
        return None
    excess = {p: lit.get(p, 0.0) - limit.get(p, 0.0) for p in PHASES}
    total = lit["total"] - limit["total"]
    parts = [f"{p} {lit[p]:.2f} s vs {limit[p]:.2f} ({excess[p]:+.2f} s)" for p in ("generate", "forward", "update")]
    rest = sum(v for p, v in excess.items() if p not in ("generate", "forward", "update"))
    shares = ", ".join(f"{p} {100 * excess[p] / total:.0f} %" for p in ("generate", "forward", "update")) if total > 0 else "–"
    return (f"{SYSTEM_LABELS[system]} against the FLOP limit, by phase: " + "; ".join(parts)
            + f"; reward + advantages + other {rest:+.2f} s. Of the {total:.2f} s per step above the limit: {shares}.")


def best_rates(run: dict[str, Any]) -> dict[str, Any] | None:
    """The higher of the before/after measurements of each rate of a run (None for runs that kept only the
    fp32 GEMM rate)."""
    if "rates" not in run:
        return None
    before, after = run["rates"]
    best = {k: max(before[k], after[k]) for k in ("gemm_gflops", "gemm_gflops_bf16", "read_gbps")}
    best["gemm_rows_gflops"] = {b: max(before["gemm_rows_gflops"][b], after["gemm_rows_gflops"][b])
                                for b in before["gemm_rows_gflops"]}
    return best


def decode_table_lines(sec: dict[str, Any], size: ModelSize, system: str = "lit_rlhf_fast") -> list[str]:
    """The decode-step table of ``system``'s cached decode loop: measured ms per step at b rows still running
    against the bandwidth and FLOP limits of that step (``decode_rows_summary``)."""
    steps, rates = sec["raw"].get(system, {}).get("decode_steps"), best_rates(sec["run"])
    if not steps or not rates:
        return []
    dtype = sec["run"]["dtype"]
    lines = [f"Decode steps of {SYSTEM_LABELS[system]} ({len(steps)} in the measured steps, {sum(s[3] for s in steps):.2f} s "
             f"in all), by rows still running, against their limits ({dtype}; read bandwidth {rates['read_gbps']:.1f} GB/s; "
             f"GEMM rate of [b, {size.d_model}] × [{size.d_model}, {size.d_ff}] in {dtype}):", "",
             "| b | steps | mean position | prompt width | MB read | GEMM GFLOP/s | ms measured | ms bandwidth limit "
             "| ms FLOP limit | measured ÷ limit |", "|" + "---|" * 10]
    for b in DECODE_ROWS:
        rate = rates["gemm_rows_gflops"][str(b)]
        row = decode_rows_summary(steps, b, size, dtype, rates["read_gbps"], rate)
        if row is None:
            continue
        lines.append(f"| {b} | {row['steps']} | {row['position']:.0f} | {row['prompt']:.0f} | {row['mb_read']:.0f} | "
                     f"{rate:.0f} | {row['measured_ms']:.1f} | {row['bandwidth_ms']:.1f} | {row['flop_ms']:.1f} | "
                     f"{row['ratio']:.2f} |")
    lines += ["", "A step: from one decoder call to the next (sampling included). MB read: the decoder's weights "
              "used per step plus the rows' KV cache (self and cross attention); limit = the larger of the two."]
    return lines
