"""The PPO step benchmark runs end to end in its tiny smoke mode and prints its tables.

Only lit_rlhf (default, fast_rollout and GRPO with k = 4) and the bare floor run here (TRL needs its own environment,
which --tiny never builds); no timing is asserted: the test checks that the real lit_rlhf steps and the floor
run on the same workload and that the report has a row for each, plus the FLOP limits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_ppo_step.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bench_cache")
    results = cache / "RESULTS.md"
    env = dict(os.environ, LIT_RLHF_CACHE=str(cache / "lit_rlhf"))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--workload", "B", "--systems", "lit_rlhf,lit_rlhf_fast,lit_rlhf_grpo,floor",
         "--cache-dir", str(cache), "--results", str(results)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, results


def test_tiny_run_prints_the_tables_of_workload_b(tiny_run):
    stdout, _ = tiny_run
    # workload B only (the recipe's prompts and per-sample lengths); A differs only in how its prompts are made,
    # and one workload keeps this smoke test short
    assert "### Workload B: seconds per PPO step" in stdout
    for label in ("lit_rlhf PPOModule", "lit_rlhf PPOModule fast_rollout", "lit_rlhf GRPO k 4 fast_rollout",
                  "bare PyTorch floor", "FLOP limit", "FLOP limit GRPO k 4"):
        assert stdout.count(f"| {label} |") == 1, label
    assert stdout.count("Goals:") == 1
    assert stdout.count("lit_rlhf GRPO k 4 fast_rollout ÷ lit_rlhf PPOModule fast_rollout") == 1


def test_tiny_run_writes_report_and_raw_results(tiny_run):
    _, results = tiny_run
    assert "| lit_rlhf PPOModule |" in results.read_text()
    sections = json.loads(results.with_suffix(".json").read_text())["sections"]
    for name in ("B",):
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


def test_dtype_benchmark_times_a_bf16_step():
    # one configuration of benchmarks/bench_dtype.py on the tiny GPT-2: a warm-up step, then one measured
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_dtype.py"), "--model", "tiny-gpt2", "--dtype", "bfloat16",
         "--fast", "--steps", "1", "--new-tokens", "4"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["dtype"], result["fast"], result["clock"], result["steps"]) == ("bfloat16", True, "cpu", 1)
    assert result["step"] >= result["time/ppo/generate"] > 0
