"""Benchmark: the embedded default PPO step (``lit-rlhf fit``) when other processes share the cores, with
torch's default intra-op threads (``model.num_threads=null``, the old behaviour) and with
``model.num_threads=auto`` (the default: one thread for a small model).

    python benchmarks/bench_neighbour.py                      # 3 scenarios x 2 thread settings, ~5 min on 2 cores
    python benchmarks/bench_neighbour.py --steps 4 --max-seconds 20 --results /tmp/r.md   # quick check
    python benchmarks/bench_neighbour.py --crossover --priority   # 1 thread vs all cores on T5s of several sizes

Scenarios, each for both thread settings:

* alone: one ``lit-rlhf fit`` (whatever else the machine runs: the report records the load average);
* beside a PyTorch neighbour: a second process running a loop of 2-thread (``--neighbour-threads``) 512 x 512
  matrix products the whole time;
* beside a twin: two identical ``lit-rlhf fit`` started together (the report gives the mean of their medians).

Each fit is the packaged embedded default (tiny T5, bundled DialogSum, the composite offline reward), run
through ``lit_rlhf.cli.LitRLHFCLI`` in its own process with a callback that times every training step
(``on_train_batch_start`` -> ``on_train_batch_end``). No toxicity callback and no checkpoints, to keep runs
short; OMP_NUM_THREADS is removed from the fits' environment (it would override both settings). A case
measures ``--steps`` PPO steps, or stops after ``--max-seconds`` of stepping once ``--min-steps`` are done;
its number is the median of steps 2..N (the first step warms up).

``--crossover`` times the same PPO step on T5s of several sizes (``lit_rlhf.models.tiny.build_tiny_t5``) with one
thread and with all cores: where all cores start to pay off is ``lit_rlhf.runtime.threads.AUTO_SINGLE_THREAD_BELOW``.
``--priority`` runs each measured fit in its own session with its scheduler autogroup at nice -20 (Linux,
root), so that other jobs on the machine barely run while it measures: a quiet machine, emulated.

Results: ``benchmarks/RESULTS_NEIGHBOUR.md`` (``--results``), with the machine, the load and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ppo_step.machine import cpu_flags, library_versions, log  # noqa: E402  (stdlib-only imports at its top)

DEFAULT_RESULTS = HERE / "RESULTS_NEIGHBOUR.md"
DEFAULT_CACHE = HERE / ".cache" / "threads"
SETTINGS = {"old": "null", "auto": "auto"}  # label -> --model.num_threads
SETTING_LABELS = {"old": "torch default threads (num_threads=null)", "auto": "num_threads=auto (new default)"}
SCENARIOS = ("alone", "neighbour", "twin")
SCENARIO_LABELS = {"alone": "alone", "neighbour": "beside a 2-thread PyTorch neighbour",
                   "twin": "beside a second identical fit"}
GOAL_RATIO = 3.0  # beside the PyTorch neighbour, at most this many times the time alone

# T5 shapes for --crossover: name -> build_tiny_t5 arguments (None: the embedded default model)
CROSSOVER_SIZES: dict[str, dict[str, Any] | None] = {
    "tiny-t5 (embedded default)": None,
    "d128": {"vocab_size": 2000, "d_model": 128, "d_ff": 512, "num_layers": 2, "num_heads": 4, "d_kv": 32},
    "summarizer shape": {"vocab_size": 4000, "d_model": 256, "d_ff": 768, "num_layers": 2, "num_heads": 4,
                         "d_kv": 64, "tie_embeddings": True},
    "d384 x4": {"vocab_size": 8000, "d_model": 384, "d_ff": 1024, "num_layers": 4, "num_heads": 6, "d_kv": 64},
    "d512 x6": {"vocab_size": 16000, "d_model": 512, "d_ff": 1536, "num_layers": 6, "num_heads": 8, "d_kv": 64},
}

NEIGHBOUR_CODE = """
import sys, torch
if sys.argv[3] == "priority":  # the measured fits' priority (see raise_priority)
    open("/proc/self/autogroup", "w").write("-20")
torch.set_num_threads(int(sys.argv[1]))
n = int(sys.argv[2])
a, b = torch.randn(n, n), torch.randn(n, n)
while True:
    a @ b
"""


# ---------------------------------------------------------------------------------------------- worker (one fit)


def raise_priority() -> None:
    """Put this process in its own scheduler autogroup at nice -20 (Linux with autogroup; needs root): other
    sessions' processes then get about 1% of a core each while it runs. Call right after ``setsid``."""
    with open("/proc/self/autogroup", "w") as f:
        f.write("-20")
    os.nice(-20)


def run_worker(args: argparse.Namespace) -> None:
    """One ``lit-rlhf fit`` of the embedded default, timing each PPO step into ``args.out`` (JSON)."""
    if args.priority:
        raise_priority()
    import lightning as L
    import torch

    from lit_rlhf.cli import LitRLHFCLI, with_default_config
    from lit_rlhf.cli.base import COMMON_CLI_SETTINGS
    from lit_rlhf.cli.ppo import parser_kwargs
    from lit_rlhf.data import DialogSumDataModule
    from lit_rlhf.modules import PPOModule

    steps: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()
            if not steps:
                self.first = self.start

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(time.perf_counter() - self.start)
            log(f"[{args.tag}] step {len(steps)}: {steps[-1]:.2f} s")
            if len(steps) >= args.min_steps and time.perf_counter() - self.first > args.max_seconds:
                trainer.should_stop = True

    fit_args = ["fit", "--trainer.default_root_dir", args.root, "--trainer.callbacks=[]",
                "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                "--model.ppo_steps", str(args.steps), "--model.num_threads", args.num_threads,
                *(["--model.model_name", args.model] if args.model else [])]
    settings = {**COMMON_CLI_SETTINGS}
    settings["trainer_defaults"] = {**settings["trainer_defaults"], "callbacks": [StepClock()]}
    run = LitRLHFCLI(PPOModule, DialogSumDataModule, args=with_default_config(fit_args),
                     parser_kwargs=parser_kwargs(), **settings)
    parameters = run.model.policy.parameter_counts()["all model parameters"]
    Path(args.out).write_text(json.dumps({"steps": steps, "threads": torch.get_num_threads(),
                                          "parameters": parameters}))


# ---------------------------------------------------------------------------------------------- parent


def worker_command(args: argparse.Namespace, tag: str, num_threads: str, out: Path, root: Path,
                   model: str | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--tag", tag, "--num-threads", num_threads,
           "--out", str(out), "--root", str(root), "--steps", str(args.steps), "--min-steps", str(args.min_steps),
           "--max-seconds", str(args.max_seconds)]
    return cmd + (["--model", model] if model else []) + (["--priority"] if args.priority else [])


def fit_environment(extra: list[str] | None = None) -> dict[str, str]:
    """The fits' environment: no OMP_NUM_THREADS (it would decide for both settings), offline, plus ``extra``
    (``--fit-env KEY=VALUE``, e.g. OMP_WAIT_POLICY=PASSIVE)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return {**env, **dict(item.split("=", 1) for item in extra or [])}


def start_neighbour(args: argparse.Namespace) -> subprocess.Popen:
    """The PyTorch neighbour: a loop of matrix products on ``--neighbour-threads`` threads, at the fits' priority.
    Returns once it is multiplying."""
    priority = "priority" if args.priority else "normal"
    process = subprocess.Popen([sys.executable, "-c", NEIGHBOUR_CODE, str(args.neighbour_threads),
                                str(args.neighbour_size), priority], env=fit_environment(), start_new_session=True)
    time.sleep(3.0)  # imported torch and multiplying
    return process


def stop(process: subprocess.Popen) -> None:
    """End a process this script started (by its own id)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def median_step(steps: list[float]) -> float:
    """Median seconds per PPO step over steps 2..N (the first warms up)."""
    if len(steps) < 2:
        raise RuntimeError(f"need at least 2 steps to drop the warm-up step, got {len(steps)}")
    return statistics.median(steps[1:])


def run_fits(args: argparse.Namespace, tags: list[str], num_threads: str, work: Path,
             model: str | None = None) -> list[dict[str, Any]]:
    """Start one fit per tag at the same time; wait for all; return their results (steps, threads, median)."""
    procs = []
    for tag in tags:
        out, root = work / f"{tag}.json", work / tag
        log_file = open(work / f"{tag}.log", "w")
        cmd = worker_command(args, tag, num_threads, out, root, model)
        procs.append((tag, out, log_file, subprocess.Popen(cmd, env=fit_environment(args.fit_env), stdout=log_file,
                                                           stderr=subprocess.STDOUT, start_new_session=True)))
    results = []
    for tag, out, log_file, proc in procs:
        code = proc.wait()
        log_file.close()
        if code != 0 or not out.exists():
            tail = (work / f"{tag}.log").read_text()[-3000:]
            raise RuntimeError(f"fit {tag} failed (exit {code}):\n{tail}")
        result = json.loads(out.read_text())
        result["median"] = median_step(result["steps"])
        results.append(result)
    return results


def run_case(args: argparse.Namespace, setting: str, scenario: str, work: Path) -> dict[str, Any]:
    tag = f"{setting}-{scenario}"
    neighbour = start_neighbour(args) if scenario == "neighbour" else None
    try:
        tags = [f"{tag}-a", f"{tag}-b"] if scenario == "twin" else [tag]
        fits = run_fits(args, tags, SETTINGS[setting], work)
    finally:
        if neighbour is not None:
            stop(neighbour)
    case = {"setting": setting, "scenario": scenario, "fits": fits, "load_after": os.getloadavg(),
            "median": statistics.mean(f["median"] for f in fits), "threads": fits[0]["threads"]}
    medians = ", ".join(f"{f['median']:.2f}" for f in fits)
    log(f"{tag}: {case['median']:.2f} s per PPO step on {case['threads']} thread(s) "
        f"(fits: {medians}; load {case['load_after'][0]:.2f})")
    return case


def neighbour_table(cases: dict[tuple[str, str], dict[str, Any]]) -> str:
    head = ("| scenario | " + " | ".join(f"{SETTING_LABELS[s]}: s/step | x alone" for s in SETTINGS) + " |")
    rows = [head, "|---|" + "---:|---:|" * len(SETTINGS)]
    for scenario in SCENARIOS:
        cells = []
        for setting in SETTINGS:
            case, alone = cases.get((setting, scenario)), cases.get((setting, "alone"))
            if case is None:
                cells += ["", ""]
                continue
            ratio = case["median"] / alone["median"] if alone else float("nan")
            cells += [f"{case['median']:.2f} ({case['threads']} thr)", f"{ratio:.1f}x"]
        rows.append(f"| {SCENARIO_LABELS[scenario]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def goal_line(cases: dict[tuple[str, str], dict[str, Any]]) -> str:
    alone, beside = cases.get(("auto", "alone")), cases.get(("auto", "neighbour"))
    if not (alone and beside):
        return "Goal (auto beside the PyTorch neighbour <= 3x alone): not measured in this run."
    ratio = beside["median"] / alone["median"]
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    return (f"Goal: the embedded default beside a 2-thread PyTorch neighbour at most {GOAL_RATIO:.0f}x its time "
            f"alone: {ratio:.1f}x with num_threads=auto ({verdict}).")


def machine_lines(args: argparse.Namespace, load_before: tuple[float, float, float]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return [
        f"- Machine: {cpu_flags()}; {os.cpu_count()} CPUs; {platform.platform()}; Python {platform.python_version()}",
        f"- Libraries: {versions}",
        f"- Load average (1, 5, 15 min) before the run: {', '.join(f'{x:.2f}' for x in load_before)}"
        + (f"; each measured fit ran at autogroup nice -20 (`--priority`): a quiet machine, emulated"
           if args.priority else ""),
        f"- Command: `{shlex.join(['python', 'benchmarks/bench_neighbour.py', *sys.argv[1:]])}`",
        f"- Each number: median seconds per PPO step of steps 2..N (N <= {args.steps}; a case stops after "
        f"{args.max_seconds:.0f} s of stepping once {args.min_steps} steps are done). Neighbour: a loop of "
        f"{args.neighbour_threads}-thread {args.neighbour_size} x {args.neighbour_size} matmuls."
        + (f" Fits' environment: {' '.join(args.fit_env)}." if args.fit_env else ""),
    ]


def run_neighbour(args: argparse.Namespace) -> str:
    load_before = os.getloadavg()
    cases: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_neighbour_") as tmp:
        for scenario in args.scenarios:
            for setting in SETTINGS:
                cases[(setting, scenario)] = run_case(args, setting, scenario, Path(tmp))
    table = neighbour_table(cases)
    raw = "\n".join(f"- {SETTING_LABELS[s]}, {SCENARIO_LABELS[c]}: "
                    + "; ".join(" ".join(f"{x:.2f}" for x in f["steps"]) for f in case["fits"])
                    + f" (1-min load at its end {case['load_after'][0]:.2f})" for (s, c), case in cases.items())
    return "\n".join(["## Embedded default PPO step beside other processes", "", *machine_lines(args, load_before),
                      "", table, "", goal_line(cases), "", "Every step (seconds):", "", raw, ""])


def crossover_models(cache: Path, names: list[str]) -> dict[str, str]:
    """The crossover's model paths (built once into ``cache``), by name."""
    from lit_rlhf.models import build_tiny_t5

    return {name: "embedded:tiny-t5" if CROSSOVER_SIZES[name] is None
            else build_tiny_t5(str(cache / name.replace(" ", "_")), **CROSSOVER_SIZES[name]) for name in names}


def run_crossover(args: argparse.Namespace) -> str:
    """1 thread against all cores on each model size, for each of ``args.scenarios`` (alone, neighbour)."""
    load_before = os.getloadavg()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    scenarios = [s for s in args.scenarios if s != "twin"]
    models = crossover_models(Path(args.cache_dir), args.sizes)
    head = "".join(f" {SCENARIO_LABELS[s]}: 1 thread | {cpus} threads | {cpus} / 1 |" for s in scenarios)
    rows = [f"| model | parameters |{head}", "|---|---:|" + "---:|---:|---:|" * len(scenarios)]
    with tempfile.TemporaryDirectory(prefix="bench_crossover_") as tmp:
        for name, model in models.items():
            cells, parameters = [], 0
            for scenario in scenarios:
                medians = {}
                for threads in (1, cpus):
                    tag = f"{name.split()[0]}-{scenario}-{threads}t"
                    neighbour = start_neighbour(args) if scenario == "neighbour" else None
                    try:
                        fit = run_fits(args, [tag], str(threads), Path(tmp), model)[0]
                    finally:
                        if neighbour is not None:
                            stop(neighbour)
                    medians[threads], parameters = fit["median"], fit["parameters"]
                    log(f"crossover {name}, {scenario}: {parameters:,} parameters, {threads} thread(s): "
                        f"{fit['median']:.2f} s per PPO step")
                cells += [f"{medians[1]:.2f}", f"{medians[cpus]:.2f}", f"{medians[cpus] / medians[1]:.2f}"]
            rows.append(f"| {name} | {parameters:,} | " + " | ".join(cells) + " |")
    return "\n".join(["## Crossover: one thread against all cores, by model size", "",
                      *machine_lines(args, load_before), "", *rows, ""])


def write_results(path: Path, section: str, title: str) -> None:
    """Replace ``title``'s section of the results file (or add it), keeping the others and the notes."""
    text = path.read_text() if path.exists() else "# Threads on a shared machine\n\n"
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="parent", choices=["parent", "worker"], help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help="PPO steps per fit (median of steps 2..N)")
    p.add_argument("--min-steps", type=int, default=3, help="steps a fit always runs")
    p.add_argument("--max-seconds", type=float, default=40.0, help="a fit stops after this much stepping")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    p.add_argument("--neighbour-threads", type=int, default=2)
    p.add_argument("--neighbour-size", type=int, default=512)
    p.add_argument("--crossover", action="store_true", help="time 1 thread vs all cores on T5s of several sizes")
    p.add_argument("--sizes", default=None, help="--crossover: comma-separated subset of " + ",".join(CROSSOVER_SIZES))
    p.add_argument("--priority", action="store_true", help="measured fits at autogroup nice -20 (root, Linux)")
    p.add_argument("--fit-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the fits (not the neighbour), e.g. OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="--crossover's models")
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    # worker only
    for name in ("--tag", "--num-threads", "--out", "--root", "--model"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(args.scenarios) - set(SCENARIOS):
        p.error(f"--scenarios: unknown {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    args.sizes = args.sizes.split(",") if args.sizes else list(CROSSOVER_SIZES)
    if unknown := set(args.sizes) - set(CROSSOVER_SIZES):
        p.error(f"--sizes: unknown {sorted(unknown)}; choose from {','.join(CROSSOVER_SIZES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "worker":
        run_worker(args)
        return 0
    if args.crossover:
        section, title = run_crossover(args), "## Crossover"
    else:
        section, title = run_neighbour(args), "## Embedded default"
    print("\n" + section)
    write_results(Path(args.results), section, title)
    log(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
