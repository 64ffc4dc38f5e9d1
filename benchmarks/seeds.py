"""How the default run's report varies over seeds: run `lit-rlhf fit` once per seed and summarise the reports.

    python benchmarks/seeds.py --seeds 0 1 2 3 4                     # runs into benchmarks/.cache/seeds/seed_N
    python benchmarks/seeds.py --seeds 0 1 2 3 4 --no-run            # only summarise runs that are there
    python benchmarks/seeds.py --seeds 0 1 --extra --config configs/embedded_t5.yaml   # flags after --extra

Each seed runs in its own folder (`<workdir>/seed_N`, `lit-rlhf fit --seed_everything N --model.seed N` plus the
extra flags: the first seeds training's sampling and weights, the second the response-length draws; the
before/after measurement keeps the toxicity callback's own seed, so "before" is the same in every run),
one after the other, so the runs do not compete for the cores. The summary, one row per headline figure of the
report (toxicity before/after and its relative decrease, the reward gain, ROUGE-1 retained, the paired tests'
p-values) with the mean, the sample standard deviation, the minimum and the maximum over seeds, is printed and
written to `--results` (Markdown) beside a JSON of the per-seed values. Float rounding differs between CPU
kernels (a Xeon and an EPYC give different runs from the same seed), so the file records the CPU model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEADLINES: dict[str, tuple[str, str]] = {
    "toxicity_before": ("mean toxicity before", "{:.4f}"),
    "toxicity_after": ("mean toxicity after", "{:.4f}"),
    "toxicity_decrease_pct": ("toxicity decrease (%)", "{:+.1f}"),
    "toxicity_p": ("toxicity change: paired test p", "{:.3g}"),
    "reward_gain": ("reward gain (after - before)", "{:+.3f}"),
    "reward_p": ("reward change: paired test p", "{:.3g}"),
    "rouge1_retained_pct": ("ROUGE-1 retained (%)", "{:.1f}"),
    "length_after": ("response length after (tokens)", "{:.2f}"),
}
"""Summarised figures: key -> (row label, number format)."""


def headline_figures(report: dict) -> dict[str, float]:
    """The headline figures of one ``report.json`` (as written by ``lit_rlhf.callbacks.ToxicityCallback``)."""
    before, after = report["before"], report["after"]
    figures = {
        "toxicity_before": before["toxicity_mean"],
        "toxicity_after": after["toxicity_mean"],
        "toxicity_decrease_pct": 100.0 * (before["toxicity_mean"] - after["toxicity_mean"]) / before["toxicity_mean"],
        "toxicity_p": report["toxicity"]["p_value"],
        "reward_gain": after["reward_mean"] - before["reward_mean"],
        "reward_p": report["reward"]["p_value"],
        "length_after": after["response_length_mean"],
    }
    if before.get("rouge1"):
        figures["rouge1_retained_pct"] = 100.0 * after["rouge1"] / before["rouge1"]
    return figures


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation (0 for one seed), minimum and maximum of each figure over the seeds."""
    out = {}
    for key in HEADLINES:
        values = [figures[key] for figures in per_seed.values() if key in figures]
        if values:
            mean, std = mean_sd(values)
            out[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render(per_seed: dict[int, dict[str, float]], summary: dict[str, dict[str, float]], command: str) -> str:
    """The Markdown summary: one row per figure, the per-seed values beside mean, std, min and max."""
    seeds = sorted(per_seed)
    head = "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | min | max |"
    lines = [head, "|" + "---|" * (len(seeds) + 5)]
    for key, stats in summary.items():
        label, fmt = HEADLINES[key]
        cells = [fmt.format(per_seed[s][key]) if key in per_seed[s] else "" for s in seeds]
        cells += [fmt.format(stats[k]) for k in ("mean", "std", "min", "max")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join([
        "# The default run over seeds", "",
        f"Command: `{command}`, one seed at a time. CPU: {cpu_model()}; Python {platform.python_version()}.", "",
        *lines, "",
        "std: sample standard deviation over the seeds. Each run's own report (CIs, tests) is in its folder.", "",
    ])


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_seed(seed: int, folder: Path, extra: list[str]) -> Path:
    """Run ``lit-rlhf fit --seed_everything seed`` in ``folder``; return its report.json."""
    run_fit(seed, folder, extra)
    return find_report(folder)


def run_fit(seed: int, folder: Path, extra: list[str]) -> None:
    """Run ``lit-rlhf fit`` with ``extra`` flags and the seed's flags in ``folder`` (its log in run.log)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # the seed flags last: a --config among the extra flags would otherwise set its own seed over them
    command = [sys.executable, "-m", "lit_rlhf.cli", "fit", *extra, *seed_flags(seed)]
    with open(folder / "run.log", "w") as log:
        subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)


def seed_flags(seed: int) -> list[str]:
    """The flags that seed one run: Lightning's global seed and the module's own (length draws, measurements)."""
    return ["--seed_everything", str(seed), "--model.seed", str(seed)]


def find_report(folder: Path) -> Path:
    """The newest ``report.json`` under ``folder``."""
    reports = sorted(folder.glob("logs/lightning_logs/version_*/report.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        raise FileNotFoundError(f"no logs/lightning_logs/version_*/report.json under {folder}")
    return reports[-1]


def seed_arguments(description: str, workdir: str, results: str, argv: list[str] | None) -> argparse.Namespace:
    """The seed scripts' flags: --seeds, --workdir (one seed_N folder each), --results, --no-run, --extra."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--workdir", type=Path, default=Path(workdir))
    parser.add_argument("--results", type=Path, default=Path(results))
    parser.add_argument("--no-run", action="store_true", help="summarise the runs already in --workdir")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed on to lit-rlhf fit")
    return parser.parse_args(argv)


def seed_reports(args: argparse.Namespace, extra: list[str]) -> dict[int, dict]:
    """Each seed's ``report.json``, run with ``extra`` flags into --workdir/seed_N (or found there with --no-run)."""
    reports = {}
    for seed in args.seeds:
        folder = args.workdir.absolute() / f"seed_{seed}"
        path = find_report(folder) if args.no_run else run_seed(seed, folder, extra)
        reports[seed] = json.loads(path.read_text())
    return reports


def main(argv: list[str] | None = None) -> None:
    args = seed_arguments(__doc__.split("\n\n")[0], "benchmarks/.cache/seeds", "benchmarks/RESULTS_SEEDS.md", argv)
    per_seed = {seed: headline_figures(report) for seed, report in seed_reports(args, args.extra).items()}
    summary = summarise(per_seed)
    command = " ".join(["lit-rlhf fit", *args.extra, "--seed_everything N --model.seed N"])
    text = render(per_seed, summary, command)
    print(text)
    args.results.write_text(text)
    args.results.with_suffix(".json").write_text(json.dumps({"cpu": cpu_model(), "per_seed": per_seed,
                                                             "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
