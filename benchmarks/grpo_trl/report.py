"""RESULTS_TRL_GRPO.md from RESULTS_TRL_GRPO.json: one section per shape and dtype; the hand-written notes after
NOTES_MARKER are kept when the report is rewritten."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from grpo_trl.common import PHASES, WARMUP_NEW_TOKENS

NOTES_MARKER = "<!-- notes: text from here on is kept when the report is rewritten -->"
LABELS = {"lit_rlhf": "lit_rlhf GRPO (fast_rollout false: generate, no old-log-prob pass)",
          "lit_rlhf_fast": "lit_rlhf GRPO (fast_rollout true)", "trl": "TRL 1.16 GRPOTrainer",
          "flop_limit": "FLOP limit"}
SHOWN = ("generate", "reward", "scoring", "update", "other", "total")


def store_section(path: Path, key: str, section: dict[str, Any]) -> dict[str, Any]:
    """Adds (or replaces) ``key`` in the JSON beside ``path``; every section, in shape and dtype order."""
    json_path = path.with_suffix(".json")
    sections = json.loads(json_path.read_text())["sections"] if json_path.exists() else {}
    sections[key] = section
    order = sorted(sections, key=lambda k: (["tiny", "40m", "387m"].index(k.split("/")[0]), k.split("/")[1] != "float32"))
    sections = {k: sections[k] for k in order}
    json_path.write_text(json.dumps({"sections": sections}, indent=1, default=str))
    return sections


def write_report(path: Path, sections: dict[str, Any]) -> None:
    notes = NOTES_MARKER + "\n"
    if path.exists() and NOTES_MARKER in path.read_text():
        old = path.read_text()
        notes = old[old.index(NOTES_MARKER):]
    path.write_text(render(sections) + "\n" + notes)
    print(f"wrote {path}", flush=True)


def render(sections: dict[str, Any]) -> str:
    versions: dict[str, dict[str, str]] = {}
    for sec in sections.values():
        for system, results in sec["raw"].items():
            for r in results:
                versions.setdefault("TRL side" if system == "trl" else "lit_rlhf side", {}).update(r.get("versions", {}))
    lines = ["# GRPO step: lit_rlhf vs TRL 1.16 GRPOTrainer, one thread, with the FLOP limit of each phase", "",
             "Written by `benchmarks/bench_grpo_trl.py` (what each side runs: benchmarks/README.md). Seconds per step, "
             "medians of the measured steps; one thread per process; each system in a fresh process.", "",
             f"- Python {platform.python_version()}; " + "; ".join(
                 f"{side}: " + ", ".join(f"{k} {v}" for k, v in sorted(v.items())) for side, v in sorted(versions.items())),
             "- Step: 4 prompts x 4 samples, exactly 64 prompt + 64 new tokens, LoRA r 16 (alpha 32, no dropout) on "
             "q_proj/v_proj, k3 KL in the loss at beta 0.04 against the adapter-disabled base, token-mean loss, one "
             f"AdamW step per rollout, on-policy, stub reward; warm-up steps ({WARMUP_NEW_TOKENS} new tokens) not "
             "measured.", ""]
    for key, sec in sections.items():
        lines += section_lines(key, sec)
    return "\n".join(lines)


def section_lines(key: str, sec: dict[str, Any]) -> list[str]:
    run, rows = sec["run"], sec["rows"]
    rates = run["rates"]
    lines = [f"## {key}: Qwen2 {run['shape']} ({run['parameters']:,} parameters), frozen weights {run['dtype']}", "",
             f"Machine: {run['cpu']}, {run['cores']} cores ({run['flags']}), shared; load average {fmt_load(run['load_start'])} "
             f"at the start, {fmt_load(run['load_end'])} at the end; {run['started']}, {run['minutes']:.0f} min, "
             f"{run['rounds']} round(s). GEMM {run.get('gemm_n', 2048)}^3 on one thread: fp32 {rates[0]['gemm_gflops']:.0f} / "
             f"{rates[1]['gemm_gflops']:.0f} GFLOP/s, bf16 {rates[0]['gemm_gflops_bf16']:.0f} / "
             f"{rates[1]['gemm_gflops_bf16']:.0f} (before / after)" + cpu_clock_rates(rates) + ".", "",
             f"Command: `{run['command']}`", "", *added_lines(run),
             "Wall seconds:", ""] + table_lines(rows) + ratio_lines(rows)
    cpu_rows = {s: {**r["cpu"], "n_steps": r["n_steps"]} for s, r in rows.items() if "cpu" in r}
    if cpu_rows:
        cpu_rows["flop_limit"] = rows["flop_limit"]
        lines += ["", "CPU seconds of the process (time the co-tenants took the core is not in them; their "
                  "cache and memory-bandwidth use is):", ""] + table_lines(cpu_rows) + ratio_lines(cpu_rows)
    lines += check_lines(sec) + [""]
    if run.get("systems_missing"):
        lines.append(f"Missing (failed): {', '.join(run['systems_missing'])}.")
    return lines


def table_lines(rows: dict[str, Any]) -> list[str]:
    lines = ["| system | " + " | ".join(SHOWN) + " | steps |", "|---|" + "---:|" * (len(SHOWN) + 1)]
    for system, row in rows.items():
        cells = [f"{row[p]:.2f}" if p in row else "–" for p in SHOWN]
        lines.append(f"| {LABELS[system]} | " + " | ".join(cells) + f" | {row.get('n_steps', '–')} |")
    return lines


def added_lines(run: dict[str, Any]) -> list[str]:
    """The runs that added systems to this section (``--add``): their command, time, load and GEMM readings."""
    return [f"Added by `{a['command']}` ({', '.join(a['systems'])}; {a['started']}, {a['minutes']:.0f} min, load "
            f"{fmt_load(a['load_start'])} / {fmt_load(a['load_end'])}; GEMM by the CPU clock fp32 "
            f"{a['rates'][0].get('gemm_gflops_cpu', 0):.0f} / {a['rates'][1].get('gemm_gflops_cpu', 0):.0f}).\n"
            for a in run.get("added", [])]


def cpu_clock_rates(rates: list[dict[str, float]]) -> str:
    if "gemm_gflops_cpu" not in rates[0]:
        return ""
    return (f"; by the CPU clock (what the FLOP limit divides by: the higher) fp32 {rates[0]['gemm_gflops_cpu']:.0f} / "
            f"{rates[1]['gemm_gflops_cpu']:.0f}, bf16 {rates[0]['gemm_gflops_bf16_cpu']:.0f} / "
            f"{rates[1]['gemm_gflops_bf16_cpu']:.0f}")


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def ratio_lines(rows: dict[str, Any]) -> list[str]:
    lines = [""]
    limit = rows["flop_limit"]
    for system in ("lit_rlhf", "lit_rlhf_fast"):
        if system not in rows:
            continue
        row = rows[system]
        if "trl" in rows:
            lines.append(f"- TRL ÷ {LABELS[system]}: " + ", ".join(
                f"{p} {rows['trl'][p] / row[p]:.2f}x" for p in ("generate", "scoring", "update", "total") if row[p] > 0))
        lines.append(f"- {LABELS[system]} ÷ FLOP limit: " + ", ".join(
            f"{p} {row[p] / limit[p]:.1f}x" for p in ("generate", "scoring", "update", "total")))
    if "trl" in rows:
        lines.append("- TRL ÷ FLOP limit: " + ", ".join(
            f"{p} {rows['trl'][p] / limit[p]:.1f}x" for p in ("generate", "scoring", "update", "total")))
    lines.append(f"- FLOP limit: {limit['tflop']:.3f} TFLOP per step (matmuls; generation with each prompt's "
                 "tokens once, scoring = the reference forward, update = 2 forwards + LoRA weight gradients).")
    return lines


def check_lines(sec: dict[str, Any]) -> list[str]:
    """The same work on both sides, as each worker read it back."""
    lines = ["", "Checks (read back by each worker):", ""]
    for system, results in sec["raw"].items():
        if not results:
            continue
        c, row = results[0]["checks"], sec["rows"][system]
        old = {s.get("old_logprob_pass_skipped") for r in results for s in r["steps"] if not s["warmup"]}
        passes = {s.get("logprob_passes_in_scoring") for r in results for s in r["steps"] if not s["warmup"]}
        dtypes = (f", frozen {c['frozen_dtypes']}, trainable {c['trainable_dtypes']}"
                  if system != "trl" and "frozen_dtypes" in c else "")
        extra = ("old log-probs kept from sampling (no pass)" + dtypes if system == "lit_rlhf_fast" else
                 f"old-log-prob pass skipped {sorted(old, key=str)}" + dtypes if system != "trl" else
                 f"log-prob passes in scoring {sorted(passes, key=str)} (1 = reference only), loss_type "
                 f"{c['loss_type']}, num_iterations {c['num_iterations']}, gradient checkpointing "
                 f"{c['gradient_checkpointing']}, frozen {c['frozen_dtypes']}, trainable {c['trainable_dtypes']}")
        lines.append(f"- {LABELS[system]}: responses {row['response_lengths']} tokens x {row['rows']} rows, prompts "
                     f"{row['prompt_lengths']} tokens; trainable parameters {c['trainable_parameters']:,}; KL beta "
                     f"{c['kl_beta']} (k3 in the loss); reference: {c['reference']}; {extra}")
    return lines
