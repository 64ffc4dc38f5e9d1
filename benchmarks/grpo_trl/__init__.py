"""Parts of benchmarks/bench_grpo_trl.py: GRPO step of lit_rlhf vs TRL 1.x GRPOTrainer."""
