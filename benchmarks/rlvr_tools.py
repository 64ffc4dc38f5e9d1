"""GRPO with a calculator tool over seeds: held-out accuracy of greedy multi-turn episodes before and after.

    python benchmarks/rlvr_tools.py                          # seeds 0..4 into benchmarks/.cache/rlvr_tools/seed_N
    python benchmarks/rlvr_tools.py --no-run                 # only measure and summarise the runs that are there
    python benchmarks/rlvr_tools.py --seeds 0 --extra --model.ppo_steps 10   # flags after --extra go to lit-rlhf fit

Each seed runs `lit-rlhf fit --config rlvr_arithmetic_tools.yaml --seed_everything N --model.seed N` in its own
folder, one after the other (benchmarks/seeds.py's run_seed). Then the model before (embedded:arithmetic-tools) and
after (with the run's exported adapter merged) plays one greedy episode per held-out problem (the 500 test problems
of bundled:arithmetic-questions) with the config's environment, through lit_rlhf's own episode loop
(``lit_rlhf.models.run_episodes``); the environment's reward of each episode is its accuracy. The change's CI is
the paired BCa bootstrap CI over problems and its p the Wilcoxon signed-rank test (``lit_rlhf.callbacks``'
``paired_comparison``, as in the training report). The table is printed and written to --results (Markdown)
beside a JSON of the per-seed values.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
import yaml
from seeds import cpu_model, mean_sd, run_fit, seed_arguments

CONFIG = "rlvr_arithmetic_tools.yaml"
CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / CONFIG
MODEL = "embedded:arithmetic-tools"


def greedy_generate(model: Any, eos: int):
    """A ``run_episodes`` generate function: greedy decoding of each row up to its limit or its first eos."""

    def generate(ids: torch.Tensor, mask: torch.Tensor, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=int(limits.max()),
                             pad_token_id=eos, eos_token_id=eos)[:, ids.shape[1]:]
        position = torch.arange(out.shape[1]).expand_as(out)
        ended = torch.cumsum((out == eos).long(), 1) - (out == eos).long()  # eos tokens strictly before
        keep = (ended == 0) & (position < limits[:, None])
        return out, keep.long()

    return generate


def environment_from_config(path: Path = CONFIG_PATH) -> Any:
    """The config's ``model.environment``, built from its class path and init args."""
    from lit_rlhf.rewards.function import import_function

    spec = yaml.safe_load(path.read_text())["model"]["environment"]
    module, name = spec["class_path"].rsplit(".", 1)
    return import_function(f"{module}:{name}")(**spec.get("init_args", {}))


def play(model_name: str, adapter: str | None, rows: list[dict], limit: int, batch_size: int = 100) -> list[dict]:
    """One greedy episode per row with the config's environment: per row its reward, model turns, tool calls."""
    from lit_rlhf.models import run_episodes
    from lit_rlhf.models.loading import load_base_model, load_tokenizer
    from lit_rlhf.rewards.environment import parse_tool_call

    model, path, setting = load_base_model(model_name, adapter, torch.float32)
    model.eval()
    tokenizer, environment = load_tokenizer(path, setting), environment_from_config()
    eos, out = tokenizer.eos_token_id, []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            episodes = run_episodes(tokenizer, environment, chunk, torch.full((len(chunk),), limit),
                                    greedy_generate(model, eos), (eos,), tokenizer.pad_token_id,
                                    model.config.n_positions)
            out += [{"reward": float(environment.reward(e.messages, e.row)), "turns": e.turns,
                     "tool": any(parse_tool_call(m["content"]) for m in e.messages if m["role"] == "assistant")}
                    for e in episodes]
    return out


def held_out_rows() -> list[dict]:
    """The 500 held-out problems as the environment reads them (``bundled:arithmetic-questions``' test split)."""
    from lit_rlhf.data.arithmetic import arithmetic_splits

    return [{"id": r["id"], "question": r["prompt"], "answer": r["answer"]} for r in arithmetic_splits()["test"]]


def compare(before: list[dict], after: list[dict], seed: int = 0) -> dict[str, float]:
    """Accuracy and tool-call rate before and after (percent), the change with its paired CI and p."""
    from lit_rlhf.callbacks.report import paired_comparison

    change = paired_comparison([r["reward"] for r in before], [r["reward"] for r in after], lower_is_better=False,
                               bootstrap_resamples=2000, confidence=0.95, seed=seed, test_method="wilcoxon")

    def share(rows: list[dict], key: str) -> float:
        return 100 * sum(float(r[key]) for r in rows) / len(rows)

    return {"before": share(before, "reward"), "after": share(after, "reward"),
            "change": 100 * change["difference_mean"], "ci_low": 100 * change["ci_low"],
            "ci_high": 100 * change["ci_high"], "p": change["p_value"],
            "tool_before": share(before, "tool"), "tool_after": share(after, "tool")}


def adapter_of(folder: Path) -> Path:
    """The newest run's exported adapter under a seed's folder."""
    found = sorted(folder.glob("logs/lightning_logs/version_*/adapter"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no logs/lightning_logs/version_*/adapter under {folder}")
    return found[-1]


def render(rows: dict[int, dict[str, float]], command: str) -> str:
    """The Markdown table: one row per seed, then the mean and sample sd over seeds."""
    keys = ["before", "after", "change", "tool_before", "tool_after"]
    head = "| seed | accuracy before % | accuracy after % | change (points) [95% CI] | p | tool calls before % | " \
           "tool calls after % |"
    lines = [head, "|" + "---|" * 7]
    for seed, r in sorted(rows.items()):
        lines.append(f"| {seed} | {r['before']:.1f} | {r['after']:.1f} | {r['change']:+.1f} [{r['ci_low']:+.1f}, "
                     f"{r['ci_high']:+.1f}] | {r['p']:.2g} | {r['tool_before']:.1f} | {r['tool_after']:.1f} |")
    stats = {key: mean_sd([r[key] for r in rows.values()]) for key in keys}
    cells = [f"{stats[k][0]:.1f} ± {stats[k][1]:.1f}" for k in keys]
    cells[2] = f"{stats['change'][0]:+.1f} ± {stats['change'][1]:.1f}"
    lines.append(f"| mean ± sd | {cells[0]} | {cells[1]} | {cells[2]} | | {cells[3]} | {cells[4]} |")
    return "\n".join([
        "# Arithmetic with a calculator tool: GRPO over multi-turn episodes, over seeds", "",
        f"Command: `{command}`, one seed at a time, one thread. CPU: {cpu_model()}; Python "
        f"{platform.python_version()}.", "",
        "Accuracy: greedy episodes (the config's ToolEnvironment: at most 2 model turns) on the 500 held-out test "
        "problems, reward 1 when the last turn's first number is the answer; change: after - before per problem, "
        "mean with its "
        "paired 95% BCa bootstrap CI over problems and the Wilcoxon signed-rank p; tool calls: episodes in which the "
        "model called the calculator; sd: sample standard deviation over seeds.", "",
        *lines, "",
    ])


def main(argv: list[str] | None = None) -> None:
    args = seed_arguments(__doc__.split("\n\n")[0], "benchmarks/.cache/rlvr_tools", "benchmarks/RESULTS_RLVR_TOOLS.md",
                          argv)
    extra = ["--config", str(CONFIG_PATH), *args.extra]
    rows, problems = {}, held_out_rows()
    limit = yaml.safe_load(CONFIG_PATH.read_text())["model"]["generation"]["max_new_tokens"][1] - 1
    before = play(MODEL, None, problems, limit)
    for seed in args.seeds:
        folder = args.workdir.absolute() / f"seed_{seed}"
        if not args.no_run:
            run_fit(seed, folder, extra)
        rows[seed] = compare(before, play(MODEL, str(adapter_of(folder)), problems, limit))
        print(seed, rows[seed], flush=True)
    command = " ".join(["OMP_NUM_THREADS=1 lit-rlhf fit --config configs/" + CONFIG, *args.extra,
                        "--seed_everything N --model.seed N"])
    text = render(rows, command)
    print(text)
    args.results.write_text(text)
    args.results.with_suffix(".json").write_text(json.dumps({"cpu": cpu_model(), "per_seed": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
