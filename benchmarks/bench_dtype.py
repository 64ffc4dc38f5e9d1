"""Seconds per PPO step with the frozen base in float32 or bfloat16 (``model.dtype``), with or without bf16
autocast (``trainer.precision``), in exact mode or with ``fast_rollout``. One configuration per process:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dtype.py --model t5-512 --dtype bfloat16 --fast

Models: the embedded tiny T5 / GPT-2, or ``t5-512`` (``lit_rlhf.models.tiny.build_tiny_t5`` with d_model 512, d_ff 1024,
6 + 6 layers, 8 heads of 64: a FLAN-T5-small-sized body, 2,000-token vocabulary, random weights). Every
response has exactly ``--new-tokens`` tokens (end-of-sequence blocked until then), DialogSum prompts, rollout
batch 16, mini-batch 4, LoRA r 32 on q/v, one thread. Prints one JSON line: the median step and its phases.

``--clock cpu`` (default) times in CPU seconds of this process (``time.process_time``, phases included): on a
machine shared with other jobs, wall time measures the other jobs too. ``--clock wall`` times in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import lightning as L
import torch

import lit_rlhf.rollout
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.rewards import ProfanityReward
from lit_rlhf.settings import GenerationSettings, LoraSettings
from lit_rlhf.models import build_tiny_t5, default_cache_dir


def model_path(name: str) -> str:
    if name != "t5-512":
        return f"embedded:{name}"
    folder = os.path.join(default_cache_dir(), "bench-t5-512")
    return build_tiny_t5(folder, d_model=512, d_ff=1024, num_layers=6, num_heads=8, d_kv=64)


class StepTimer(L.Callback):
    def __init__(self, clock) -> None:
        self.clock, self.steps = clock, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({"step": self.clock() - self.start, **pl_module.timings})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny-t5", "tiny-gpt2", "t5-512"), default="t5-512")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--precision", default="32-true", help="trainer.precision: 32-true or bf16-mixed")
    parser.add_argument("--fast", action="store_true", help="fast_rollout (cached decode loop)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up step")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # the module's phase timer reads lit_rlhf.rollout's clock
    lit_rlhf.rollout.time = argparse.Namespace(perf_counter=clock)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.new_tokens
    module = PPOModule(
        model_name=model_path(args.model), reward=ProfanityReward(), lora=LoraSettings(r=32, alpha=32),
        generation=GenerationSettings(min_new_tokens=n, max_new_tokens=(n, n + 1)), ppo_steps=args.steps + 1,
        rollout_batch_size=16, mini_batch_size=4, log_samples_every=0, export_adapter=False, dtype=args.dtype,
        fast_rollout=args.fast,
    )
    timer = StepTimer(clock)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, precision=args.precision, callbacks=[timer])
    trainer.fit(module, DialogSumDataModule(model_name=module.hparams.model_name, batch_size=16))
    measured = timer.steps[1:]  # the first step warms up
    medians = {k: round(statistics.median(s[k] for s in measured), 3) for k in measured[0]}
    print(json.dumps({"model": args.model, "dtype": args.dtype, "precision": args.precision, "fast": args.fast,
                      "clock": args.clock, "steps": len(measured), **medians}))


if __name__ == "__main__":
    main()
