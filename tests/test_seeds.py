"""benchmarks/seeds.py: the headline figures of a report and their summary over seeds, on hand-made reports."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seeds.py"


@pytest.fixture(scope="module")
def seeds():
    spec = importlib.util.spec_from_file_location("bench_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def benchmark_script(name: str):
    """benchmarks/<name> as a module (it imports seeds.py beside it)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name.removesuffix('.py')}", SCRIPT.parent / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def report(tox_before, tox_after, reward_before, reward_after, rouge_before, rouge_after, length_after=20.0):
    side = lambda tox, reward, rouge, length: {"toxicity_mean": tox, "reward_mean": reward, "rouge1": rouge,
                                               "response_length_mean": length}
    return {"before": side(tox_before, reward_before, rouge_before, 25.0),
            "after": side(tox_after, reward_after, rouge_after, length_after),
            "toxicity": {"p_value": 0.01}, "reward": {"p_value": 0.2}}


def test_headline_figures_of_one_report(seeds):
    figures = seeds.headline_figures(report(0.05, 0.04, 6.0, 6.5, 0.30, 0.27))
    assert figures["toxicity_decrease_pct"] == pytest.approx(20.0)
    assert figures["reward_gain"] == pytest.approx(0.5)
    assert figures["rouge1_retained_pct"] == pytest.approx(90.0)
    assert figures["toxicity_p"] == 0.01 and figures["length_after"] == 20.0


def test_a_report_without_references_has_no_rouge_row(seeds):
    figures = seeds.headline_figures(report(0.05, 0.04, 6.0, 6.5, None, None))
    assert "rouge1_retained_pct" not in figures


def test_summary_over_seeds_and_its_table(seeds, tmp_path):
    per_seed = {0: seeds.headline_figures(report(0.05, 0.04, 6.0, 6.5, 0.30, 0.27)),
                1: seeds.headline_figures(report(0.05, 0.03, 6.0, 6.1, 0.30, 0.30))}
    summary = seeds.summarise(per_seed)
    assert summary["toxicity_decrease_pct"]["mean"] == pytest.approx(30.0)  # 20 % and 40 %
    assert summary["toxicity_decrease_pct"]["std"] == pytest.approx(14.142135, rel=1e-6)  # sample std of 20, 40
    assert summary["reward_gain"]["min"] == pytest.approx(0.1) and summary["reward_gain"]["max"] == pytest.approx(0.5)
    text = seeds.render(per_seed, summary, "lit-rlhf fit --seed_everything N")
    row = next(line for line in text.splitlines() if line.startswith("| toxicity decrease (%)"))
    assert row == "| toxicity decrease (%) | +20.0 | +40.0 | +30.0 | +14.1 | +20.0 | +40.0 |"


def test_no_run_summarises_the_runs_in_the_workdir(seeds, tmp_path):
    for seed, after in ((0, 0.04), (1, 0.03)):
        folder = tmp_path / f"seed_{seed}" / "logs" / "lightning_logs" / "version_0"
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(json.dumps(report(0.05, after, 6.0, 6.5, 0.30, 0.27)))
    results = tmp_path / "R.md"
    seeds.main(["--seeds", "0", "1", "--no-run", "--workdir", str(tmp_path), "--results", str(results)])
    saved = json.loads(results.with_suffix(".json").read_text())
    assert saved["summary"]["toxicity_after"]["mean"] == pytest.approx(0.035)
    assert "| mean toxicity after | 0.0400 | 0.0300 |" in results.read_text()


def test_the_seed_flags_come_after_a_config_so_that_they_win(seeds, tmp_path, monkeypatch):
    """jsonargparse applies arguments in order: a --config after --seed_everything N would set its own seed."""
    commands = []
    monkeypatch.setattr(seeds.subprocess, "run", lambda command, **kwargs: commands.append(command))
    monkeypatch.setattr(seeds, "find_report", lambda folder: folder / "report.json")
    seeds.run_seed(3, tmp_path / "seed_3", ["--config", "x.yaml"])
    args = commands[0][commands[0].index("fit") + 1:]
    assert args == ["--config", "x.yaml", "--seed_everything", "3", "--model.seed", "3"]


def test_rlvr_table_per_seed_and_over_seeds(tmp_path):
    rlvr = benchmark_script("rlvr_seeds.py")
    side = lambda acc, passed: {"reward_mean": acc, "pass_at_k": passed, "response_length_mean": 3.5}  # noqa: E731
    rows = {s: rlvr.seed_row({"before": side(0.40, 0.6), "after": side(0.40 + gain, 0.7), "reward": {
        "difference_mean": gain, "ci_low": gain - 0.03, "ci_high": gain + 0.03, "p_value": 0.001}})
        for s, gain in ((0, 0.10), (1, 0.20))}
    assert rows[1]["after"] == pytest.approx(60.0) and rows[1]["change"] == pytest.approx(20.0)
    text = rlvr.render(rows, "cmd", 8)
    assert "| 1 | 40.0 | 60.0 | +20.0 [+17.0, +23.0] | 0.001 | 60.0 | 70.0 | 3.50 | 3.50 |" in text
    assert "| mean ± sd | 40.0 ± 0.0 | 55.0 ± 7.1 | +15.0 ± 7.1 |  | 60.0 ± 0.0 | 70.0 ± 0.0 |" in text
    assert "pass@8 before %" in text


def test_tool_benchmark_compares_episodes_per_problem(seeds):
    tools = benchmark_script("rlvr_tools.py")
    before = [{"reward": float(i < 2), "tool": i == 0} for i in range(10)]  # 20% right, 10% with the tool
    after = [{"reward": float(i < 7), "tool": True} for i in range(10)]
    row = tools.compare(before, after)
    assert (row["before"], row["after"], row["tool_before"], row["tool_after"]) == (20.0, 70.0, 10.0, 100.0)
    assert row["change"] == pytest.approx(50.0) and row["ci_low"] > 0 and row["p"] < 0.1
    text = tools.render({0: row, 1: {**row, "after": 80.0, "change": 60.0}}, "cmd")
    assert "| mean ± sd | 20.0 ± 0.0 | 75.0 ± 7.1 | +55.0 ± 7.1 | | 10.0 ± 0.0 | 100.0 ± 0.0 |" in text
    environment = tools.environment_from_config()  # the config's environment, as the runs build it
    assert (environment.max_turns, environment.prompt_column, environment.system_prompt) == (2, "question", "")
