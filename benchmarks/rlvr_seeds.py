"""The arithmetic RLVR recipe over seeds: held-out accuracy before and after GRPO, per seed and summarised.

    python benchmarks/rlvr_seeds.py                          # seeds 0..4 into benchmarks/.cache/rlvr/seed_N
    python benchmarks/rlvr_seeds.py --no-run                 # only summarise the runs that are there
    python benchmarks/rlvr_seeds.py --seeds 0 --extra --model.ppo_steps 10   # flags after --extra go to lit-rlhf fit

Each seed runs `lit-rlhf fit --config rlvr_arithmetic.yaml --seed_everything N --model.seed N` in its own folder,
one after the other (benchmarks/seeds.py's run_seed). The measurement keeps the callback's own seed, so "before" is
the same in every run. Accuracy is the report's mean reward (greedy answers, exact-answer reward, 500 held-out
problems); the change's CI is the report's paired BCa bootstrap CI over problems. The table is printed and written
to --results (Markdown) beside a JSON of the per-seed values.
"""

from __future__ import annotations

import json
import platform

from seeds import cpu_model, mean_sd, seed_arguments, seed_reports

CONFIG = "rlvr_arithmetic.yaml"


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
    text = render(rows, command, k)
    print(text)
    args.results.write_text(text)
    args.results.with_suffix(".json").write_text(json.dumps({"cpu": cpu_model(), "per_seed": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
