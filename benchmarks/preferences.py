"""Three ways to use the bundled DialogSum preference pairs, compared on the offline recipe's 200 held-out prompts.

    python benchmarks/preferences.py --seeds 0 1 2       # runs into benchmarks/.cache/preferences
    python benchmarks/preferences.py --seeds 0 1 2 --no-run   # only summarise the runs that are there

The pairs (``bundled:dialogsum-pairs``, lit_rlhf/assets/dialogsum_pairs/PROVENANCE.md) rank two sampled
summaries of the embedded summarizer by the offline recipe's reward (the profanity model's "not offensive" logit
+ 10 x ROUGE-1 against the reference). Runs, each in its own folder under ``--workdir``:

    rm          lit-rlhf-rm fit --config configs/preferences/rm_summarizer.yaml (once): the learnt reward, and its
                accuracy on the held-out pairs (lit-rlhf-rm test)
    ppo_rule_N  lit-rlhf fit (the offline recipe, PPO against the rule itself), seed N
    ppo_rm_N    the same over configs/preferences/ppo_learned_reward.yaml: PPO against the learnt reward, seed N
    dpo_N       lit-rlhf-dpo fit --config configs/preferences/dpo_summarizer.yaml, seed N
    eval_*      lit-rlhf test --config configs/detox_summarizer.yaml [--model.init_adapter <the run's adapter>]:
                every policy, and the summarizer itself ("before"), measured by one path on the same 200 prompts
                with the same sampling seeds: toxicity = P(offensive) of the profanity model, reward = the rule.

Then the learnt reward model scores every measured response (its own view of each policy), and the summary
compares each policy with "before" prompt by prompt (paired BCa bootstrap CIs and Wilcoxon tests, as the
toxicity report computes them), per seed and over seeds. Two runs at a time, one torch thread each; a stage
whose result is already in its folder is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import cpu_model, seed_flags  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPE = CONFIGS / "detox_summarizer.yaml"
NO_RUN = False
"""--no-run: a stage whose result is missing is an error instead of a run."""
LEARNT_TEXT = "response"
"""What the reward model reads (rm_summarizer.yaml's data.classifier_text, ppo_learned_reward.yaml's text)."""
COMMANDS = {"lit-rlhf": "main", "lit-rlhf-rm": "main_rm", "lit-rlhf-dpo": "main_dpo"}
METHODS = {"ppo_rule": "PPO, reward = the rule", "ppo_rm": "PPO, reward = the learnt RM", "dpo": "DPO on the pairs"}


def run(command: str, args: list[str], folder: Path) -> None:
    """One lit_rlhf command in ``folder`` (its log in ``run.log``), with one torch thread."""
    if NO_RUN:
        raise FileNotFoundError(f"--no-run: {folder} has no result of {command} {args[0]}")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    argv = [sys.executable, "-c", f"from lit_rlhf.cli import {COMMANDS[command]} as m; m()", *args,
            "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(folder / "run.log", "a") as log:
        log.write(f"$ {command} {' '.join(args)}\n")
        log.flush()
        subprocess.run(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=True, env=env)
    print(f"{folder.name}: {command} {args[0]} in {time.perf_counter() - start:.0f} s", flush=True)


def newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def reward_model_stage(workdir: Path) -> Path:
    """Train the reward model (unless done) and test it on the held-out pairs; the exported folder."""
    folder = workdir / "rm"
    config = str(CONFIGS / "preferences" / "rm_summarizer.yaml")
    if newest(folder, "logs/lightning_logs/version_*/reward_model/config.json") is None:
        run("lit-rlhf-rm", ["fit", "--config", config], folder)
    exported = newest(folder, "logs/lightning_logs/version_*/reward_model/config.json").parent
    metrics = folder / "test_metrics.json"
    if not metrics.is_file():
        ckpt = newest(exported.parent, "checkpoints/last.ckpt")
        run("lit-rlhf-rm", ["test", "--config", config, "--ckpt_path", str(ckpt), "--trainer.logger",
                            "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "test_metrics"], folder)
        table = newest(folder, "test_metrics/lightning_logs/version_*/metrics.csv").read_text().splitlines()
        values = {k: float(v) for k, v in zip(table[0].split(","), table[-1].split(",")) if k.startswith("test/")}
        metrics.write_text(json.dumps(values, indent=2) + "\n")
    return exported


def fit_stage(method: str, seed: int, workdir: Path, reward_model: Path | None) -> Path:
    """One policy run (unless done); its exported adapter."""
    folder = workdir / f"{method}_{seed}"
    adapter = newest(folder, "logs/lightning_logs/version_*/adapter/adapter_config.json")
    if adapter is None:
        if method == "dpo":
            run("lit-rlhf-dpo", ["fit", "--config", str(CONFIGS / "preferences" / "dpo_summarizer.yaml"),
                                 "--seed_everything", str(seed)], folder)
        else:
            extra = [] if method == "ppo_rule" else [
                "--config", str(CONFIGS / "preferences" / "ppo_learned_reward.yaml"),
                "--model.reward.model_name", str(reward_model)]
            run("lit-rlhf", ["fit", "--config", str(RECIPE), *extra, *seed_flags(seed)], folder)
        adapter = newest(folder, "logs/lightning_logs/version_*/adapter/adapter_config.json")
    return adapter.parent


def eval_stage(name: str, adapter: Path | None, workdir: Path) -> dict:
    """``lit-rlhf test`` of the summarizer with ``adapter`` (None: the summarizer itself) on the recipe's prompts,
    with the recipe's reward and judge; its test_report.json."""
    folder = workdir / f"eval_{name}"
    report = newest(folder, "logs/lightning_logs/version_*/test_report.json")
    if report is None:
        extra = [] if adapter is None else ["--model.init_adapter", str(adapter)]
        # the report's 200 prompts are the toxicity callback's; the test loop's own pass over all 2,005 held-out
        # prompts (test/reward_mean, test/kl) is cut to one batch
        run("lit-rlhf", ["test", "--config", str(RECIPE), *extra, "--trainer.limit_test_batches", "1"], folder)
        report = newest(folder, "logs/lightning_logs/version_*/test_report.json")
    return json.loads(report.read_text())


def learnt_reward(reward_model: Path):
    """The learnt reward model as PPO loads it (``ClassifierReward``, reading ``LEARNT_TEXT``)."""
    from lit_rlhf.rewards import ClassifierReward

    reward = ClassifierReward(model_name=str(reward_model), label="reward", text=LEARNT_TEXT)
    reward.setup()
    return reward


def learnt_scores(reward, report: dict) -> list[float]:
    """The learnt reward model's score of each measured response, read as PPO reads it."""
    per_prompt = report["per_prompt"]
    return reward.compute(per_prompt["query"], per_prompt["response"], None).tolist()


def compare(before: dict, after: dict, before_rm: list[float], after_rm: list[float]) -> dict[str, float]:
    """One policy against the summarizer, prompt by prompt, as the toxicity report compares before and after."""
    from lit_rlhf.callbacks.report import paired_comparison

    b, a = before["per_prompt"], after["per_prompt"]
    if b["id"] != a["id"]:
        raise ValueError("the two measurements are not on the same prompts")
    kw = dict(bootstrap_resamples=10000, confidence=0.95, seed=0, test_method="wilcoxon")
    toxicity = paired_comparison(b["toxicity"], a["toxicity"], lower_is_better=True, **kw)
    reward = paired_comparison(b["reward"], a["reward"], lower_is_better=False, **kw)
    learnt = paired_comparison(before_rm, after_rm, lower_is_better=False, **kw)
    mean = statistics.fmean
    return {
        "toxicity": mean(a["toxicity"]),
        "toxicity_decrease_pct": 100 * (mean(b["toxicity"]) - mean(a["toxicity"])) / mean(b["toxicity"]),
        "toxicity_drop": toxicity["difference_mean"], "toxicity_drop_ci": [toxicity["ci_low"], toxicity["ci_high"]],
        "toxicity_p": toxicity["p_value"],
        "rouge1": mean(a["rouge1"]), "rouge1_retained_pct": 100 * mean(a["rouge1"]) / mean(b["rouge1"]),
        "reward": mean(a["reward"]), "reward_gain": reward["difference_mean"],
        "reward_gain_ci": [reward["ci_low"], reward["ci_high"]], "reward_p": reward["p_value"],
        "learnt_reward": mean(after_rm), "learnt_gain": learnt["difference_mean"],
        "learnt_gain_ci": [learnt["ci_low"], learnt["ci_high"]],
        "length": mean(a["length"]),
    }


def render(before: dict, before_rm: list[float], rm_metrics: dict, results: dict, seeds: list[int]) -> str:
    mean = statistics.fmean
    b = before["per_prompt"]
    lines = [
        "# Preference pairs: a learnt reward, PPO against it, DPO", "",
        f"Command: `python benchmarks/preferences.py --seeds {' '.join(map(str, seeds))}`. CPU: {cpu_model()}.", "",
        f"Reward model (configs/preferences/rm_summarizer.yaml, seed 0): accuracy on the held-out pairs "
        f"(10 %) {rm_metrics['test/accuracy']:.3f}, mean margin "
        f"{rm_metrics['test/margin']:.3f}, loss {rm_metrics['test/loss']:.3f} (chance: accuracy 0.5, loss 0.693).", "",
        f"Before (the embedded summarizer): toxicity {mean(b['toxicity']):.4f}, ROUGE-1 {mean(b['rouge1']):.4f}, "
        f"rule reward {mean(b['reward']):.4f}, learnt reward {mean(before_rm):.4f}, length {mean(b['length']):.2f}.", "",
    ]
    for seed in seeds:
        lines += [f"## Seed {seed}", "",
                  "| policy | toxicity | decrease | drop, 95 % CI | p | ROUGE-1 retained | rule reward gain, 95 % CI "
                  "| learnt reward gain, 95 % CI | length |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, label in METHODS.items():
            r = results[method][seed]
            lines.append(
                f"| {label} | {r['toxicity']:.4f} | {r['toxicity_decrease_pct']:+.1f} % | {r['toxicity_drop']:+.4f} "
                f"[{r['toxicity_drop_ci'][0]:+.4f}, {r['toxicity_drop_ci'][1]:+.4f}] | {r['toxicity_p']:.3g} | "
                f"{r['rouge1_retained_pct']:.1f} % | {r['reward_gain']:+.3f} [{r['reward_gain_ci'][0]:+.3f}, "
                f"{r['reward_gain_ci'][1]:+.3f}] | {r['learnt_gain']:+.3f} [{r['learnt_gain_ci'][0]:+.3f}, "
                f"{r['learnt_gain_ci'][1]:+.3f}] | {r['length']:.1f} |")
        lines.append("")
    lines += ["## Over seeds (mean ± sample std, min..max)", "",
              "| policy | toxicity decrease | ROUGE-1 retained | rule reward gain | learnt reward gain | length |",
              "|---|---|---|---|---|---|"]
    for method, label in METHODS.items():
        cells = []
        for key, fmt in (("toxicity_decrease_pct", "{:+.1f} %"), ("rouge1_retained_pct", "{:.1f} %"),
                         ("reward_gain", "{:+.3f}"), ("learnt_gain", "{:+.3f}"), ("length", "{:.1f}")):
            values = [results[method][s][key] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{fmt.format(statistics.fmean(values))} ± {std:.2f} "
                         f"({fmt.format(min(values))}..{fmt.format(max(values))})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "toxicity: mean P(offensive) of the profanity model on the 200 responses; drop: mean per-prompt "
              "decrease against the summarizer, with its paired BCa bootstrap CI and Wilcoxon p; rule reward: "
              "the recipe's reward (profanity logit + 10 x ROUGE-1), the rule that ranked the pairs; learnt "
              "reward: the reward model's score. Every policy is measured by `lit-rlhf test` on the same prompts "
              "with the same sampling seeds.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/.cache/preferences"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS_PREFERENCES.md"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    parser.add_argument("--no-run", action="store_true", help="only summarise what is in --workdir")
    args = parser.parse_args(argv)
    workdir = args.workdir.absolute()
    global NO_RUN
    NO_RUN = args.no_run

    with ThreadPoolExecutor(args.jobs) as pool:
        rm = pool.submit(reward_model_stage, workdir)
        before = pool.submit(eval_stage, "before", None, workdir)
        fits = {("ppo_rule", s): pool.submit(fit_stage, "ppo_rule", s, workdir, None) for s in args.seeds}
        fits |= {("dpo", s): pool.submit(fit_stage, "dpo", s, workdir, None) for s in args.seeds}
        reward_model = rm.result()
        fits |= {("ppo_rm", s): pool.submit(fit_stage, "ppo_rm", s, workdir, reward_model) for s in args.seeds}
        evals = {key: pool.submit(lambda k, f: eval_stage(f"{k[0]}_{k[1]}", f.result(), workdir), key, fit)
                 for key, fit in fits.items()}
        reports = {key: future.result() for key, future in evals.items()}
        before = before.result()
    learnt = learnt_reward(reward_model)
    before_rm = learnt_scores(learnt, before)
    results: dict[str, dict[int, dict]] = {m: {} for m in METHODS}
    for (method, seed), report in reports.items():
        results[method][seed] = compare(before, report, before_rm, learnt_scores(learnt, report))
    rm_metrics = json.loads((workdir / "rm" / "test_metrics.json").read_text())
    text = render(before, before_rm, rm_metrics, results, args.seeds)
    print(text)
    args.results.write_text(text)
    args.results.with_suffix(".json").write_text(json.dumps(
        {"cpu": cpu_model(), "reward_model": rm_metrics, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
