"""The GPU check's training part (run by ``benchmarks/gpu_check.sh``): a few PPO and GRPO steps of a config-built
Qwen2-shaped model with the memory levers on (bfloat16 base, gradient checkpointing, micro-batches, rollout
chunks), and an exact resume from a mid-run checkpoint; writes a markdown report.

    python benchmarks/gpu_check.py --device cuda --out benchmarks/GPU_RESULTS.md   # Qwen2.5-0.5B shape
    python benchmarks/gpu_check.py --device cpu --out /tmp/GPU_RESULTS.md          # a dry run: 1M parameters

Run A trains 4 PPO steps and saves a checkpoint after step 2; run B resumes from it to step 4. The resume is
exact when B's trained weights (LoRA adapter and value head) equal A's bit for bit.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_memory  # noqa: E402  (benchmarks/ is not a package)


def make_module(model_dir: Path, steps: int, grpo: bool, cpu: bool):
    """A PPOModule with every memory lever on: bf16 base, checkpointing, micro-batch 2 of mini-batch 4, rollout
    chunks of 4 rows; 8 responses a step (GRPO: 2 prompts x 4 samples)."""
    import torch

    from lit_rlhf.modules import PPOModule
    from lit_rlhf.rewards import Reward
    from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

    class LengthReward(Reward):  # no reward model: the check is about the policy
        def compute(self, prompts, responses, references):
            return torch.tensor([-abs(len(r) - 40) / 40.0 for r in responses])

    k = 4 if grpo else 1
    return PPOModule(
        str(model_dir), reward=LengthReward(), lora=LoraSettings(r=16, alpha=16),
        generation=GenerationSettings(min_new_tokens=2, max_new_tokens=(8, 24) if cpu else (32, 128), batch_size=4),
        ppo=PPOSettings(advantage_estimator="grpo" if grpo else "gae"), ppo_steps=steps, learning_rate=1e-3,
        rollout_batch_size=8 // k, mini_batch_size=4, micro_batch_size=2, samples_per_prompt=k, dtype="bfloat16",
        gradient_checkpointing=True, log_samples_every=0, export_adapter=False, seed=0,
    )


def trainer(root: Path, device: str, *callbacks):
    import lightning as L

    return L.Trainer(default_root_dir=root, max_epochs=-1, accelerator=device, devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks))


def run(model_dir: Path, root: Path, device: str, steps: int, grpo: bool, save_at: int | None = None,
        ckpt_path: Path | None = None) -> dict[str, Any]:
    """Fit; returns the trained weights, seconds per PPO step and the peak memory."""
    import lightning as L
    import torch

    from lit_rlhf.data import DialogSumDataModule

    L.seed_everything(0, verbose=False)
    cuda = device == "cuda"
    record: dict[str, Any] = {"seconds": []}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record["seconds"].append(time.perf_counter() - self.start)
            if save_at is not None and pl_module.ppo_step == save_at:
                trainer.save_checkpoint(root / "mid.ckpt")

    module = make_module(model_dir, steps, grpo, cpu=not cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # the dry run reads the bundled test split (1,500 dialogues, not 12,460): its prompts only feed a few steps
    data = DialogSumDataModule(model_name=str(model_dir), batch_size=module.hparams.rollout_batch_size,
                               max_prompt_tokens=64 if not cuda else 256, split="train" if cuda else "test")
    trainer(root, device, Watch()).fit(module, data, ckpt_path=ckpt_path)
    record["peak_mib"] = (torch.cuda.max_memory_allocated() if cuda else bench_memory.rss_kib("VmHWM") * 1024) / 2**20
    record["weights"] = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()
                         if k in {n for n, p in module.named_parameters() if p.requires_grad}}
    record["ppo_step"], record["dtype"] = module.ppo_step, module.weight_dtype
    record["parameters"] = sum(p.numel() for p in module.policy.parameters())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=str(HERE / "GPU_RESULTS.md"))
    parser.add_argument("--work", default=str(bench_memory.CACHE / "gpu_check"), help="run folders")
    parser.add_argument("--cache", default=str(bench_memory.CACHE), help="where the model is built")
    args = parser.parse_args()
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    size = "0.5B" if cuda else "tiny"
    model_dir = bench_memory.build_model_dir(size, Path(args.cache))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    straight = run(model_dir, work / "a", args.device, 4, grpo=False, save_at=2)
    resumed = run(model_dir, work / "b", args.device, 4, grpo=False, ckpt_path=work / "a" / "mid.ckpt")
    grpo = run(model_dir, work / "grpo", args.device, 2, grpo=True)
    diff = max((straight["weights"][k] - resumed["weights"][k]).abs().max().item() for k in straight["weights"])
    exact = resumed["weights"].keys() == straight["weights"].keys() and diff == 0.0 and resumed["ppo_step"] == 4
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    lines = [
        "# GPU check", "",
        f"`benchmarks/gpu_check.sh --device {args.device}` on {device_name} ({time.strftime('%Y-%m-%d')}), torch "
        f"{torch.__version__}{', CUDA ' + str(torch.version.cuda) if cuda else ''}. Model: Qwen2 shape '{size}' "
        f"({straight['parameters']:,} parameters with LoRA r 16 and the value head), base {straight['dtype']}, "
        "gradient checkpointing, micro-batch 2 of mini-batch 4, rollout chunks of 4 rows, fast rollout.", "",
        "| run | PPO steps | seconds per step | peak memory (MiB) |", "|---|---:|---|---:|",
    ]
    for name, rec in (("PPO, 4 steps (checkpoint after step 2)", straight), ("PPO resumed from step 2", resumed),
                      ("GRPO k=4, 2 steps", grpo)):
        seconds = ", ".join(f"{s:.2f}" for s in rec["seconds"])
        lines.append(f"| {name} | {rec['ppo_step']} | {seconds} | {rec['peak_mib']:.0f} |")
    lines += ["", f"Exact resume: {'yes' if exact else 'NO'} (largest difference of a trained weight after step 4: "
              f"{diff:.3g})."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not exact:
        raise SystemExit("the resumed run's weights differ from the straight run's")


if __name__ == "__main__":
    main()
