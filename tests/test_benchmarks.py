"""The PPO step benchmark runs end to end in its tiny smoke mode and prints its tables; its limit arithmetic.

Only lit_rlhf (exact mode, fast_rollout and GRPO with k = 4) and the bare floor run here (TRL needs its own
environment, which --tiny never builds); no timing is asserted: the test checks that the real lit_rlhf steps and
the floor run on the same workload and that the report has a row for each, plus the FLOP limits and the decode-step
table. Both smoke runs call the scripts' main in this process (a new interpreter would add only its imports) and
share one cache. The decode-step limits and the results file's sections (keyed by workload and dtype) are checked on
hand-computed numbers, without running anything.
"""

import contextlib
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_ppo_step.py"
FAST = "lit_rlhf PPOModule (fast_rollout, default)"
EXACT = "lit_rlhf PPOModule exact (fast_rollout false)"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ppo_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory, embedded_cache):
    """One cache for this file's smoke runs. Its tiny T5 is a copy of the session's embedded one: the same
    build_tiny_t5 build (its marker says so, and the scripts reuse it), not a second tokenizer training; the
    second run reads DialogSum's encoded prompts back (datasets caches every step)."""
    from lit_rlhf.models import resolve_model_path

    cache = tmp_path_factory.mktemp("bench_cache")
    shutil.copytree(resolve_model_path("embedded:tiny-t5"), cache / "tiny-t5")
    return cache


@pytest.fixture(scope="module")
def tiny_run(bench, bench_cache):
    # in this process (main with the script's own arguments): a new interpreter would only add its imports;
    # --in-process already runs each system's worker here
    results = bench_cache / "RESULTS.md"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = bench.main(["--tiny", "--workload", "B", "--systems", "lit_rlhf,lit_rlhf_fast,lit_rlhf_grpo,floor",
                           "--in-process", "--cache-dir", str(bench_cache), "--results", str(results)])
    assert code == 0, stdout.getvalue()[-3000:]
    return stdout.getvalue(), results


def test_tiny_run_prints_the_tables_of_workload_b(tiny_run):
    stdout, _ = tiny_run
    # workload B only (the recipe's prompts and per-sample lengths); A differs only in how its prompts are made,
    # and one workload keeps this smoke test short
    assert "### Workload B, float32: seconds per PPO step" in stdout
    for label in (EXACT, FAST, "lit_rlhf GRPO k 4 fast_rollout", "bare PyTorch floor", "FLOP limit",
                  "FLOP limit GRPO k 4"):
        assert stdout.count(f"| {label} |") == 1, label
    assert stdout.count("Goals:") == 1
    assert stdout.count(f"lit_rlhf GRPO k 4 fast_rollout ÷ {FAST}") == 1
    assert stdout.count(f"{FAST} against the FLOP limit, by phase:") == 1
    assert stdout.count(f"Decode steps of {FAST}") == 1


def test_tiny_run_writes_report_and_raw_results(tiny_run):
    _, results = tiny_run
    assert f"| {EXACT} |" in results.read_text()
    sections = json.loads(results.with_suffix(".json").read_text())["sections"]
    assert list(sections) == ["B/float32"]
    for name in ("B/float32",):
        rows = sections[name]["rows"]
        assert set(rows) == {"lit_rlhf", "lit_rlhf_fast", "lit_rlhf_grpo", "floor", "flop_limit", "flop_limit_grpo"}
        assert all(rows[s]["n_steps"] == 2 for s in ("lit_rlhf", "lit_rlhf_fast", "lit_rlhf_grpo", "floor"))
        # every system generated the workload's tokens: the same number per step (GRPO: 4 prompts x 4 samples)
        assert len({rows[s]["tokens"] for s in rows}) == 1
        # GRPO's generation runs the encoder once per prompt, not once per response: less work than PPO's
        assert rows["flop_limit_grpo"]["generate"] < rows["flop_limit"]["generate"]
        floor = sections[name]["raw"]["floor"]
        # the floor's decode-loop log-probs equal a teacher-forced forward: first ratio is 1
        assert floor["first_minibatch_ratio_error"] < 1e-4
        lit = sections[name]["raw"]["lit_rlhf"]
        assert lit["parameters"] == floor["parameters"]
        assert lit["memory"]["process_peak_mib"] > 0
        # GRPO builds no value head: d_model + 1 = 65 parameters fewer than the floor (tiny T5, d_model 64)
        grpo = sections[name]["raw"]["lit_rlhf_grpo"]
        assert {k: floor["parameters"][k] - v for k, v in grpo["parameters"].items()} == {
            "all_with_value_head": 65, "trainable_with_value_head": 65}
        assert grpo["memory"]["steps_peak_mib"] > 0
        assert {r["parameter_dtypes"]["frozen"][0] for r in sections[name]["raw"].values()} == {"float32"}
        # the decode loop's steps: [rows, position, prompt width, seconds], at most 16 rows, every row's tokens
        decode = sections[name]["raw"]["lit_rlhf_fast"]["decode_steps"]
        assert all(1 <= b <= 16 and s > 0 for b, _, _, s in decode)
        assert sum(b for b, *_ in decode) == rows["lit_rlhf_fast"]["tokens"] * rows["lit_rlhf_fast"]["n_steps"]


# a 1-layer model small enough to count by hand: d 4, d_ff 8, 2 heads of 2 (inner 4), vocab 10
def test_decode_step_cost_counts_weights_kv_cache_and_flops(bench):
    size = bench.ModelSize("hand", vocab_size=10, d_model=4, d_ff=8, num_layers=1, num_heads=2, d_kv=2)
    cost = bench.decode_step_cost(size, rows=2, position=3, prompt=5, lora_r=1, weight_bytes=2)
    # weights read once: self q k v o + cross q o (6 x 4 x 4) + FFN (3 x 4 x 8) = 192, lm_head 40, in bf16;
    # LoRA 3 x (4 + 4) = 24 and the value head 4 + 1 in fp32: 232 x 2 + 29 x 4
    assert cost["weight_bytes"] == 580
    # KV cache: 2 rows x (k, v) x inner 4 x (4 self positions + 5 prompt positions) x 2 bytes
    assert cost["kv_bytes"] == 288
    assert cost["bytes"] == 868
    # per row: 2 x 192 + 2 x 24 + attention 2 x 2 x 4 x 9 + lm_head 2 x 40 + value head 2 x 4 = 664
    assert cost["flops"] == 2 * 664


def test_decode_rows_summary_divides_by_bandwidth_and_gemm_rate(bench):
    size = bench.ModelSize("hand", vocab_size=10, d_model=4, d_ff=8, num_layers=1, num_heads=2, d_kv=2)
    steps = [[2, 3, 5, 0.004], [2, 3, 5, 0.006], [1, 0, 5, 0.1]]  # two 2-row steps as above, one 1-row step
    row = bench.decode_rows_summary(steps, 2, size, "bfloat16", read_gbps=868e-6, gemm_gflops=1328e-6 / 2, lora_r=1)
    assert row["steps"] == 2 and row["position"] == 3 and row["prompt"] == 5
    assert row["measured_ms"] == pytest.approx(5.0)
    assert row["bandwidth_ms"] == pytest.approx(1.0)  # 868 bytes at 868 kB/s
    assert row["flop_ms"] == pytest.approx(2.0)  # 1328 FLOPs at 664 kFLOP/s
    assert row["ratio"] == pytest.approx(2.5)  # 5 ms ÷ the larger limit
    assert bench.decode_rows_summary(steps, 4, size, "bfloat16", 1.0, 1.0) is None


def test_sections_are_keyed_by_workload_and_dtype(bench):
    machine = {"machine": "m", "threads": 1}
    old = {"B": {"run": dict(machine)}, "A": {"run": dict(machine)}}  # written before the dtype was recorded
    new = {"A/bfloat16": {"run": {**machine, "workload": "A", "dtype": "bfloat16"}, "rows": {}}}
    sections = bench.upgrade_sections({**old, **new})
    assert list(sections) == ["A/float32", "A/bfloat16", "B/float32"]
    assert sections["A/float32"]["run"]["dtype"] == "float32"
    sections["A/float32"]["rows"] = {"trl_batched": {"total": 2.0}}
    assert bench.fp32_baseline(sections["A/bfloat16"], sections) == {"total": 2.0}
    sections["A/float32"]["run"]["machine"] = "another"  # only a float32 run on the same machine counts
    assert bench.fp32_baseline(sections["A/bfloat16"], sections) is None


@pytest.mark.parametrize("name", ["RESULTS.md", "RESULTS_GRPO.md"])
def test_render_rewrites_the_recorded_results(bench, tmp_path, name):
    for suffix in (".md", ".json"):
        (tmp_path / name).with_suffix(suffix).write_text((REPO / "benchmarks" / name).with_suffix(suffix).read_text())
    assert bench.main(["--render", "--results", str(tmp_path / name)]) == 0
    text = (tmp_path / name).read_text()
    assert f"| {FAST} |" in text and ", float32: seconds per PPO step" in text
    assert bench.NOTES_MARKER in text


def test_reference_rows_benchmark_checks_the_rows_against_the_teacher_forced_reference(bench_cache, capsys):
    """bench_reference_rows.py decodes reference rows (peft's "__base__" adapter per row) beside the policy's;
    it stops with an error unless their log-probs equal the teacher-forced reference's, then names the faster way."""
    spec = importlib.util.spec_from_file_location("bench_reference_rows", REPO / "benchmarks" / "bench_reference_rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--repeats", "1", "--cache-dir", str(bench_cache)]) == 0
    stdout = capsys.readouterr().out
    assert "| decode, 16 policy + 16 reference rows |" in stdout
    assert "faster here: " in stdout


def test_goals_check_each_workload_and_dtype_against_its_own_targets(bench):
    run = {"workload": "B", "dtype": "float32", "machine": "m", "threads": 1}
    rows = {"lit_rlhf_fast": {"total": 100.0, "steps_peak_mib": 6.0, "process_peak_mib": 8.0},
            "trl_batched": {"total": 250.0, "steps_peak_mib": 10.0, "process_peak_mib": 10.0},
            "trl_loop": {"total": 290.0}, "flop_limit": {"total": 50.0}}
    lines = bench.goals({"run": run, "rows": rows}, {})
    assert "  - speed-up vs TRL batched (goal ≥ 2.0): 2.50 — met" in lines
    assert "  - speed-up vs TRL loop (goal ≥ 3.0): 2.90 — NOT met" in lines
    assert "  - time ÷ FLOP limit (goal ≤ 1.6): 2.00 — NOT met" in lines
    assert "  - peak RSS during steps ÷ TRL batched (goal ≤ 0.7): 0.60 — met" in lines
    assert "  - process peak RSS ÷ TRL batched (goal ≤ 0.7): 0.80 — NOT met" in lines
    # bf16 on workload A: against TRL in bf16 and TRL batched fp32 of the same machine; no FLOP-limit goal
    a32 = {"run": {**run, "workload": "A"}, "rows": {"trl_batched": {"total": 300.0}}}
    a16 = {"run": {**run, "workload": "A", "dtype": "bfloat16"},
           "rows": {"lit_rlhf_fast": {"total": 100.0}, "trl_batched": {"total": 140.0}}}
    lines = bench.goals(a16, {"A/float32": a32, "A/bfloat16": a16})
    assert "  - speed-up vs TRL batched bf16 (goal ≥ 1.5): 1.40 — NOT met" in lines
    assert "  - speed-up vs TRL batched fp32 (goal ≥ 1.7): 3.00 — met" in lines
    assert not any("FLOP limit" in line for line in lines)


def test_preferences_benchmark_compares_each_policy_with_before_prompt_by_prompt():
    path = Path(__file__).parents[1] / "benchmarks" / "preferences.py"
    spec = importlib.util.spec_from_file_location("bench_preferences", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def report(toxicity, reward, rouge1, ids=("a", "b", "c", "d")):
        return {"per_prompt": {"id": list(ids), "toxicity": toxicity, "reward": reward, "rouge1": rouge1,
                               "length": [10, 12, 14, 16]}}

    before = report([0.4, 0.2, 0.1, 0.1], [1.0, 2.0, 3.0, 4.0], [0.4, 0.4, 0.2, 0.2])
    after = report([0.2, 0.1, 0.1, 0.0], [2.0, 2.0, 4.0, 4.0], [0.3, 0.3, 0.15, 0.15])
    got = module.compare(before, after, [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, 1.0])
    # toxicity 0.2 -> 0.1: 50 % lower, a mean per-prompt drop of 0.1; ROUGE-1 0.3 -> 0.225: 75 % retained
    assert got["toxicity_decrease_pct"] == pytest.approx(50.0) and got["toxicity_drop"] == pytest.approx(0.1)
    assert got["rouge1_retained_pct"] == pytest.approx(75.0)
    assert got["reward_gain"] == pytest.approx(0.5) and got["learnt_gain"] == pytest.approx(0.5)
    assert got["toxicity_drop_ci"][0] <= 0.1 <= got["toxicity_drop_ci"][1]
    with pytest.raises(ValueError, match="same prompts"):
        module.compare(before, report([0.0] * 4, [0.0] * 4, [0.1] * 4, ids=("a", "b", "c", "x")), [0.0] * 4, [0.0] * 4)
