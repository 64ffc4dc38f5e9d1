"""The report of ``bench_memory.py``: the measured phase peaks, the per-phase fits (``memory_model.py``), their
error on the held-out shape and on the workload checks, and the Qwen2.5-7B prediction, as markdown."""

from __future__ import annotations

import platform
import time
from typing import Any

import bench_memory as bm
import memory_model as mm
import numpy as np

MIB, GIB = 2**20, 2**30


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def points(results: list[dict[str, Any]], key: str) -> dict[tuple, dict[str, list[mm.Point]]]:
    """family -> phase -> measured points (runs without the profiler; ``key``: rss or cuda)."""
    out: dict[tuple, dict[str, list[mm.Point]]] = {}
    for r in results:
        if r.get("profiled"):
            continue
        config = bm.Config(**r["config"])
        for phase, v in r["phases"].items():
            point = mm.Point(bm.SHAPES[r["shape"]], config.workload(), 4 if config.dtype == "float32" else 2,
                             float(v[key]), f"{r['shape']} {config.name}")
            out.setdefault(config.family, {}).setdefault(phase, []).append(point)
    return out


def fixed(phase_points: list[mm.Point]) -> list[mm.Point]:
    """The fit's and the held-out points: the seven shapes at 8 rows of 64 + 64 tokens, and the prompt-heavy
    ones (8 rows of 448 + 16), no levers."""
    return [p for p in phase_points if p.name.split(" ")[0] in (*bm.FIT_SHAPES, bm.HELD_OUT)
            and (p.workload.rows, p.workload.prompt, p.workload.response) in bm.FIT_WORKLOADS
            and p.workload.micro is None and p.workload.chunk is None]


def family_name(family: tuple) -> str:
    algo, dtype, ckpt = family
    return f"{algo} {'fp32' if dtype == 'float32' else 'bf16'}{' ckpt' if ckpt else ''}"


def measured_table(results: list[dict[str, Any]], key: str) -> list[str]:
    lines = ["| shape (hidden, layers, vocab) | configuration | frozen weights (MiB) | rollout | scoring | update |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        if r.get("profiled"):
            continue
        s = bm.SHAPES[r["shape"]]
        cells = " | ".join(f"{r['phases'][p][key] / MIB:.1f}" if p in r["phases"] else "-" for p in mm.PHASES)
        lines.append(f"| {r['shape']} ({s.hidden}, {s.layers}, {s.vocab:,}) | {r['name']} | "
                     f"{r['weight_bytes'] / MIB:.1f} | {cells} |")
    return lines


def profiled_table(results: list[dict[str, Any]]) -> list[str]:
    """Live tensor bytes (profiled runs) beside the RSS of the same configuration's unprofiled run."""
    rss = {(r["shape"], r["name"]): r for r in results if not r.get("profiled")}
    lines = ["| shape | configuration | " + " | ".join(f"{p}: tensors / RSS" for p in mm.PHASES) + " |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        other = rss.get((r["shape"], r["name"]))
        if not r.get("profiled") or other is None:
            continue
        cells = " | ".join(f"{r['phases'][p]['tensors'] / MIB:.1f} / {other['phases'][p]['rss'] / MIB:.1f}"
                           for p in mm.PHASES)
        lines.append(f"| {r['shape']} | {r['name']} | {cells} |")
    return lines if len(lines) > 2 else []


def fit_tables(pts: dict[tuple, dict[str, list[mm.Point]]]) -> tuple[list[str], list[str]]:
    """Coefficients of the fit on the six fit shapes, and the errors: the held-out shape, leave-one-out over all
    seven, and the workload checks (other rows x tokens, micro-batches, rollout chunks) predicted by that fit."""
    coef_lines = ["| family | phase | " + " | ".join(sorted({f for fs in mm.FEATURES.values() for f in fs})) + " |",
                  "|---|---|" + "---:|" * len({f for fs in mm.FEATURES.values() for f in fs})]
    err_lines = ["| family | phase | held-out 'big': measured / predicted (MiB) | error | leave-one-out, worst "
                 "| workload checks: error |", "|---|---|---:|---:|---:|---|"]
    names = sorted({f for fs in mm.FEATURES.values() for f in fs})
    for family, phases in pts.items():
        for phase in mm.PHASES:
            shapes = fixed(phases.get(phase, []))
            train = [p for p in shapes if not p.name.startswith(bm.HELD_OUT + " ")]
            held = [p for p in shapes if p.name.startswith(bm.HELD_OUT + " ")]
            if len(train) < len(mm.FEATURES[phase]):
                continue
            coef = dict(zip(mm.FEATURES[phase], mm.fit(phase, train)))
            coef_lines.append(f"| {family_name(family)} | {phase} | " + " | ".join(
                ("-" if n not in coef else f"{coef[n] / MIB:.1f} MiB" if n == "const" else f"{coef[n]:.2f}")
                for n in names) + " |")
            cells = ["-", "-"]
            if held:
                guess, err = mm.heldout_error(phase, train, held[0])
                cells = [f"{held[0].peak / MIB:.1f} / {guess / MIB:.1f}", f"{err:+.1f} %"]
            loo = max((abs(e) for _, e in mm.leave_one_out(phase, shapes)), default=float("nan")) \
                if len(shapes) > len(mm.FEATURES[phase]) else float("nan")
            checks = ", ".join(f"{p.name.split(' ', 1)[1]} {mm.heldout_error(phase, train, p)[1]:+.1f} %"
                               for p in phases[phase] if p not in shapes)
            err_lines.append(f"| {family_name(family)} | {phase} | {cells[0]} | {cells[1]} | {loo:.1f} % | "
                             f"{checks or '-'} |")
    return coef_lines, err_lines


def pair_floor(update_points: list[mm.Point]) -> float:
    """The update's per-layer coefficient from the base / deep pair (prompt-heavy where measured: the larger
    activations), 0 without the pair. On this CPU the bfloat16 peaks are the larger of two moments (the LM head's
    float32 weight copies, the logits), which a sum of terms cannot follow: the fit can leave the small per-layer
    term at 0; the pair isolates it."""
    by = {(p.name.split(" ")[0], p.workload.prompt): p for p in fixed(update_points)}
    for prompt in (448, 64):
        if ("base", prompt) in by and ("deep", prompt) in by:
            return max(0.0, mm.depth_pair("update", by[("base", prompt)], by[("deep", prompt)]))
    return 0.0


def prediction_rows(pts: dict[tuple, dict[str, list[mm.Point]]]) -> list[dict[str, Any]]:
    """Qwen2.5-7B per lever and algorithm, from the fit on all seven shapes of the lever's family."""
    rows = []
    for algo in ("ppo", "grpo"):
        for lever in mm.LEVERS_7B:
            phases = pts.get((algo, lever.dtype, lever.checkpointing))
            if not phases or any(len(fixed(phases.get(p, []))) < len(mm.FEATURES[p]) for p in mm.PHASES):
                continue
            coefs = {p: mm.fit(p, fixed(phases[p])) for p in mm.PHASES}
            f32 = pts.get(("ppo", "float32", False))  # (the family with the prompt-heavy points)
            f32_coefs = {p: mm.fit(p, fixed(f32[p])) for p in mm.PHASES} if f32 and lever.dtype != "float32" else None
            floors = {("update", "activations"): pair_floor(phases["update"])}
            gpu = mm.gpu_coefficients(coefs, f32_coefs, floors)
            out = mm.predict_step(gpu, mm.QWEN25_7B, mm.WORKLOAD_7B, lever, value_head=algo == "ppo")
            rows.append({"algo": algo, "lever": lever, **out})
    return rows


def prediction_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| algorithm | frozen weights | checkpointing | rows per pass | rows decoded at once | log-probs | "
             "weights + LoRA/AdamW | rollout | scoring | update | peak (GiB) | 24 GB | 80 GB |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lv = r["lever"]
        logp = "full [rows, tokens, vocab]" if lv.logprob_chunk is None else \
            f"chunked, {lv.logprob_chunk} positions (predicted from the model)"
        lines.append(
            f"| {r['algo'].upper()} | {lv.dtype} | {'yes' if lv.checkpointing else 'no'} | {lv.micro} | "
            f"{lv.chunk or mm.WORKLOAD_7B.rows} | {logp} | {(r['weights'] + r['trainable']) / GIB:.1f} | "
            + " | ".join(f"{r[p] / GIB:.1f}" for p in mm.PHASES)
            + f" | {r['peak'] / GIB:.1f} | {'fits' if mm.fits(r['peak'], 24) else 'no'} | "
            f"{'fits' if mm.fits(r['peak'], 80) else 'no'} |")
    return lines


def header(device: str, argv: str) -> list[str]:
    machine = f"{cpu_name()}, {bm.os.cpu_count()} cores, 1 thread" if device == "cpu" else "CUDA"
    return [
        "# Peak memory of each phase of a PPO / GRPO step, and a memory model fitted to it", "",
        f"Generated by `python benchmarks/bench_memory.py {argv}`".rstrip() + f" ({time.strftime('%Y-%m-%d')}) on "
        f"{machine}, from the runs of `OMP_NUM_THREADS=1 python benchmarks/bench_memory.py` (RSS; "
        f"{len(bm.FAMILIES)} families x 7 shapes, prompt-heavy points, 5 workload checks) and `... --resume "
        f"--profile --families \"ppo float32 False\"` (live tensor bytes). Each run is a fresh process taking "
        f"{bm.STEPS} steps; the last step's phases are metered. "
        "Qwen2-shaped models from configs (random weights, tied embeddings, intermediate ~5.25 x hidden, head_dim "
        "64), LoRA r 16 on q_proj/v_proj, fast rollout, one mini-batch of all rows; PPO (value head, 8 prompts) "
        "and GRPO (2 prompts x 4 samples, no value head); the reference is the adapter-disabled policy. Fixed "
        "workload: 8 rows of 64 prompt + 64 response tokens. Each phase's figure is its peak above the memory "
        "held at its start, in MiB: " + ("peak RSS growth (VmHWM reset at the phase's start, glibc's mmap "
                                         "threshold fixed at 64 KiB)." if device == "cpu" else
                                         "`torch.cuda.max_memory_allocated` growth."), ""]


RSS_VS_GPU = [
    "## What CPU RSS measures, and what a GPU's `max_memory_allocated` would", "",
    "RSS growth counts every page the process touched and still holds: tensor buffers, and also what the "
    "allocator keeps after a free (glibc caches freed chunks in its heap arenas; the fixed 64 KiB mmap threshold "
    "here returns every larger buffer at once, which is why RSS and the live tensor bytes agree within a few "
    "percent where both were measured), the float32 copies of the LM head's weight that this CPU's bfloat16 "
    "matmul makes (about 16 bytes per weight; torch allocations, the live-tensor figure sees them too: the "
    "`head` term), Python objects, thread stacks and code "
    "loaded on first use (the second step is metered to keep that out), and pages of the weights' file mapping "
    "(touched before the first phase). `torch.cuda.max_memory_allocated` counts only tensors of PyTorch's "
    "caching allocator, rounded up to its 512-byte blocks: no CUDA context (300-500 MiB), no cuBLAS/cuDNN "
    "workspaces, no blocks cached but free (`max_memory_reserved` is the number that has to fit), no host-side "
    "objects. The reverse: a GPU's bfloat16 GEMMs need no weight copies and its flash/memory-efficient "
    "attention keeps no score matrix (CPU sdpa here does: the `attention` term), so both CPU-only terms are "
    "dropped from the GPU prediction; the other tensors are the same. The live-tensor figure (torch.profiler) is "
    "the CPU analogue of `max_memory_allocated`.", ""]


def render(results: list[dict[str, Any]], device: str, argv: str) -> str:
    key = "cuda" if device == "cuda" else "rss"
    pts = points(results, key)
    coef_lines, err_lines = fit_tables(pts)
    lines = header(device, argv) + (RSS_VS_GPU if device == "cpu" else []) + ["## Measured", ""] \
        + measured_table(results, key)
    profiled = profiled_table(results)
    if profiled:
        lines += ["", "### Live tensor bytes (torch.profiler memory events) / RSS growth, MiB", ""] + profiled
    lines += ["", "## Fitted terms", "", "bytes = sum of coefficient x feature (`benchmarks/memory_model.py`; a "
              "coefficient is how many buffers of that size are alive at the phase's peak; `const` in MiB). Fit "
              "on the six fit shapes at 8 x (64 + 64) tokens and, where measured (PPO fp32, PPO bf16 with and "
              "without checkpointing, GRPO bf16 checkpointed), base, deep and wide at 8 x (448 + 16): non-negative "
              "least squares, up to 7 unknowns on 6-9 points (a family with fewer points than unknowns has no row "
              "here; its prediction uses all 7 shapes). Without the prompt-heavy points the `attention` and "
              "`prefill` terms are loose (GRPO fp32's rollout).", ""] + coef_lines
    lines += ["", "## Prediction error", "", "From the fit above, predicted: the held-out shape 'big' (hidden 512, "
              "8 layers, vocabulary 49,152: all three at or above the largest of the fit shapes); leave-one-out "
              "over the fit points and 'big' (the worst); the workload checks (base shape, other rows x tokens or "
              "levers). Error: (predicted - measured) / measured.", ""] + err_lines
    rows = prediction_rows(pts)
    if rows:
        lines += ["", "## Predicted: Qwen2.5-7B, LoRA r 16, 16 prompts x 4 samples, 512 prompt + 512 response tokens",
                  "", "From each family's fit on all its points, as a GPU would see them "
                  "(`memory_model.gpu_coefficients`: the CPU-only `head` term dropped; a bfloat16 base's `logits` "
                  "coefficient at least the float32 family's + 0.5; the update's `activations` at least the base/deep "
                  "pair's). Peak = frozen "
                  "weights + LoRA weights and AdamW moments + the largest phase; fits a budget when under 90 % of "
                  "it (CUDA context, fragmentation and a reward model are not in it).", ""] + prediction_table(rows)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a quick look at a results file: python benchmarks/memory_report.py OUT.json
    import json
    import sys

    print(render(json.loads(open(sys.argv[1]).read()), "cpu", "(partial)"))
    np.set_printoptions(precision=3)
