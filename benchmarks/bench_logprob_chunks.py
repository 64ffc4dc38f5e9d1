"""Benchmark: peak memory and time of the scoring pass and the update with ``model.logprob_chunk_size`` 0 (every
row's [rows, tokens, vocab] logits), 256 and 1024 (the LM head over that many positions at a time).

    OMP_NUM_THREADS=1 python benchmarks/bench_logprob_chunks.py           # Qwen2 shape, 151,936 tokens, 8 x 256
    python benchmarks/bench_logprob_chunks.py --tiny                      # smoke run: a 2,000-token vocabulary

Model: a Qwen2 shape built from its config (random weights, float32, tied embeddings) with a 151,936-token
vocabulary and two small layers (hidden 256), so that the logits dominate; the embedded GPT-2 tokenizer; LoRA r 16 on
the default targets and a value head, as PPO trains. Workload: 8 rows of 32 prompt + 256 response tokens (random
ids, every response token real): 2,048 positions, so that a chunk of 1,024 is half of them. Scoring pass:
``Policy.score`` of the rows (policy log-probs, values, reference log-probs with the adapter disabled), no gradient.
Update: ``Policy.forward_rows`` with the entropy (a diagnostic, as at the default ``entropy_coef`` 0), and the
backward of a PPO-like loss (log-probs, value loss).

Each chunk size runs in a fresh process (``--worker``). Per phase: first an untimed run under a
``TorchDispatchMode`` (also the warm-up) that records the largest tensor any op created whose last dimension is the
vocabulary (the logits, their gradient, a chunk of them); then ``--repeats`` runs for the peak (high-water RSS,
``/proc/self/status`` VmHWM reset just before, minus the RSS before; glibc's mmap threshold fixed as in
``bench_prefill_memory.py``, so that freed buffers leave RSS) and the median time. The log-prob sum and the loss
show that every setting computes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / ".cache"
CHUNKS = (0, 256, 1024)


def build_model_dir(vocab: int, hidden: int, layers: int) -> Path:
    """The Qwen2-shaped model saved with ``save_pretrained`` beside the embedded GPT-2 tokenizer, built once."""
    path = CACHE / f"qwen2-logits-v{vocab}-h{hidden}-l{layers}"
    if (path / "config.json").exists():
        return path
    import transformers as tf
    from transformers import AutoTokenizer, GenerationConfig

    from lit_rlhf.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    eos = tokenizer.eos_token_id
    config = tf.Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=2 * hidden, vocab_size=vocab, tie_word_embeddings=True,
                            max_position_embeddings=4096, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


def largest_logits(vocab: int, run) -> int:
    """Bytes of the largest tensor an op creates during ``run()`` whose last dimension is ``vocab`` (no views)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == vocab and not func.is_view:
                    self.largest = max(self.largest, t.numel() * t.element_size())
            return out
    with Recorder() as recorder:
        run()
    return recorder.largest


def worker(chunk: int, args: argparse.Namespace) -> dict:
    from ppo_step.machine import reset_peak_rss, vm_kib

    from lit_rlhf.models import Policy, ResponseBatch
    from lit_rlhf.settings import LoraSettings

    torch.set_num_threads(1)
    path = build_model_dir(args.vocab, args.hidden, args.layers)
    torch.manual_seed(0)
    policy = Policy(str(path), lora=LoraSettings(r=16, alpha=32), logprob_chunk_size=chunk)
    g = torch.Generator().manual_seed(1)
    rows = ResponseBatch(torch.randint(10, 1900, (args.rows, args.prompt), generator=g),
                         torch.ones(args.rows, args.prompt, dtype=torch.long),
                         torch.randint(10, 1900, (args.rows, args.response), generator=g),
                         torch.ones(args.rows, args.response, dtype=torch.long))
    idx = torch.arange(args.rows)
    sums = {}

    def scoring() -> None:
        scores = policy.score(rows, [idx])
        sums["logprobs"], sums["ref_logprobs"] = float(scores.logprobs.sum()), float(scores.ref_logprobs.sum())

    def update() -> None:
        policy.zero_grad(set_to_none=True)
        out, batch, _ = policy.forward_rows(rows, idx, with_entropy=True)
        mask = batch.response_mask
        loss = -(out.logprobs * mask).sum() + (out.values * mask).square().sum()
        (loss / mask.sum()).backward()
        sums["loss"] = float(loss)

    result = {"chunk": chunk}
    for name, run in (("scoring", scoring), ("update", update)):
        result[f"{name}_largest_logits_mib"] = largest_logits(args.vocab, run) / 2**20  # (the warm-up)
        before = vm_kib("VmRSS")
        reset_peak_rss()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        result[f"{name}_peak_mib"] = (vm_kib("VmHWM") - before) / 1024
        result[f"{name}_s"] = statistics.median(times)
    return {**result, **sums}


def table(results: list[dict], args: argparse.Namespace) -> str:
    logits_mib = args.rows * args.response * args.vocab * 4 / 2**20
    lines = [f"Qwen2 shape, vocabulary {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, float32, LoRA r 16 "
             f"+ value head; {args.rows} rows x ({args.prompt} prompt + {args.response} response) tokens: one "
             f"[rows, tokens, vocab] float32 logits tensor is {logits_mib:,.0f} MiB. Peak: RSS high-water mark "
             f"minus RSS before, MiB; time: median of {args.repeats}, s.", "",
             "| logprob_chunk_size | scoring peak | scoring largest logits | scoring s | update peak "
             "| update largest logits | update s | log-prob sum | loss |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['chunk']} | {r['scoring_peak_mib']:,.0f} | {r['scoring_largest_logits_mib']:,.1f} | "
                     f"{r['scoring_s']:.3f} | {r['update_peak_mib']:,.0f} | {r['update_largest_logits_mib']:,.1f} | "
                     f"{r['update_s']:.3f} | {r['logprobs']:.4f} | {r['loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("vocab", 151_936), ("hidden", 256), ("layers", 2), ("rows", 8), ("prompt", 32),
                          ("response", 256), ("repeats", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--chunks", default=",".join(map(str, CHUNKS)))
    parser.add_argument("--tiny", action="store_true", help="a 2,000-token vocabulary, hidden 64, 64 tokens")
    parser.add_argument("--worker", type=int)
    args = parser.parse_args()
    if args.tiny:
        args.vocab, args.hidden, args.response = 2000, 64, 64
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args)))
        return
    from bench_prefill_memory import FIXED_MMAP

    build_model_dir(args.vocab, args.hidden, args.layers)  # once, before the timed processes
    passed = [f"--{n}={getattr(args, n)}" for n in ("vocab", "hidden", "layers", "rows", "prompt", "response", "repeats")]
    results = []
    for chunk in map(int, args.chunks.split(",")):
        out = subprocess.run([sys.executable, __file__, "--worker", str(chunk), *passed], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **FIXED_MMAP})
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(table(results, args))


if __name__ == "__main__":
    main()
