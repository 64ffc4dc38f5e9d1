"""Benchmark: one GRPO step of lit_rlhf against TRL 1.16's GRPOTrainer, side by side on one thread, with the FLOP
limit of each phase on this machine.

    python benchmarks/bench_grpo_trl.py --shape 40m --steps 3 --rounds 2            # fp32, ~10 min
    python benchmarks/bench_grpo_trl.py --shape 40m --steps 3 --rounds 2 --dtype bfloat16
    python benchmarks/bench_grpo_trl.py --shape 387m --steps 2 --rounds 1           # ~25 min
    python benchmarks/bench_grpo_trl.py --shape tiny --systems lit_rlhf --steps 1 --in-process   # smoke run

Model: a Qwen2 decoder built from its config with random weights (``--shape``: 40m, the 387m body of Qwen2.5-0.5B
with a 32k vocabulary, or tiny), tokenizer: a byte-level BPE trained on the bundled DialogSum text; both saved
once under the cache folder and loaded by every system. Step: 4 prompts of exactly 64 tokens x 4 samples of
exactly 64 new tokens (end-of-sequence blocked: min = max new tokens), LoRA r 16 / alpha 32 on q_proj, v_proj, no
dropout, k3 KL in the loss at beta 0.04 against the adapter-disabled base, token-mean loss, one AdamW step (lr
1e-5) per rollout, on-policy (no old-log-prob pass on either side), stub reward. Warm-up steps (``--warmup``,
not measured) generate 8 tokens per response.

Each system runs in its own process (TRL in its own environment, ``benchmarks/.venv-trl-grpo``,
built on demand with TRL 1.16.0 and transformers 5.25.0, or ``--trl-python``), all on one
thread; ``--rounds 2`` runs them in the order A B then B A, so that a co-tenant's load falls on both sides. The
report gives medians of every measured step of every round; the GEMM rate the FLOP limit divides by is measured
before and after (the higher), in the run's dtype. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from grpo_trl.common import PHASES  # noqa: E402
from grpo_trl.shapes import SHAPES, build_model_dir, build_prompts, model_parameters, step_flops  # noqa: E402
from ppo_step.machine import cpu_flags, gemm_rate, library_versions, log  # noqa: E402

SYSTEMS = ("lit_rlhf", "lit_rlhf_fast", "trl")
TRL_GRPO_VENV = HERE / ".venv-trl-grpo"
TRL_GRPO_PINS = ["trl==1.16.0", "transformers==5.25.0", "peft==0.21.2", "accelerate==1.16.0"]
DEFAULT_RESULTS = HERE / "RESULTS_TRL_GRPO.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    worker = argv[:1] == ["worker"]
    if worker:
        argv = argv[1:]
        p.add_argument("--system", required=True, choices=SYSTEMS)
        p.add_argument("--prompts-file", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--profile-out", default=None)
    p.add_argument("--shape", default="40m", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the frozen weights' dtype")
    p.add_argument("--steps", type=int, default=3, help="measured steps per system and round")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (8 new tokens each)")
    p.add_argument("--cache-dir", default=str(HERE / ".cache"))
    p.add_argument("--model-dir", default=None)
    if not worker:
        p.add_argument("--systems", default="lit_rlhf,trl", help=f"comma-separated, of {', '.join(SYSTEMS)}")
        p.add_argument("--rounds", type=int, default=1, help="2: the systems in order, then in reverse order")
        p.add_argument("--trl-python", default=None,
                       help="TRL's interpreter; default benchmarks/.venv-trl-grpo, built on demand (not by --shape tiny)")
        p.add_argument("--profile", action="store_true", help="lit_rlhf: profile scoring and update of one extra step")
        p.add_argument("--results", default=None, help="default benchmarks/RESULTS_TRL_GRPO.md; --shape tiny: none")
        p.add_argument("--in-process", action="store_true", help="lit_rlhf systems in this process (smoke tests)")
        p.add_argument("--render", action="store_true", help="only rewrite the report from its JSON")
        p.add_argument("--add", action="store_true",
                       help="add these systems to the section of the same shape and dtype (its other systems, FLOP "
                            "limit and machine readings kept; this run's readings and command listed beside them)")
    args = p.parse_args(argv)
    args.mode, args.argv = ("worker" if worker else "parent"), argv
    if not worker and args.results is None and args.shape != "tiny":
        args.results = str(DEFAULT_RESULTS)
    return args


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    stored = json.loads(Path(args.prompts_file).read_text())
    # the extra last batch is for the profiled step of the worker that profiles; the others leave it out
    batches = stored["batches"][: None if args.profile_out or not stored["profile_batch"] else -1]
    out: dict[str, Any] = {"system": args.system, "dtype": args.dtype, "threads": torch.get_num_threads(),
                           "load_start": os.getloadavg()}
    start = time.perf_counter()
    if args.system == "trl":
        from grpo_trl.trl_side import worker_trl

        worker_trl(args, batches, out)
    else:
        from grpo_trl.lit_side import worker_lit

        worker_lit(args, batches, out)
    out["wall_s"], out["load_end"], out["versions"] = time.perf_counter() - start, os.getloadavg(), library_versions()
    if args.profile_out:
        Path(args.profile_out).write_text("\n\n".join(f"## lit_rlhf {k}\n\n{v}" for k, v in out["profiles"].items()))
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def run_system(system: str, args: argparse.Namespace, prompts_file: Path, round_no: int) -> dict[str, Any] | None:
    logs = Path(args.cache_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"grpo_{system}_{args.shape}_{args.dtype}_r{round_no}"
    out_path, log_path = logs / f"{stem}.json", logs / f"{stem}.log"
    out_path.unlink(missing_ok=True)
    cmd = ["worker", "--system", system, "--prompts-file", str(prompts_file), "--out", str(out_path), "--shape",
           args.shape, "--dtype", args.dtype, "--warmup", str(args.warmup), "--cache-dir", args.cache_dir,
           "--model-dir", str(args.model_dir)]
    if args.profile and system == "lit_rlhf" and round_no == 0:
        cmd += ["--profile-out", str(logs / f"profile_{args.shape}_{args.dtype}.txt")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    log(f"--- {system}, round {round_no}, {args.shape} {args.dtype} (log: {log_path})")
    start = time.perf_counter()
    if args.in_process and system != "trl":
        result = run_worker(parse_args(cmd))
    else:
        python = args.trl_python if system == "trl" else sys.executable
        with open(log_path, "w") as f:
            code = subprocess.run([python, str(Path(__file__).resolve()), *cmd], stdout=f, stderr=subprocess.STDOUT,
                                  env=env, cwd=str(REPO)).returncode
        if code != 0 or not out_path.exists():
            log(f"{system} failed (exit {code}):\n  " + "\n  ".join(log_path.read_text().splitlines()[-25:]))
            return None
        result = json.loads(out_path.read_text())
    log(f"    done in {time.perf_counter() - start:.0f} s")
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the measured steps of every round (warm-up and profiled steps left out)."""
    steps = [s for r in results for s in r["steps"] if not s["warmup"] and not s.get("profiled")]
    row = {p: statistics.median(s[p] for s in steps) for p in (*PHASES, "total")}
    row["cpu"] = {p: statistics.median(s["cpu"][p] for s in steps) for p in (*PHASES, "total")}
    row["n_steps"], row["all_totals"] = len(steps), [round(s["total"], 2) for s in steps]
    row["response_lengths"] = sorted({n for s in steps for n in s["response_lengths"]})
    row["prompt_lengths"] = sorted({n for s in steps for n in s["prompt_lengths"]})
    row["rows"] = sorted({s["rows"] for s in steps})
    return row


def flop_limit_row(shape_key: str, rate: float) -> dict[str, Any]:
    flops = step_flops(SHAPES[shape_key])
    row = {"generate": flops["generate"] / rate, "scoring": flops["scoring"] / rate, "update": flops["update"] / rate}
    row["total"] = sum(row.values())
    row["tflop"] = sum(flops.values()) / 1e12
    return row


def cpu_clock_gemm_rate(n: int, dtype: str, repeats: int = 10) -> float:
    """GEMM rate (FLOP/s) of an n x n x n matmul on one thread, best of ``repeats`` by the process's CPU clock:
    the rate of a core that is all ours, which a busy machine's wall clock does not show."""
    import torch

    torch.set_num_threads(1)
    a, b = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
    best = float("inf")
    for i in range(repeats + 2):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start) if i >= 2 else best
    return 2 * n**3 / best


def measure_rates(n: int = 2048) -> dict[str, float]:
    """GEMM rates (GFLOP/s) of an n x n x n matmul on one thread, fp32 and bf16, best of 10 by the wall clock and
    by the CPU clock (``_cpu``)."""
    return {"gemm_gflops": gemm_rate(1, n=n, repeats=10) / 1e9,
            "gemm_gflops_bf16": gemm_rate(1, n=n, repeats=10, dtype="bfloat16") / 1e9,
            "gemm_gflops_cpu": cpu_clock_gemm_rate(n, "float32") / 1e9,
            "gemm_gflops_bf16_cpu": cpu_clock_gemm_rate(n, "bfloat16") / 1e9}


def limit_rate(rates: list[dict[str, float]], dtype: str) -> float:
    """What the FLOP limit divides by (FLOP/s): the best GEMM rate in ``dtype`` of the readings, by the CPU clock
    where measured (earlier runs: the wall clock)."""
    key = "gemm_gflops" if dtype == "float32" else "gemm_gflops_bf16"
    return 1e9 * max(r.get(key + "_cpu", r[key]) for r in rates)


def lscpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return cpu_flags().split(";")[0]


def run_parent(args: argparse.Namespace) -> int:
    from grpo_trl.report import store_section, write_report

    systems = [s.strip() for s in args.systems.split(",")]
    if "trl" in systems and args.trl_python is None:
        from ppo_step.trl_system import trl_python

        built = trl_python(build=args.shape != "tiny", venv=TRL_GRPO_VENV, pins=TRL_GRPO_PINS)
        args.trl_python = str(built) if built else str(TRL_GRPO_VENV / "bin" / "python")
    if "trl" in systems and not Path(args.trl_python).exists():
        log(f"TRL skipped: {args.trl_python} does not exist")
        systems.remove("trl")
    cache = Path(args.cache_dir)
    args.model_dir = build_model_dir(cache, SHAPES[args.shape])
    batches = build_prompts(args.model_dir, args.warmup + args.steps + (1 if args.profile else 0))
    prompts_file = cache / f"grpo_prompts_{args.shape}.json"
    prompts_file.write_text(json.dumps({"batches": batches, "profile_batch": args.profile}))
    started, load_start = time.time(), os.getloadavg()
    gemm_n = 256 if args.shape == "tiny" else 2048  # the smoke run's rates are not a measurement
    before = measure_rates(gemm_n)
    log(f"rates before: {before}; load {load_start}")
    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for round_no in range(args.rounds):
        for system in (systems if round_no % 2 == 0 else systems[::-1]):
            result = run_system(system, args, prompts_file, round_no)
            if result is not None:
                raw[system].append(result)
    after = measure_rates(gemm_n)
    rate = limit_rate([before, after], args.dtype)
    rows = {s: summarize(r) for s, r in raw.items() if r}
    rows["flop_limit"] = flop_limit_row(args.shape, rate)
    run = {"shape": args.shape, "dtype": args.dtype, "parameters": model_parameters(args.model_dir),
           "cpu": lscpu_model(), "cores": os.cpu_count(), "flags": cpu_flags().split("; flags: ")[-1],
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "minutes": (time.time() - started) / 60,
           "load_start": load_start, "load_end": os.getloadavg(), "rates": [before, after], "threads": 1,
           "command": "python " + " ".join([os.path.relpath(__file__, REPO), *args.argv]), "rounds": args.rounds, "gemm_n": gemm_n,
           "systems_missing": [s for s in systems if not raw[s]]}
    section = {"rows": rows, "raw": raw, "run": run}
    if not args.results:  # the smoke run: the report on stdout, no results file
        from grpo_trl.report import render

        print(render({f"{args.shape}/{args.dtype}": section}))
        return 0
    if args.add:
        section = added_to(Path(args.results), f"{args.shape}/{args.dtype}", section)
    sections = store_section(Path(args.results), f"{args.shape}/{args.dtype}", section)
    write_report(Path(args.results), sections)
    return 1 if run["systems_missing"] else 0


def added_to(path: Path, key: str, section: dict[str, Any]) -> dict[str, Any]:
    """``section``'s systems added to the stored section ``key`` (which keeps its FLOP limit and readings); the
    added run's machine readings and command are kept in its ``run["added"]``."""
    json_path = path.with_suffix(".json")
    stored = json.loads(json_path.read_text())["sections"].get(key) if json_path.exists() else None
    if stored is None:
        return section
    new_systems = [s for s in section["raw"] if section["raw"][s]]
    stored["raw"].update({s: section["raw"][s] for s in new_systems})
    limit = stored["rows"].pop("flop_limit")
    stored["rows"].update({s: section["rows"][s] for s in new_systems})
    stored["rows"]["flop_limit"] = limit
    added = {k: section["run"][k] for k in ("command", "started", "minutes", "load_start", "load_end", "rates")}
    stored["run"].setdefault("added", []).append({**added, "systems": new_systems})
    return stored


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "worker":
        run_worker(args)
        return 0
    if args.render:
        from grpo_trl.report import write_report

        write_report(Path(args.results), json.loads(Path(args.results).with_suffix(".json").read_text())["sections"])
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
