"""The arithmetic RLVR recipe over seeds: held-out accuracy before and after GRPO, per seed and summarised.

    python benchmarks/rlvr_seeds.py                          # seeds 0..4 into benchmarks/.cache/rlvr/seed_N
    python benchmarks/rlvr_seeds.py --no-run                 # only summarise the runs that are there
    python benchmarks/rlvr_seeds.py --seeds 0 --extra --model.ppo_steps 10   # flags after --extra go to lit-rlhf fit

Each seed runs `lit-rlhf fit --config rlvr_arithmetic.yaml --seed_everything N --model.seed N` in its own folder,
one after the other (benchmarks/seeds.py's run_seed). The measurement keeps the callback's own seed, so "before" is
the same in every run. Accuracy is the report's mean reward (greedy answers, exact-answer reward, 500 held-out
problems); the change's CI is the report's paired BCa bootstrap CI over problems. The table is printed and written
to --results (Markdown) beside a JSON of the per-seed values.

The 500 test problems also chose where the shipped model stopped and the recipe's settings, so a second table
scores the model before and each seed's exported model after on 500 fresh problems that nothing saw: drawn by the
same generator with another seed, none of them in the bundled pool (train or test), greedy answers through
`lit-rlhf predict` with the recipe's config. The pool holds nearly every problem of small operands, so the fresh
ones have larger operands on average: they are harder.
"""

from __future__ import annotations

import json
import platform

import subprocess
import sys
from pathlib import Path

from seeds import cpu_model, find_report, mean_sd, seed_arguments, seed_reports

CONFIG = "rlvr_arithmetic.yaml"
FRESH, FRESH_SEED = 500, 12345
"""How many fresh problems, and the generator's seed that draws them."""


def write_fresh_problems(path: Path) -> Path:
    """FRESH problems of the bundled generator (seed FRESH_SEED), none of them in the bundled pool, as JSONL."""
    from lit_rlhf.data.arithmetic import arithmetic_splits, generate_problems

    pool = {row["prompt"] for rows in arithmetic_splits().values() for row in rows}
    rows = generate_problems(FRESH, FRESH_SEED, exclude=pool)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"fresh_{i}", **row}) + "\n" for i, row in enumerate(rows)))
    return path


def fresh_scores(model: str, problems: Path, folder: Path) -> list[float]:
    """The exact-answer scores of ``model``'s greedy answers to ``problems`` (``lit-rlhf predict``, log in folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lit_rlhf.cli", "predict", "--config", CONFIG, "--model.model_name", model,
               "--data.predict_path", str(problems), "--trainer.callbacks=[]", "--trainer.default_root_dir", "."]
    with open(folder / "predict.log", "w") as log:
        subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=True)
    return [json.loads(line)["score"] for line in (folder / "predictions.jsonl").read_text().splitlines()]


def fresh_rows(workdir: Path, seeds: list[int]) -> dict[int, dict[str, float]]:
    """Per seed: accuracy (%) on the fresh problems of the model the runs start from and of the seed's export."""
    import yaml

    problems = write_fresh_problems(workdir / "fresh" / "problems.jsonl")
    runs = {seed: find_report(workdir / f"seed_{seed}").parent for seed in seeds}
    start = yaml.safe_load((runs[seeds[0]] / "config.yaml").read_text())["model"]["model_name"]
    before = fresh_scores(start, problems, workdir / "fresh" / "before")
    rows = {}
    for seed, run in runs.items():
        after = fresh_scores(str(run / "model"), problems, workdir / "fresh" / f"seed_{seed}")
        rows[seed] = {"before": 100 * sum(before) / len(before), "after": 100 * sum(after) / len(after),
                      "change": 100 * sum(a - b for a, b in zip(after, before)) / len(after)}
    return rows


def render_fresh(rows: dict[int, dict[str, float]]) -> str:
    """The fresh problems' table: accuracy before and after per seed, then the mean and sd over seeds."""
    lines = ["| seed | accuracy before % | accuracy after % | change (points) |", "|---|---|---|---|"]
    lines += [f"| {seed} | {r['before']:.1f} | {r['after']:.1f} | {r['change']:+.1f} |" for seed, r in sorted(rows.items())]
    stats = {key: mean_sd([r[key] for r in rows.values()]) for key in ("before", "after", "change")}
    lines.append(f"| mean ± sd | {stats['before'][0]:.1f} ± {stats['before'][1]:.1f} | {stats['after'][0]:.1f} ± "
                 f"{stats['after'][1]:.1f} | {stats['change'][0]:+.1f} ± {stats['change'][1]:.1f} |")
    return "\n".join([
        f"## {FRESH} fresh problems", "",
        f"Greedy answers (`lit-rlhf predict`) to {FRESH} problems of the same generator (seed {FRESH_SEED}), none of "
        "them in the bundled pool: no choice of the model or the recipe saw them. Harder than the test split (the "
        "pool holds nearly all problems of small operands).", "", *lines, ""])


def seed_row(report: dict) -> dict[str, float]:
    """One seed's figures from its ``report.json``: accuracies in percent, the change's CI, pass@k, length."""
    before, after, reward = report["before"], report["after"], report["reward"]
    row = {"before": 100 * before["reward_mean"], "after": 100 * after["reward_mean"],
           "change": 100 * reward["difference_mean"], "ci_low": 100 * reward["ci_low"],
           "ci_high": 100 * reward["ci_high"], "p": reward["p_value"],
           "length_before": before["response_length_mean"], "length_after": after["response_length_mean"]}
    if "pass_at_k" in before:
        row |= {"pass_before": 100 * before["pass_at_k"], "pass_after": 100 * after["pass_at_k"]}
    return row


def render(rows: dict[int, dict[str, float]], command: str, k: int | None) -> str:
    """The Markdown table: one row per seed, then the mean and sample sd over seeds."""
    has_pass = all("pass_before" in r for r in rows.values())
    head = "| seed | accuracy before % | accuracy after % | change (points) [95% CI] | p |"
    head += f" pass@{k} before % | pass@{k} after % |" if has_pass else ""
    head += " length before | length after |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for seed, r in sorted(rows.items()):
        cells = [str(seed), f"{r['before']:.1f}", f"{r['after']:.1f}",
                 f"{r['change']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]", f"{r['p']:.2g}"]
        cells += [f"{r['pass_before']:.1f}", f"{r['pass_after']:.1f}"] if has_pass else []
        lines.append("| " + " | ".join(cells + [f"{r['length_before']:.2f}", f"{r['length_after']:.2f}"]) + " |")
    keys = ["before", "after", "change"] + (["pass_before", "pass_after"] if has_pass else [])
    keys += ["length_before", "length_after"]
    stats = {key: mean_sd([r[key] for r in rows.values()]) for key in keys}
    cells = [f"{stats[key][0]:.1f} ± {stats[key][1]:.1f}" for key in keys[:3]] + [""]
    cells[2] = f"{stats['change'][0]:+.1f} ± {stats['change'][1]:.1f}"
    cells += [f"{stats[key][0]:.1f} ± {stats[key][1]:.1f}" for key in keys[3:-2]]
    cells += [f"{stats[key][0]:.2f} ± {stats[key][1]:.2f}" for key in keys[-2:]]
    lines.append("| mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join([
        "# Arithmetic with a verifiable reward: GRPO over seeds", "",
        f"Command: `{command}`, one seed at a time, one thread. CPU: {cpu_model()}; Python "
        f"{platform.python_version()}.", "",
        "Accuracy: exact answers of greedy decoding on the 500 held-out test problems of bundled:arithmetic (the "
        "report's mean reward); change: after - before per problem, mean with its paired 95% BCa bootstrap CI over "
        "problems and the Wilcoxon signed-rank p; sd: sample standard deviation over seeds. Length in tokens, "
        "end-of-sequence included.", "",
        *lines, "",
    ])


def main(argv: list[str] | None = None) -> None:
    args = seed_arguments(__doc__.split("\n\n")[0], "benchmarks/.cache/rlvr", "benchmarks/RESULTS_RLVR.md", argv)
    extra = ["--config", CONFIG, *args.extra]
    reports = seed_reports(args, extra)
    rows = {seed: seed_row(report) for seed, report in reports.items()}
    k = list(reports.values())[-1]["settings"].get("pass_at_k") if reports else None
    command = " ".join(["OMP_NUM_THREADS=1 lit-rlhf fit", *extra, "--seed_everything N --model.seed N"])
    fresh = fresh_rows(args.workdir.absolute(), args.seeds)
    text = render(rows, command, k) + "\n" + render_fresh(fresh)
    print(text)
    args.results.write_text(text)
    args.results.with_suffix(".json").write_text(
        json.dumps({"cpu": cpu_model(), "per_seed": rows, "fresh_per_seed": fresh}, indent=2) + "\n")


if __name__ == "__main__":
    main()
