"""The GPU check's policy-loss part (run by ``benchmarks/gpu_check.sh``): two GRPO steps (k = 4) of the config-built
Qwen2 shape with the memory levers on (bfloat16 base, gradient checkpointing, micro-batches, rollout chunks) for
each policy-loss and scoring setting (one step in the CPU dry run), appended to the report as a table.

    python benchmarks/gpu_check_settings.py --device cuda --out benchmarks/GPU_RESULTS.md   # Qwen2.5-0.5B shape
    python benchmarks/gpu_check_settings.py --device cpu --out /tmp/GPU_RESULTS.md          # dry run: 0.3M parameters

A setting passes when its steps ran with finite losses and no skipped update; the on-policy exact rollout
(``fast_rollout: false``, one epoch of one mini-batch, no value head, KL in the loss) takes its old log-probs from
the update's own forward: its first importance ratio must be exactly 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_memory  # noqa: E402  (benchmarks/ is not a package)
import gpu_check  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "GRPO (defaults)": {},
    "clip-higher: ppo.cliprange_high 0.28": {"ppo": {"cliprange_high": 0.28}},
    "GSPO: ppo.importance_sampling sequence (cliprange 3e-4, cliprange_high 4e-4)":
        {"ppo": {"importance_sampling": "sequence", "cliprange": 3e-4, "cliprange_high": 4e-4}},
    "CISPO: ppo.policy_loss cispo (cliprange_high 4)": {"ppo": {"policy_loss": "cispo", "cliprange_high": 4.0}},
    "entropy bonus: ppo.entropy_coef 0.01": {"ppo": {"entropy_coef": 0.01}},
    "no reference: ppo.init_kl_coef 0": {"ppo": {"init_kl_coef": 0.0}},
    "exact rollout, on-policy: fast_rollout false (KL in the loss, one mini-batch of 8)":
        {"ppo": {"kl_in_loss": True}, "fast_rollout": False, "mini_batch_size": 8},
}
ON_POLICY = "exact rollout, on-policy: fast_rollout false (KL in the loss, one mini-batch of 8)"


def steps(cpu: bool) -> int:
    """PPO steps a setting runs: 2 on the GPU, 1 in the CPU dry run (it runs in the test suite)."""
    return 1 if cpu else 2


def make_module(model_dir: Path, cpu: bool, overrides: dict[str, Any]):
    """GRPO, 2 prompts x 4 samples, bf16 base, checkpointing, micro-batch 2 of mini-batch 4 (or ``overrides``'),
    rollout chunks of 4 rows, ``steps(cpu)`` steps; ``overrides['ppo']`` goes into the PPO settings."""
    import torch

    from lit_rlhf.modules import PPOModule
    from lit_rlhf.rewards import Reward
    from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

    class LengthReward(Reward):  # no reward model: the check is about the policy
        def compute(self, prompts, responses, references):
            return torch.tensor([-abs(len(r) - 40) / 40.0 for r in responses])

    extra = {k: v for k, v in overrides.items() if k != "ppo"}
    kwargs = dict(mini_batch_size=4, micro_batch_size=2, fast_rollout=True) | extra
    return PPOModule(
        str(model_dir), reward=LengthReward(), lora=LoraSettings(r=16, alpha=16),
        generation=GenerationSettings(min_new_tokens=2, max_new_tokens=(8, 24) if cpu else (32, 128), batch_size=4),
        ppo=PPOSettings(advantage_estimator="grpo", **overrides.get("ppo", {})), ppo_steps=steps(cpu),
        learning_rate=1e-3,
        rollout_batch_size=2, samples_per_prompt=4, dtype="bfloat16", gradient_checkpointing=True,
        log_samples_every=0, export_adapter=False, seed=0, **kwargs)


def run_variant(model_dir: Path, root: Path, device: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Two steps; each step's logged scalars, the seconds per step and the peak memory."""
    import lightning as L
    import torch

    from lit_rlhf.data import DialogSumDataModule

    L.seed_everything(0, verbose=False)
    cuda = device == "cuda"
    module = make_module(model_dir, not cuda, overrides)
    logged: list[dict[str, float]] = []
    log_stats = module._log_stats
    module._log_stats = lambda stats: (logged.append({k: float(v) for k, v in stats.items()}), log_stats(stats))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    data = DialogSumDataModule(model_name=str(model_dir), batch_size=2, max_prompt_tokens=256 if cuda else 64,
                               split="train" if cuda else "test")
    start = time.perf_counter()
    gpu_check.trainer(root, device).fit(module, data)
    peak = torch.cuda.max_memory_allocated() if cuda else bench_memory.rss_kib("VmHWM") * 1024
    return {"steps": logged, "seconds": (time.perf_counter() - start) / max(1, len(logged)), "peak_mib": peak / 2**20,
            "expected": steps(not cuda)}


def verdict(name: str, rec: dict[str, Any]) -> str:
    """'' when the variant passed, else why not."""
    logged = rec["steps"]
    if len(logged) != rec["expected"]:
        return f"{len(logged)} steps instead of {rec['expected']}"
    if any(not math.isfinite(v) for s in logged for k, v in s.items() if k.startswith("ppo/policy") or "loss" in k):
        return "a non-finite loss or ratio"
    if logged[-1].get("ppo/skipped_updates_total", 0.0) > 0:
        return "an update was skipped"
    first = logged[0]
    if name == ON_POLICY and (first.get("ppo/policy/ratio_mean") != 1.0 or first.get("ppo/policy/ratio_max") != 1.0):
        return f"first ratio {first.get('ppo/policy/ratio_mean')!r}, not exactly 1"
    return ""


def report(records: dict[str, dict[str, Any]], device: str) -> tuple[list[str], list[str]]:
    """The markdown table and the failures."""
    lines = ["", f"## Policy-loss and scoring settings (gpu_check_settings.py --device {device})", "",
             f"GRPO k = 4, 2 prompts a step, {steps(device == 'cpu')} step(s), bf16 base, checkpointing, "
             "micro-batch 2, rollout chunks of 4.", "",
             "| setting | s / step | peak (MiB) | step 1: ratio mean / max | entropy | KL logged | result |",
             "|---|---:|---:|---|---:|---|---|"]
    failures = []
    for name, rec in records.items():
        first, why = rec["steps"][0] if rec["steps"] else {}, verdict(name, rec)
        failures += [f"{name}: {why}"] if why else []
        lines.append(f"| {name} | {rec['seconds']:.2f} | {rec['peak_mib']:.0f} | "
                     f"{first.get('ppo/policy/ratio_mean', float('nan')):.6g} / "
                     f"{first.get('ppo/policy/ratio_max', float('nan')):.6g} | "
                     f"{first.get('ppo/policy/entropy', float('nan')):.3f} | "
                     f"{'yes' if 'objective/kl' in first else 'no'} | {why or 'ok'} |")
    return lines, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=str(HERE / "GPU_RESULTS.md"), help="the report the table is appended to")
    parser.add_argument("--work", default=str(bench_memory.CACHE / "gpu_check_settings"), help="run folders")
    parser.add_argument("--cache", default=str(bench_memory.CACHE), help="where the model is built")
    args = parser.parse_args()
    model_dir = bench_memory.build_model_dir("0.5B" if args.device == "cuda" else "tiny", Path(args.cache))
    records = {name: run_variant(model_dir, Path(args.work) / str(i), args.device, overrides)
               for i, (name, overrides) in enumerate(VARIANTS.items())}
    lines, failures = report(records, args.device)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failures:
        raise SystemExit("failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
