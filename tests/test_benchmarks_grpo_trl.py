"""The GRPO-vs-TRL benchmark (benchmarks/bench_grpo_trl.py): its FLOP count on hand-computed numbers, the lit_rlhf
side's smoke run on a tiny Qwen2 shape in this process (no timing asserted: the step runs, generates exactly the
forced lengths, skips the old-log-prob pass, and the report has its rows and checks), and the TRL side's, only
where trl is importable (it lives in its own environment)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_grpo_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_grpo_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_step_flops_count_grouped_attention_lora_and_the_lm_head_on_response_tokens(bench):
    from grpo_trl.shapes import Shape, forward_flops, step_flops

    # d 4, 2 heads of 2 (q width 4), 1 kv head (k, v width 2), MLP 8, vocab 10, LoRA r 1 on q and v
    shape = Shape("hand", vocab=10, hidden=4, layers=1, heads=2, kv_heads=1, intermediate=8)
    one = forward_flops(shape, prompt=1, response=1, lora_r=1)
    # per token: q 2x4x4 + k, v 2x2x4x2 + o 2x4x4 + MLP 3x2x4x8 + LoRA 2(4+4) + 2(4+2) = 316
    # prompt token: 316 + attention over 1 position 2x2x4 = 332; response token: 316 + 2 positions (32) + head 80
    assert one == {"total": 760, "prompt": 332, "lora": 56}
    step = step_flops(shape, prompts=1, samples=2, prompt=1, response=1, lora_r=1)
    assert step == {"generate": 2 * 760 - 332, "scoring": 2 * 760, "update": 2 * (2 * 760 + 56)}


def test_lit_rlhf_side_runs_a_tiny_grpo_step_in_process(bench, tmp_path):
    results = tmp_path / "RESULTS.md"
    code = bench.main(["--shape", "tiny", "--systems", "lit_rlhf", "--steps", "1", "--warmup", "0", "--in-process",
                       "--cache-dir", str(tmp_path), "--results", str(results)])
    assert code == 0
    section = json.loads(results.with_suffix(".json").read_text())["sections"]["tiny/float32"]
    row, raw = section["rows"]["lit_rlhf"], section["raw"]["lit_rlhf"][0]
    assert row["response_lengths"] == [64] and row["prompt_lengths"] == [64] and row["rows"] == [16]
    step = raw["steps"][0]
    assert step["old_logprob_pass_skipped"] is True  # on-policy: the update's forward gives the old log-probs
    assert step["scoring"] > 0 and step["update"] > 0
    checks = raw["checks"]
    assert checks["kl_beta"] == 0.04 and checks["kl_in_loss"] and checks["loss_aggregation"] == "token_mean"
    assert checks["reference"] == "base with the adapter disabled" and not checks["value_head"]
    # LoRA r 16 on q_proj, v_proj of 2 layers: q 64 -> 64, v 64 -> 32 (2 kv heads of 16)
    assert checks["trainable_parameters"] == 2 * (16 * (64 + 64) + 16 * (64 + 32))
    text = results.read_text()
    assert "| lit_rlhf GRPO (fast_rollout false: generate, no old-log-prob pass) |" in text
    assert "| FLOP limit |" in text and "Checks (read back by each worker):" in text


def test_trl_side_runs_the_same_tiny_step(bench, tmp_path):
    pytest.importorskip("trl")
    from grpo_trl.shapes import SHAPES, build_model_dir, build_prompts

    model_dir = build_model_dir(tmp_path, SHAPES["tiny"])
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"batches": build_prompts(model_dir, 1), "profile_batch": False}))
    out = bench.run_worker(bench.parse_args(
        ["worker", "--system", "trl", "--prompts-file", str(prompts), "--out", str(tmp_path / "trl.json"),
         "--shape", "tiny", "--warmup", "0", "--cache-dir", str(tmp_path), "--model-dir", str(model_dir)]))
    step = out["steps"][0]
    assert step["response_lengths"] == [64] and step["prompt_lengths"] == [64] and step["rows"] == 16
    assert step["logprob_passes_in_scoring"] == 1  # the reference only: no old-log-prob pass
    assert out["checks"]["trainable_parameters"] == 2 * (16 * (64 + 64) + 16 * (64 + 32))
    assert out["checks"]["reference"] == "base with the adapter disabled" and out["checks"]["kl_beta"] == 0.04


def test_add_keeps_the_stored_section_and_its_flop_limit(bench, tmp_path):
    results = tmp_path / "R.md"
    run = {"command": "c1", "started": "s", "minutes": 1.0, "load_start": [1, 1, 1], "load_end": [2, 2, 2],
           "rates": [{}, {}]}
    stored = {"rows": {"lit_rlhf": {"total": 1.0}, "flop_limit": {"total": 0.5}},
              "raw": {"lit_rlhf": [{"steps": []}]}, "run": dict(run)}
    results.with_suffix(".json").write_text(json.dumps({"sections": {"40m/float32": stored}}))
    new = {"rows": {"lit_rlhf_fast": {"total": 0.8}, "flop_limit": {"total": 0.4}},
           "raw": {"lit_rlhf_fast": [{"steps": []}]}, "run": {**run, "command": "c2"}}
    merged = bench.added_to(results, "40m/float32", new)
    assert list(merged["rows"]) == ["lit_rlhf", "lit_rlhf_fast", "flop_limit"]
    assert merged["rows"]["flop_limit"] == {"total": 0.5} and merged["run"]["command"] == "c1"
    assert merged["run"]["added"][0]["command"] == "c2" and merged["run"]["added"][0]["systems"] == ["lit_rlhf_fast"]
    assert bench.added_to(results, "387m/float32", new) is new  # nothing stored under that key: the run as it is
