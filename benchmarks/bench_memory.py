"""Benchmark: peak memory of one PPO step (and one GRPO step, k = 4) with each memory lever on and off, and a
per-component memory model fitted to the peaks, with its prediction for Qwen2.5-7B.

    python benchmarks/bench_memory.py                    # 0.1B and 0.5B Qwen2 shapes, CPU, ~30 min on 1 thread
    python benchmarks/bench_memory.py --tiny             # smoke test: a 1M-parameter Qwen2 shape, seconds a run
    python benchmarks/bench_memory.py --device cuda      # GPU: torch.cuda.max_memory_allocated

Models: Qwen2-shaped (grouped-query attention, a 151,936-token vocabulary, tied embeddings) built from configs
with random weights and saved once into ``benchmarks/.cache``: "0.1B" (hidden 512, 8 layers) and "0.5B" (the
Qwen2.5-0.5B shape: hidden 896, 24 layers, 14 query / 2 key-value heads, 494M parameters). The tokenizer is
the embedded GPT-2 one (2,000 tokens; the ids it does not know decode to nothing, which the reward ignores).
Workload: 8 prompts of 32 random tokens, responses of exactly 32 tokens (end-of-sequence blocked), LoRA r 16 on
the default targets, mini-batch 8 (one optimizer step), fast rollout. GRPO: 2 prompts x 4 samples.

Each configuration runs in a fresh process (``--worker``): one PPO step through a Lightning Trainer. CPU peak:
the process's high-water RSS (``/proc/self/status`` VmHWM, reset after setup; ``ru_maxrss`` where the reset is
refused) minus its RSS after setup (weights loaded); CUDA: ``max_memory_allocated`` minus ``memory_allocated``
after setup. Results: ``benchmarks/RESULTS_MEMORY.json`` and the tables of ``benchmarks/RESULTS_MEMORY.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# /proc/self/status readings, shared with the PPO step benchmark (benchmarks/ is on the path of a script run here)
from ppo_step.machine import reset_peak_rss as reset_peak
from ppo_step.machine import vm_kib as rss_kib

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """A Qwen2-shaped decoder (tied embeddings)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 151_936

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        """Parameters of the model (embedding tied to the LM head; Qwen2's q/k/v biases)."""
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * (self.hidden + 2 * kv) + (self.hidden + 2 * kv) + self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.vocab * self.hidden + self.layers * (attention + mlp + 2 * self.hidden) + self.hidden

    def lora_parameters(self, r: int) -> int:
        """LoRA on q_proj and v_proj (peft's default for Qwen2) of every layer."""
        kv = self.kv_heads * self.head_dim
        return self.layers * r * ((self.hidden + self.hidden) + (self.hidden + kv))

    def kv_bytes_per_row_token(self, dtype_bytes: int) -> int:
        """KV cache per row and token: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


SHAPES = {
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2000),
    "0.1B": Shape(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=2816),
    "0.5B": Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
}
QWEN25_7B = Shape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152_064)
"""Qwen2.5-7B's shape (untied LM head: its parameter count adds vocab x hidden)."""


@dataclass(frozen=True)
class Lever:
    """One configuration: the memory levers and the algorithm."""

    name: str
    dtype: str = "float32"
    checkpointing: bool = False
    micro: int | None = None  # rows per forward/backward; None: the mini-batch (8)
    chunk: int | None = None  # rows decoded at once; None: all 8
    grpo: bool = False


LEVERS = [
    Lever("fp32"), Lever("fp32 micro1", micro=1), Lever("fp32 ckpt", checkpointing=True),
    Lever("fp32 ckpt micro1", checkpointing=True, micro=1), Lever("bf16", dtype="bfloat16"),
    Lever("bf16 micro1", dtype="bfloat16", micro=1), Lever("bf16 ckpt", dtype="bfloat16", checkpointing=True),
    Lever("bf16 ckpt micro1 chunk2", dtype="bfloat16", checkpointing=True, micro=1, chunk=2),
    Lever("fp32 chunk2", chunk=2), Lever("grpo fp32", grpo=True),
    Lever("grpo bf16 ckpt micro1 chunk4", dtype="bfloat16", checkpointing=True, micro=1, chunk=4, grpo=True),
]
ROWS, PROMPT_TOKENS, RESPONSE_TOKENS, LORA_R, GRPO_K = 8, 32, 32, 16, 4


def build_model_dir(size: str, cache: Path = CACHE) -> Path:
    """The ``size`` model saved with ``save_pretrained`` (random weights, float32) and the embedded GPT-2
    tokenizer, built once."""
    path = cache / f"qwen2-{size}"
    if (path / "config.json").exists():  # built: no torch or transformers imported in this process for it
        return path
    import torch
    import transformers as tf
    from transformers import AutoTokenizer, GenerationConfig

    from lit_rlhf.models import resolve_model_path

    shape = SHAPES[size]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    eos = tokenizer.eos_token_id
    config = tf.Qwen2Config(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                            num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                            vocab_size=shape.vocab, tie_word_embeddings=True, max_position_embeddings=4096,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------------- worker (one configuration)


def worker_module(spec: dict[str, Any], lever: Lever):
    """The PPOModule of ``spec``'s configuration: LoRA r 16, RESPONSE_TOKENS per response, a reward with no model
    (the peaks are the policy's); GRPO with k = GRPO_K samples of ROWS / k prompts when ``lever.grpo``."""
    import torch

    from lit_rlhf.modules import PPOModule
    from lit_rlhf.rewards import Reward
    from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

    class LengthReward(Reward):  # no model: the peaks are the policy's
        def compute(self, prompts, responses, references):
            return torch.tensor([len(r) % 7 / 7.0 for r in responses])

    k = GRPO_K if lever.grpo else 1
    return PPOModule(
        spec["model_dir"], reward=LengthReward(), lora=LoraSettings(r=LORA_R, alpha=LORA_R),
        generation=GenerationSettings(min_new_tokens=RESPONSE_TOKENS, max_new_tokens=(RESPONSE_TOKENS, RESPONSE_TOKENS + 1),
                                      batch_size=lever.chunk),
        ppo=PPOSettings(advantage_estimator="grpo" if lever.grpo else "gae"), ppo_steps=1,
        rollout_batch_size=ROWS // k, mini_batch_size=ROWS, micro_batch_size=lever.micro, samples_per_prompt=k,
        dtype=lever.dtype, gradient_checkpointing=lever.checkpointing, log_samples_every=0, export_adapter=False,
        num_threads=spec["threads"],
    )


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One PPO (or GRPO) step of ``spec``'s configuration; memory after setup and the step's peak, in bytes."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(spec["threads"])
    lever, cuda = Lever(**spec["lever"]), spec["device"] == "cuda"
    k = GRPO_K if lever.grpo else 1
    module = worker_module(spec, lever)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1900, (ROWS // k, PROMPT_TOKENS), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query": ["prompt"] * (ROWS // k)}
    out: dict[str, Any] = {}

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            # safetensors maps the weights from the file: read every one, so the pages count as resident now and
            # not as the step's memory
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.sum()
            if cuda:
                torch.cuda.synchronize()
                out["after_setup"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                out["after_setup"] = rss_kib("VmRSS") * 1024
                out["peak_reset"] = reset_peak()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
                out["peak"] = torch.cuda.max_memory_allocated()
            elif out["peak_reset"]:
                out["peak"] = rss_kib("VmHWM") * 1024
            else:
                out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out["seconds"] = time.perf_counter() - self.start

    trainer = L.Trainer(accelerator="cuda" if cuda else "cpu", devices=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Watch()])
    trainer.fit(module, DataLoader([batch], batch_size=None))
    params = list(module.policy.parameters())
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in params)
    out["trainable"] = sum(p.numel() for p in params if p.requires_grad)
    out["step_extra"] = out["peak"] - out["after_setup"]
    return out


# ---------------------------------------------------------------------------------- parent: runs, fit, report


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (size, lever) in a fresh process; the results in order."""
    sizes = ["tiny"] if args.tiny else args.sizes.split(",")
    levers = [lever for lever in LEVERS if not args.levers or lever.name in args.levers.split(",")]
    results = []
    for size in sizes:
        model_dir = build_model_dir(size, Path(args.cache))
        for lever in levers:
            spec = {"model_dir": str(model_dir), "lever": asdict(lever), "device": args.device, "threads": args.threads}
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"{size} {lever.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            record = {"size": size, "lever": lever.name, **asdict(lever), **json.loads(lines[-1][7:])}
            print(f"{size:>5} {lever.name:<32} extra {record['step_extra'] / MIB:9.1f} MiB  after setup "
                  f"{record['after_setup'] / MIB:9.1f} MiB  {record['seconds']:.1f} s", flush=True)
            results.append(record)
            Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")  # kept if a later run fails
    return results


def per_token_slopes(results: list[dict[str, Any]]) -> dict[tuple[str, str, bool], float]:
    """Bytes per token of one update pass, from the micro-batch 8 vs 1 pairs: (extra_8 - extra_1) / (7 rows x
    tokens per row), keyed by (size, dtype, checkpointing). PPO runs only."""
    by: dict[tuple, dict[str, Any]] = {}
    for r in results:  # a rollout chunk changes the decode, not the update pass: used where no run without one
        key = (r["size"], r["dtype"], r["checkpointing"], r["micro"])
        if not r["grpo"] and (key not in by or r["chunk"] is None):
            by[key] = r
    tokens = (ROWS - 1) * (PROMPT_TOKENS + RESPONSE_TOKENS)
    return {(size, dtype, ckpt): (by[(size, dtype, ckpt, None)]["step_extra"] - one["step_extra"]) / tokens
            for (size, dtype, ckpt, micro), one in by.items() if micro == 1 and (size, dtype, ckpt, None) in by}


def fit_activation_model(slopes: dict[tuple[str, str, bool], float]) -> dict[tuple[str, bool], tuple[float, float]]:
    """Per (dtype, checkpointing): bytes per token = a x (layers x hidden) + b x vocab, solved from the sizes
    measured (least squares; two sizes give an exact solve). The layer term holds what autograd keeps per block,
    the vocabulary term the float32 logits, log-softmax and their gradient."""
    import numpy as np

    model = {}
    for dtype in ("float32", "bfloat16"):
        for ckpt in (False, True):
            points = [(SHAPES[s], v) for (s, d, c), v in slopes.items() if d == dtype and c == ckpt]
            if len(points) < 2:
                continue
            a = np.array([[shape.layers * shape.hidden, shape.vocab] for shape, _ in points], dtype=float)
            y = np.array([v for _, v in points], dtype=float)
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            model[(dtype, ckpt)] = (float(coef[0]), float(coef[1]))
    return model


def predict_7b(model: dict[tuple[str, bool], tuple[float, float]], gpu_gib: float = 80.0) -> list[dict[str, Any]]:
    """Qwen2.5-7B, LoRA r 16, 16 prompts x 4 samples = 64 rows of 512 + 512 tokens: weights + optimizer state
    + the larger of the rollout's KV cache (rows decoded at once) and one update pass (rows per pass x 1024
    tokens x bytes per token), for the lever combinations of interest."""
    shape, rows, tokens = QWEN25_7B, 64, 1024
    params = shape.parameters() + shape.vocab * shape.hidden  # untied LM head
    trainable = shape.lora_parameters(16)
    optimizer = trainable * 4 * 4  # float32 weight, gradient, AdamW's two moments
    out = []
    for dtype, ckpt, micro, chunk in (("float32", False, 8, 64), ("bfloat16", False, 8, 64), ("bfloat16", True, 8, 64),
                                      ("bfloat16", True, 1, 64), ("bfloat16", True, 1, 16), ("bfloat16", False, 1, 16)):
        if (dtype, ckpt) not in model:
            continue
        a, b = model[(dtype, ckpt)]
        nbytes = 4 if dtype == "float32" else 2
        weights = params * nbytes
        kv = chunk * tokens * shape.kv_bytes_per_row_token(nbytes) + chunk * shape.vocab * 4 * 2
        update = micro * tokens * (a * shape.layers * shape.hidden + b * shape.vocab)
        peak = weights + optimizer + max(kv, update)
        out.append({"dtype": dtype, "checkpointing": ckpt, "micro_batch": micro, "rollout_chunk": chunk,
                    "weights_gib": weights / GIB, "kv_gib": kv / GIB, "update_gib": update / GIB,
                    "peak_gib": peak / GIB, "fits": peak < gpu_gib * GIB * 0.9})
    return out


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    slopes = per_token_slopes(results)
    model = fit_activation_model(slopes)
    lines = [
        "# Peak memory of one PPO / GRPO step, with each lever on and off",
        "",
        f"Generated by `benchmarks/bench_memory.py{' --tiny' if args.tiny else ''} --device {args.device} "
        f"--threads {args.threads}` ({time.strftime('%Y-%m-%d')}). Each row is a fresh process; "
        f"{ROWS} rows of {PROMPT_TOKENS} prompt + {RESPONSE_TOKENS} response tokens, LoRA r {LORA_R}, mini-batch "
        f"{ROWS}. *extra*: the step's peak minus the memory after setup (weights loaded); "
        f"{'CPU RSS' if args.device == 'cpu' else 'torch.cuda.max_memory_allocated'}.",
        "",
        "| model | levers | weights (MiB) | after setup (MiB) | step extra (MiB) | step (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['size']} | {r['lever']} | {r['weight_bytes'] / MIB:.0f} | {r['after_setup'] / MIB:.0f} | "
                     f"{r['step_extra'] / MIB:.0f} | {r['seconds']:.1f} |")
    lines += ["", "## Update pass: bytes per token (micro-batch 8 vs 1)", "",
              "| model | dtype | checkpointing | bytes / token |", "|---|---|---|---:|"]
    lines += [f"| {s} | {d} | {c} | {v:,.0f} |" for (s, d, c), v in sorted(slopes.items())]
    lines += ["", "Fitted: bytes per token = a x (layers x hidden) + b x vocab", "",
              "| dtype | checkpointing | a | b |", "|---|---|---:|---:|"]
    lines += [f"| {d} | {c} | {a:.2f} | {b:.2f} |" for (d, c), (a, b) in sorted(model.items())]
    prediction = predict_7b(model)
    if prediction:
        lines += ["", "## Predicted: Qwen2.5-7B, LoRA r 16, 16 prompts x 4 samples, 512 + 512 tokens, one 80 GB GPU",
                  "", "| base dtype | checkpointing | rows per pass | rows decoded at once | weights | KV cache + "
                  "logits | update pass | peak (GiB) | fits (< 72 GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {p['dtype']} | {p['checkpointing']} | {p['micro_batch']} | {p['rollout_chunk']} | "
                  f"{p['weights_gib']:.1f} | {p['kv_gib']:.1f} | {p['update_gib']:.1f} | {p['peak_gib']:.1f} | "
                  f"{'yes' if p['fits'] else 'no'} |" for p in prediction]
    lines += ["", "The fit has as many points as sizes measured (two: an exact solve, not a check). What the numbers say, "
              "and the limits of the 7B prediction: README.md, section \"Bigger models\"."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="a 1M-parameter Qwen2 shape: a smoke test")
    parser.add_argument("--sizes", default="0.1B,0.5B", help="comma-separated: tiny, 0.1B, 0.5B")
    parser.add_argument("--levers", default="", help="comma-separated lever names (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    parser.add_argument("--out", default=str(HERE / "RESULTS_MEMORY"), help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.render:
        results = json.loads(Path(args.out + ".json").read_text())
    else:
        results = run_all(args)
    Path(args.out + ".md").write_text(render(results, args))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
