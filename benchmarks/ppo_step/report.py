"""The report (RESULTS*.md) of the results file's sections (RESULTS*.json), keyed by workload and dtype; the
hand-written notes after NOTES_MARKER are kept when it is rewritten."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from ppo_step.machine import log
from ppo_step.settings import (DTYPE_SHORT, DTYPES, GEMM_REPEATS, GRPO_SAMPLES_PER_PROMPT, PHASES, PPO, SYSTEM_LABELS,
                               SYSTEMS, WARMUP_NEW_TOKENS, ModelSize)
from ppo_step.tables import decode_table_lines, fmt_quantiles, goals, phase_excess_line, section_key, workload_table


def upgrade_sections(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sections keyed by workload and dtype ("A/float32"), in report order (A before B, fp32 before bf16).
    Results written before the dtype was recorded are keyed by workload alone ("A") and are float32."""
    out = {}
    for key, sec in sections.items():
        workload, _, dtype = key.partition("/")
        sec["run"].setdefault("workload", workload)
        sec["run"].setdefault("dtype", dtype or "float32")
        out[section_key(sec["run"]["workload"], sec["run"]["dtype"])] = sec
    order = sorted(out, key=lambda k: (out[k]["run"]["workload"], DTYPES.index(out[k]["run"]["dtype"])))
    return {k: out[k] for k in order}


NOTES_MARKER = "<!-- notes: text from here on is kept when the report is rewritten -->"


def write_report(path: Path, size: ModelSize, sections: dict[str, dict[str, Any]]) -> None:
    """Write the report, keeping the hand-written notes of the previous one (from NOTES_MARKER on)."""
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER):]
    path.write_text(render_report(size, sections) + "\n" + (notes or NOTES_MARKER + "\n"))
    log(f"wrote {path} and {path.with_suffix('.json').name}")


def render_report(size: ModelSize, sections: dict[str, dict[str, Any]],
                  context: dict[str, dict[str, Any]] | None = None) -> str:
    """The report of ``sections``; ``context``: every section of the results file (bf16 tables compare with
    the fp32 table of their workload)."""
    versions: dict[str, str] = {}
    for sec in sections.values():
        for r in sec["raw"].values():
            versions.update(r.get("versions", {}))
    machines = {sec["run"].get("machine") for sec in sections.values()}
    machine = machines.pop() if len(machines) == 1 and None not in machines else "given with each workload below"
    lines = [
        "# PPO step benchmark: lit_rlhf vs TRL 0.11.4, the recipe's loop, the bare floor and the FLOP limit",
        "",
        "Written by `benchmarks/bench_ppo_step.py` (see benchmarks/README.md for what each system does).",
        "",
        f"- Machine: {machine}. Shared with other users: systems ran one after another, and the load average and "
        "GEMM rate of each run are given with it.",
        f"- Versions: Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
        f"- Model: {size.name} architecture (d_model {size.d_model}, d_ff {size.d_ff}, {size.num_layers}+{size.num_layers} "
        f"layers, {size.num_heads} heads, d_kv {size.d_kv}, gated-gelu, vocab {size.vocab_size}, untied lm_head), random "
        f"weights, LoRA r {PPO.lora_r} / alpha {PPO.lora_alpha} / dropout {PPO.lora_dropout} on q, v, value head. Frozen "
        "weights in each table's dtype (float32 or bfloat16); LoRA, value head and AdamW's state always float32.",
        f"- PPO: rollout batch {PPO.rollout_batch}, mini-batch {PPO.mini_batch}, {PPO.ppo_epochs} epoch, lr "
        f"{PPO.learning_rate}; sampling top_k 0, top_p 1.0; end-of-sequence blocked until each row's length.",
        "",
    ]
    for sec in sections.values():
        lines += render_section(size, sec, context or sections)
    return "\n".join(lines)


def rates_line(run: dict[str, Any]) -> str:
    """The rates the limits divide by, as measured before and after the run."""
    g = run["gemm_gflops"]
    if "rates" not in run:
        return (f"fp32 GEMM rate (2048×2048, best of {run.get('gemm_repeats', GEMM_REPEATS)}, {run['threads']} threads): "
                f"{g[0]:.0f} GFLOP/s before, {g[1]:.0f} after; the FLOP limit uses the higher.")
    before, after = run["rates"]
    return (f"GEMM rate (2048×2048, best of {run['gemm_repeats']}, {run['threads']} threads): fp32 {g[0]:.0f} GFLOP/s "
            f"before, {g[1]:.0f} after; bf16 {before['gemm_gflops_bf16']:.0f} before, {after['gemm_gflops_bf16']:.0f} "
            f"after; the FLOP limit uses the higher {DTYPE_SHORT[run['dtype']]} rate. Read bandwidth (sum over "
            f"{run['bandwidth_mib']} MiB fp32, best of {run.get('bandwidth_repeats', 10)}): {before['read_gbps']:.1f} GB/s before, {after['read_gbps']:.1f} after.")


def section_facts(sec: dict[str, Any]) -> list[str]:
    """The bullet list that opens a section: command, machine, load and rates, reward, prompts, parameters."""
    raw, work, run = sec["raw"], sec["work"], sec["run"]
    counts = {s: r["parameters"] for s, r in raw.items() if r.get("parameters")}
    dtypes = {s: r["parameter_dtypes"] for s, r in raw.items() if r.get("parameter_dtypes")}
    lines = [
        f"- Command: `{run['command']}`; started {run['started']}, {run['minutes']:.0f} min."
        + (f" Machine: {run['machine']}." if run.get("machine") else ""),
        f"- Load average (1/5/15 min): {tuple(round(x, 2) for x in run['load_start'])} at the start, "
        f"{tuple(round(x, 2) for x in run['load_end'])} at the end. " + rates_line(run),
        "- Reward: " + ("RoBERTa-base-sized classifier (random weights) on query + response"
                         if run["reward"] == "classifier" else f"stub (fixed cost {run['reward_cost_s']} s)")
        + f"; TRL reference model: {run['trl_ref']}; {run['warmup']} warm-up step(s) per system, not measured.",
        f"- Prompt tokens, all candidate prompts: {fmt_quantiles(work['prompt_tokens_all'])}; the measured "
        f"steps' prompts: {fmt_quantiles(work['prompt_tokens_used'])}. New tokens per response in the measured "
        f"steps: {fmt_quantiles(work['new_tokens_used'])} (warm-up steps: {WARMUP_NEW_TOKENS}).",
    ]
    if "lit_rlhf_grpo" in raw and work.get("prompt_tokens_used_grpo"):
        lines.append(f"- GRPO's prompts (each batch's first {PPO.rollout_batch // GRPO_SAMPLES_PER_PROMPT}, "
                     f"{GRPO_SAMPLES_PER_PROMPT} samples each): {fmt_quantiles(work['prompt_tokens_used_grpo'])}.")
    if counts:
        lines.append("- Parameters (all / trainable, value head included where one is built): " + "; ".join(
            f"{s} {c['all_with_value_head']:,} / {c['trainable_with_value_head']:,}" for s, c in counts.items()) + ".")
    if dtypes:
        lines.append("- Parameter dtypes (frozen / trainable, checked): " + "; ".join(
            f"{s} {'+'.join(d['frozen'])} / {'+'.join(d['trainable'])}" for s, d in dtypes.items()) + ".")
    return lines


def render_section(size: ModelSize, sec: dict[str, Any], context: dict[str, dict[str, Any]]) -> list[str]:
    rows, raw, run = sec["rows"], sec["raw"], sec["run"]
    lines = [f"## Workload {run['workload']}, {run['dtype']}", "", *section_facts(sec), "", workload_table(sec, context), ""]
    lines.append(f"FLOP limit: {rows['flop_limit']['tflop']:.2f} TFLOP per step (median)"
                 + (f"; GRPO's: {rows['flop_limit_grpo']['tflop']:.2f}." if "flop_limit_grpo" in rows else "."))
    lines.append("Measured steps (s): " + "; ".join(f"{s} {rows[s]['all_totals']}" for s in SYSTEMS if s in rows) + ".")
    lines.append("Per process: " + "; ".join(
        f"{s} {r['process_s']:.0f} s in all, {DTYPE_SHORT[r.get('dtype', 'float32')]} GEMM "
        f"{r.get('gemm_gflops', float('nan')):.0f} GFLOP/s after its setup" for s, r in raw.items()) + ".")
    floor = raw.get("floor")
    if floor and floor.get("first_minibatch_ratio_error") is not None:
        lines.append(f"Floor check: first mini-batch |ratio − 1| ≤ {floor['first_minibatch_ratio_error']:.1e} "
                     "(its decode-loop log-probs match a teacher-forced forward).")
    if run["systems_missing"]:
        lines.append(f"Not measured (failed): {', '.join(run['systems_missing'])}.")
    excess = phase_excess_line(rows)
    if excess:
        lines += ["", excess]
    decode = decode_table_lines(sec, size)
    if decode:
        lines += ["", *decode]
    goal_lines = goals(sec, context)
    if goal_lines:
        lines += ["", "Goals:", "", *goal_lines]
    return lines + [""] + profile_lines(raw)


def profile_lines(raw: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for system, r in raw.items():
        table = r.get("profile_table")
        if not table:
            continue
        step = r.get("profiled_step", {})
        lines += [f"Profile of one extra {SYSTEM_LABELS[system]} step ({step.get('total', float('nan')):.1f} s under "
                  "the profiler; phases " + ", ".join(f"{p} {step.get(p, 0):.1f}" for p in PHASES[:-1] if p in step)
                  + "), top ops by self CPU time:", "", "```",
                  *[ln[:150] for ln in table.splitlines()[2:22]], "```", ""]
    return lines
