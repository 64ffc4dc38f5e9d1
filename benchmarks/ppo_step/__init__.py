"""The PPO step benchmark's parts (``benchmarks/bench_ppo_step.py`` is its command line): its settings, the
machine's rates, the workloads, the systems it times (lit_rlhf, TRL 0.11.4, the bare floor), the limits and the
report."""
