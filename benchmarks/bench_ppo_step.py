"""Benchmark: one PPO step's speed and memory for lit_rlhf (fast_rollout, the default, and exact mode), TRL
0.11.4 (batched and the recipe's loop), a hand-written bare-PyTorch floor, and the FLOP limit of the step on this
machine; beside them lit_rlhf's GRPO step (4 prompts x 4 samples: the same 16 responses, no value head). With
``--dtype bfloat16`` every system keeps its frozen weights in bf16 (trained weights fp32) and the FLOP limit
divides by the bf16 GEMM rate. lit_rlhf's cached decode loop is timed step by step against its bandwidth and
FLOP limits.

    python benchmarks/bench_ppo_step.py                       # workload A and B, all systems
    python benchmarks/bench_ppo_step.py --workload A --steps 3 --threads 1 --profile
    python benchmarks/bench_ppo_step.py --workload B --steps 2 --threads 1 --dtype bfloat16
    python benchmarks/bench_ppo_step.py --tiny --systems lit_rlhf,lit_rlhf_fast,floor   # smoke test, seconds

Model: the flan-t5-base architecture built from its config with random weights (untied lm_head, 247,577,856
parameters) plus a LoRA adapter (r 32, alpha 32, dropout 0.05 on q and v: 3,538,944) and a value head (769),
saved once with ``save_pretrained`` into the cache folder so that every system loads the same weights from a
local path. Rollout batch 16, mini-batch 4, 1 PPO epoch, AdamW lr 1.41e-5, fp32 (or bf16 frozen weights),
sampling top_k 0 / top_p 1.
GRPO (``lit_rlhf_grpo``): each batch's first 4 prompts sampled 4 times (the 16 lengths of PPO's step), mini-batch
4, fast_rollout, the recipe's GRPO settings (configs/detox_flan_t5_grpo.yaml), no value head.

Workloads (prompts and response lengths are made once by the parent process and saved to a file that every
system reads, so all systems get the same prompts, in the same order, with the same lengths):

* A: prompts of exactly 200 tokens, exactly 32 new tokens per response.
* B: the recipe's DialogSum prompts (200 < chars <= 1000, its template), tokenized by a 32128-entry tokenizer
  trained on the bundled train split; response lengths drawn per sample from [100, 400) with one seed.
* Warm-up steps (``--warmup``, not measured) use the same kind of prompts with 32 new tokens per response.

In both, end-of-sequence is blocked until each row's own length (min = max new tokens), so every system
generates exactly the same number of tokens.

Each system runs in its own process (TRL in its own virtual environment, ``benchmarks/.venv-trl``, built on
demand; ``--in-process``, for smoke tests, runs all but TRL in the parent process instead). The first ``--warmup`` steps are not measured; the report gives medians over ``--steps`` steps.
See benchmarks/README.md for what each system does and how lengths are forced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its parts: benchmarks/ppo_step/
from ppo_step.floor import worker_floor  # noqa: E402
from ppo_step.limits import decode_rows_summary, decode_step_cost, flop_limit  # noqa: E402
from ppo_step.lit_system import worker_lit_rlhf  # noqa: E402
from ppo_step.machine import (gemm_rate, library_versions, log, log_rates, machine_description,  # noqa: E402
                              machine_rates)
from ppo_step.records import summarize  # noqa: E402
from ppo_step.report import NOTES_MARKER, render_report, upgrade_sections, write_report  # noqa: E402
from ppo_step.settings import (BANDWIDTH_MIB, BANDWIDTH_MIB_TINY, BANDWIDTH_REPEATS, DEFAULT_CACHE,  # noqa: E402
                               DTYPES, FLAN_T5_BASE, GEMM_REPEATS, GEMM_REPEATS_TINY, GRPO_SAMPLES_PER_PROMPT, HERE,
                               LIT_SYSTEMS, PPO, SYSTEM_LABELS, SYSTEMS, TINY_T5, ModelSize)
from ppo_step.tables import fp32_baseline, goals, section_key  # noqa: E402
from ppo_step.trl_system import trl_python, worker_trl  # noqa: E402
from ppo_step.workloads import build_classifier_dir, build_model_dir, build_workload, load_work  # noqa: E402

REPO = HERE.parent
# what tests/test_benchmarks.py reads from this script besides main
__all__ = ["ModelSize", "NOTES_MARKER", "decode_rows_summary", "decode_step_cost", "fp32_baseline", "goals", "main",
           "upgrade_sections"]


def run_worker(args: argparse.Namespace) -> None:
    """Entry point of one system's process: runs the steps and writes JSON to ``args.out``."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = load_work(args.workload_file)
    out: dict[str, Any] = {"system": args.system, "workload": work["name"], "threads": torch.get_num_threads(),
                           "dtype": args.dtype}
    start = time.perf_counter()
    if args.system in LIT_SYSTEMS:
        worker_lit_rlhf(args, work, out)
        out["steps"] = out["steps"][args.warmup :]
    elif args.system == "trl_batched":
        worker_trl(args, work, out, batched=True)
    elif args.system == "trl_loop":
        worker_trl(args, work, out, batched=False)
    elif args.system == "floor":
        worker_floor(args, work, out)
    else:
        raise ValueError(f"unknown system {args.system!r}")
    out["wall_s"] = time.perf_counter() - start
    # how busy the machine was around this system's steps, in the run's dtype
    out["gemm_gflops"] = gemm_rate(args.threads, repeats=args.gemm_repeats, dtype=args.dtype) / 1e9
    out["versions"] = library_versions()
    Path(args.out).write_text(json.dumps(out, indent=1))


def run_system(system: str, work: dict[str, Any], args: argparse.Namespace, python: Path, logs: Path,
               profile: str | None) -> dict[str, Any] | None:
    out_path = logs / f"{system}_{work['name']}_{args.dtype}.json"
    log_path = logs / f"{system}_{work['name']}_{args.dtype}.log"
    out_path.unlink(missing_ok=True)
    cmd = [str(python), str(Path(__file__).resolve()), "worker", "--system", system,
           "--workload-file", work["path"], "--model-dir", str(args.model_dir), "--out", str(out_path),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--reward", args.reward,
           "--reward-cost-s", str(args.reward_cost_s), "--classifier-dir", str(args.classifier_dir or ""),
           "--trl-ref", args.trl_ref, "--dtype", args.dtype, "--gemm-repeats", str(args.gemm_repeats)]
    if profile:
        cmd += ["--profile-out", profile]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) if system in LIT_SYSTEMS else os.environ.get("PYTHONPATH", ""))
    log(f"--- {SYSTEM_LABELS[system]} on workload {work['name']}, {args.dtype} (log: {log_path})")
    start = time.perf_counter()
    if args.in_process and not system.startswith("trl"):
        returncode = run_in_process(cmd[2:], env, log_path)
    else:
        with open(log_path, "w") as f:
            returncode = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)).returncode
    if returncode != 0 or not out_path.exists():
        tail = log_path.read_text().splitlines()[-25:]
        log(f"{system} failed (exit {returncode}) after {time.perf_counter() - start:.0f} s:\n  " + "\n  ".join(tail))
        return None
    result = json.loads(out_path.read_text())
    result["process_s"] = time.perf_counter() - start
    log(f"    done in {result['process_s']:.0f} s")
    return result


def run_in_process(worker_argv: list[str], env: dict[str, str], log_path: Path) -> int:
    """``--in-process``: one system's worker run in this process (its output to its log), not in a new one; the
    exit status a worker process would have had."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                run_worker(parse_args(worker_argv))
            except Exception:
                traceback.print_exc()
                return 1
        return 0
    finally:
        os.environ.clear()
        os.environ.update(saved)


def prepare(args: argparse.Namespace) -> tuple[ModelSize, list[str], Path | None]:
    """Builds (or finds) the model, the classifier and the TRL environment; the systems that can run."""
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    (args.cache_dir / "logs").mkdir(exist_ok=True)
    size = TINY_T5 if args.tiny else FLAN_T5_BASE
    args.model_dir = build_model_dir(args.cache_dir, args.tiny)
    log(f"model: {size.name} from config, random weights, at {args.model_dir}; frozen weights {args.dtype}")
    if args.reward == "classifier":
        args.classifier_dir = build_classifier_dir(args.cache_dir, args.model_dir, args.tiny)
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    python_trl = None
    if any(s.startswith("trl") for s in systems):
        python_trl = trl_python(build=not args.tiny)
        if python_trl is None:
            log("TRL systems skipped: " + ("benchmarks/.venv-trl does not exist (--tiny does not build it)"
                                             if args.tiny else "the TRL environment could not be built"))
            systems = [s for s in systems if not s.startswith("trl")]
    return size, systems, python_trl


def run_workload(name: str, size: ModelSize, systems: list[str], python_trl: Path | None,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Every system on workload ``name``, between two measurements of the machine's rates: one report section."""
    started, load_start = time.time(), os.getloadavg()
    before = machine_rates(args.threads, args.dtype, size, args.tiny)
    log_rates("before", before)
    steps = args.steps if name == "A" or args.steps_b is None else args.steps_b
    profile_batch = args.profile and name == "A"
    n_batches = args.warmup + steps + (1 if profile_batch else 0)
    work = build_workload(name, args.model_dir, args.cache_dir, n_batches, args.tiny, args.warmup,
                          profile_batch=profile_batch)
    log(f"workload {name}: {n_batches} batches of {PPO.rollout_batch}; prompt tokens (all candidate prompts) "
        f"{work['prompt_tokens_all']}; prompt tokens (used) {work['prompt_tokens_used']}; new tokens "
        f"{work['new_tokens_used']}")
    raw = {}
    for system in systems:
        python = python_trl if system.startswith("trl") else Path(sys.executable)
        profile = (str(args.cache_dir / f"profile_{system}_{name}_{args.dtype}.txt")
                   if profile_batch and system in (*LIT_SYSTEMS, "floor") else None)
        result = run_system(system, work, args, python, args.cache_dir / "logs", profile)
        if result is not None:
            raw[system] = result
            if profile:
                result["profile_table"] = Path(profile).read_text() if Path(profile).exists() else None
    after = machine_rates(args.threads, args.dtype, size, args.tiny)
    log_rates("after", after)
    key = "gemm_gflops" if args.dtype == "float32" else "gemm_gflops_bf16"
    rate = 1e9 * max(before[key], after[key])
    rows = {system: summarize(r) for system, r in raw.items()}
    rows["flop_limit"] = flop_limit(work, size, rate, args.warmup)
    if "lit_rlhf_grpo" in systems:
        rows["flop_limit_grpo"] = flop_limit(work, size, rate, args.warmup, GRPO_SAMPLES_PER_PROMPT)
    run = {"workload": name, "dtype": args.dtype, "machine": machine_description(),
           "command": "python " + " ".join([os.path.relpath(__file__, REPO), *args.argv]),
           "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
           "minutes": (time.time() - started) / 60, "load_start": load_start, "load_end": os.getloadavg(),
           "gemm_gflops": [before["gemm_gflops"], after["gemm_gflops"]], "rates": [before, after],
           "gemm_repeats": args.gemm_repeats, "bandwidth_mib": BANDWIDTH_MIB_TINY if args.tiny else BANDWIDTH_MIB,
           "bandwidth_repeats": 3 if args.tiny else BANDWIDTH_REPEATS,
           "threads": args.threads, "reward": args.reward, "reward_cost_s": args.reward_cost_s,
           "trl_ref": args.trl_ref, "warmup": args.warmup, "systems_missing": [s for s in systems if s not in raw]}
    return {"rows": rows, "raw": raw, "work": {k: v for k, v in work.items() if k != "batches"}, "run": run}


def run_parent(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    size, systems, python_trl = prepare(args)
    sections = {}
    for name in (["A", "B"] if args.workload == "both" else [args.workload]):
        sections[section_key(name, args.dtype)] = run_workload(name, size, systems, python_trl, args)
    context = dict(sections)
    if args.results:
        json_path = Path(args.results).with_suffix(".json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        store = {"model": size.name, "sections": sections}
        if json_path.exists():  # keep the other workloads and dtypes of earlier runs on the same model
            old = json.loads(json_path.read_text())
            if old.get("model") == size.name:
                store["sections"] = {**upgrade_sections(old.get("sections", {})), **sections}
        store["sections"] = context = upgrade_sections(store["sections"])
        json_path.write_text(json.dumps(store, indent=1, default=str))
    print("\n" + render_report(size, sections, context))
    if args.results:
        write_report(Path(args.results), size, context)
    return 1 if any(sec["run"]["systems_missing"] for sec in sections.values()) else 0


def rerender(args: argparse.Namespace) -> int:
    """--render: rewrite the report from its JSON (after editing the notes or the renderer), running nothing."""
    store = json.loads(Path(args.results).with_suffix(".json").read_text())
    size = {s.name: s for s in (FLAN_T5_BASE, TINY_T5)}[store["model"]]
    write_report(Path(args.results), size, upgrade_sections(store["sections"]))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = argv[:1] == ["worker"]
    if sub:
        argv = argv[1:]
        parser.add_argument("--system", required=True, choices=SYSTEMS)
        parser.add_argument("--workload-file", required=True)
        parser.add_argument("--model-dir", required=True)
        parser.add_argument("--out", required=True)
        parser.add_argument("--profile-out", default=None, help="write a torch.profiler table of one extra step here")
        parser.add_argument("--gemm-repeats", type=int, default=GEMM_REPEATS)
    parser.add_argument("--workload", choices=("A", "B", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per system (default 3; --tiny: 2)")
    parser.add_argument("--steps-b", type=int, default=None, help="measured steps for workload B (default: --steps)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up steps per system")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: the embedded tiny T5 sizes, 2 steps, seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every process (default: all cores; --tiny: 1)")
    parser.add_argument("--reward", choices=("stub", "classifier"), default="stub")
    parser.add_argument("--reward-cost-s", type=float, default=0.0, help="fixed seconds the stub reward sleeps")
    parser.add_argument("--classifier-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the frozen weights' dtype (bfloat16: LoRA, value head and optimizer stay float32)")
    parser.add_argument("--trl-ref", choices=("copy", "adapter"), default="copy",
                        help="TRL reference: the recipe's full copy (default) or None (adapter disabled)")
    if not sub:
        parser.add_argument("--profile", action="store_true",
                            help="profile one extra lit_rlhf and floor step on workload A (torch.profiler top ops)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="built model, tokenizer, workloads, logs")
    parser.add_argument("--results", default=None, help="write the report here (default benchmarks/RESULTS.md; --tiny: none)")
    if not sub:
        parser.add_argument("--render", action="store_true", help="only rewrite the report from its JSON")
        parser.add_argument("--in-process", action="store_true",
                            help="run the lit_rlhf systems and the floor in this process, one after another, not "
                                 "each in its own (smoke tests: one start-up; peak memory then includes the earlier "
                                 "systems')")
    args = parser.parse_args(argv)
    args.mode = "worker" if sub else "parent"
    args.argv = argv
    if not sub:
        if args.steps is None:
            args.steps = 2 if args.tiny else 3
        if args.threads is None:
            # tiny models: one thread avoids oversubscription on a shared 2-core machine (as tests/conftest.py)
            args.threads = 1 if args.tiny else os.cpu_count()
        if args.results is None and not args.tiny:
            args.results = str(HERE / "RESULTS.md")
        args.gemm_repeats = GEMM_REPEATS_TINY if args.tiny else GEMM_REPEATS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "worker":
        run_worker(args)
        return 0
    if args.render:
        return rerender(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
