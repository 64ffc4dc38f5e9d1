"""The scoring passes a GRPO step skips, timed: the reference pass at init_kl_coef 0, and the old-log-prob pass of
an on-policy update (one epoch, the rollout as one mini-batch, no value head; fast_rollout false, where that pass
exists). Every variant runs in this one process, on one thread, on a config-built GPT-2 (random weights, the
embedded GPT-2's tokenizer), 4 prompts x 4 samples of exactly --new tokens, LoRA r 16, GRPO with the k3 KL in the
loss at 0.04, token-mean loss, one AdamW step per rollout. Per variant: the median over --steps steps (the first
dropped: warm-up) of each phase (``time/ppo/...``) and of their sum.

    python benchmarks/bench_passes.py                      # n_layer 4, n_embd 256
    python benchmarks/bench_passes.py --layers 1 --width 32 --steps 2 --new 8   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_rlhf.data import DialogSumDataModule  # noqa: E402
from lit_rlhf.modules import PPOModule  # noqa: E402
from lit_rlhf.modules import ppo as ppo_module  # noqa: E402
from lit_rlhf.rewards import ProfanityReward  # noqa: E402
from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings  # noqa: E402

VARIANTS = {  # name: (init_kl_coef, fast_rollout, skip the on-policy old-log-prob pass)
    "generate, old pass, reference": (0.04, False, False),
    "generate, no old pass, reference": (0.04, False, True),
    "generate, no old pass, no reference": (0.0, False, True),
    "fast rollout, reference": (0.04, True, True),
    "fast rollout, no reference": (0.0, True, True),
}


def build_model(folder: Path, layers: int, width: int) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lit_rlhf.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 64), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(model: Path, kl: float, fast: bool, skip: bool, steps: int, new: int, root: str) -> list[dict[str, float]]:
    """The phase timings of each of ``steps`` GRPO steps."""
    original = ppo_module.old_logprobs_from_update
    ppo_module.old_logprobs_from_update = original if skip else (lambda *args: False)
    try:
        torch.manual_seed(0)
        m = PPOModule(model_name=str(model), reward=ProfanityReward(), samples_per_prompt=4, rollout_batch_size=4,
                      mini_batch_size=16, ppo_steps=steps, fast_rollout=fast, log_samples_every=0,
                      export_adapter=False, lora=LoraSettings(r=16), num_threads=1,
                      generation=GenerationSettings(min_new_tokens=new, max_new_tokens=(new, new + 1)),
                      ppo=PPOSettings(advantage_estimator="grpo", init_kl_coef=kl, kl_in_loss=True))
        timings = []
        m._log_stats = lambda stats: timings.append(
            {k: float(v) for k, v in stats.items() if k.startswith("time/")})
        trainer = L.Trainer(default_root_dir=root, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(m, DialogSumDataModule(model_name=str(model), batch_size=4, max_prompt_tokens=64))
        return timings
    finally:
        ppo_module.old_logprobs_from_update = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--new", type=int, default=64, help="new tokens per response")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", args.layers, args.width)
        lines = [f"GPT-2 n_layer {args.layers}, n_embd {args.width}; 16 rows x {args.new} new tokens; one thread",
                 f"{'variant':<38} {'generate':>9} {'scoring':>9} {'update':>9} {'step':>9}   (s, median)"]
        for name, (kl, fast, skip) in VARIANTS.items():
            steps = run(model, kl, fast, skip, args.steps, args.new, tmp)[1:]
            if not steps:
                continue
            med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
            step = statistics.median(sum(s.values()) for s in steps)
            lines.append(f"{name:<38} {med['time/ppo/generate']:9.3f} {med['time/ppo/forward']:9.3f} "
                         f"{med['time/ppo/update']:9.3f} {step:9.3f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
