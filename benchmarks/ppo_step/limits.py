"""The FLOP limit of a PPO (or GRPO) step and the bandwidth and FLOP limits of one step of the cached decode loop."""

from __future__ import annotations

import statistics
from typing import Any

from ppo_step.settings import PHASES, PPO, ModelSize


def forward_flops(size: ModelSize, prompt: int, response: int, lora_r: int, value_head: bool = True) -> dict[str, float]:
    """Matmul FLOPs (2 m n k) of one teacher-forced forward of one sequence: encoder over ``prompt`` tokens,
    decoder over ``response`` tokens (causal self-attention counted as the lower triangle), lm_head, value head
    (if any). LoRA on q and v of every attention. Returns the total, the encoder's share (``encoder``: shared by
    the k samples of one prompt in generation) and the LoRA weights' share (for their gradient)."""
    d, f, a, L, V = size.d_model, size.d_ff, size.inner, size.num_layers, size.vocab_size
    P, T = prompt, response
    lora = 2 * (d * lora_r + lora_r * a)  # per token per adapted projection
    enc = L * (P * (4 * 2 * d * a + 3 * 2 * d * f + 2 * lora) + 2 * 2 * P * P * a)
    dec_self = L * (T * (4 * 2 * d * a + 2 * lora) + 2 * 2 * a * T * (T + 1) / 2)
    dec_cross = L * (T * 2 * 2 * d * a + P * 2 * 2 * d * a + 2 * 2 * T * P * a + (T + P) * lora)
    dec_ffn = L * T * 3 * 2 * d * f
    head = T * 2 * d * V + (T * 2 * d if value_head else 0)
    lora_total = L * (P * 2 * lora + T * 2 * lora + (T + P) * lora)
    return {"total": enc + dec_self + dec_cross + dec_ffn + head, "encoder": enc, "lora": lora_total}


def step_flops(size: ModelSize, prompts: list[int], responses: list[int], lora_r: int,
               samples_per_prompt: int = 1) -> dict[str, float]:
    """Least matmul work of one PPO step: generation = one forward (KV cache: every token once), reference = one
    forward, update = two forwards (activation gradients through the frozen weights; no weight gradients for
    them) plus the LoRA weight gradients.

    prompts: [B] prompt tokens of every response (B = prompts x ``samples_per_prompt``, the samples of one
    prompt contiguous); responses: [B] response tokens. With k = ``samples_per_prompt`` > 1 (GRPO: no value
    head) generation runs the encoder once per prompt; the teacher-forced passes run it for every row."""
    k = samples_per_prompt
    fwd = [forward_flops(size, p, t, lora_r, value_head=k == 1) for p, t in zip(prompts, responses)]
    one = sum(x["total"] for x in fwd)
    lora = sum(x["lora"] for x in fwd)
    shared_encoder = sum(x["encoder"] for i, x in enumerate(fwd) if i % k) if k > 1 else 0.0
    return {"generate": one - shared_encoder, "forward": one, "update": 2 * one + lora}


def decode_step_cost(size: ModelSize, rows: int, position: int, prompt: int, lora_r: int, weight_bytes: int,
                     value_head: bool = True) -> dict[str, float]:
    """Least work of one step of the KV-cached decode loop: ``rows`` rows at decoder position ``position`` (0: the
    decoder start token), cross-attending to ``prompt`` encoder positions (the batch's padded prompt width).

    flops: matmul FLOPs (2 m n k) of every row: self-attention q, k, v, o and attention over position + 1 keys,
    cross-attention q, o (its k, v are cached) and attention over ``prompt`` keys, the gated FFN, lm_head, LoRA
    on self q, v and cross q, the value head. bytes: what the step must read at least: those weights once
    (``weight_bytes`` per element; LoRA and the value head in fp32), plus each row's KV cache (self: position +
    1 keys and values, cross: ``prompt`` keys and values, ``weight_bytes`` per element: the cache holds
    activations of the weights' dtype). The first step also computes the cross-attention k, v: not counted."""
    d, f, a, L, V, r = size.d_model, size.d_ff, size.inner, size.num_layers, size.vocab_size, lora_r
    layer_weights = 6 * d * a + 3 * d * f  # self q k v o, cross q o, FFN wi_0 wi_1 wo
    lora = 3 * (d * r + r * a)  # self q, self v, cross q: per layer
    head = d * V
    value = d if value_head else 0  # its weights (and bias) in bytes and FLOPs
    weights = (L * layer_weights + head) * weight_bytes + (L * lora + value + (1 if value_head else 0)) * 4
    kv = L * rows * 2 * a * (position + 1 + prompt) * weight_bytes
    attention = 2 * 2 * a * (position + 1 + prompt)  # scores and weighted values, self + cross, per row per layer
    per_row = L * (2 * layer_weights + 2 * lora + attention) + 2 * head + 2 * value
    return {"flops": rows * per_row, "bytes": weights + kv, "weight_bytes": weights, "kv_bytes": kv}


def decode_rows_summary(steps: list[list[float]], rows: int, size: ModelSize, dtype: str, read_gbps: float,
                        gemm_gflops: float, lora_r: int = PPO.lora_r, value_head: bool = True) -> dict[str, float] | None:
    """The measured decode steps with ``rows`` rows against their two limits. steps: [rows, position, prompt,
    seconds] per step. Returns the step count, the mean position, and in milliseconds (means over the steps):
    measured, bandwidth limit (bytes ÷ ``read_gbps``), FLOP limit (FLOPs ÷ ``gemm_gflops``, the rate of a
    [rows, d_model] x [d_model, d_ff] GEMM), and measured ÷ the larger limit; None if no step had ``rows``."""
    picked = [s for s in steps if int(s[0]) == rows]
    if not picked:
        return None
    width = 2 if dtype == "bfloat16" else 4
    costs = [decode_step_cost(size, rows, int(s[1]), int(s[2]), lora_r, width, value_head) for s in picked]
    n = len(picked)
    out = {"steps": n, "position": sum(s[1] for s in picked) / n, "prompt": sum(s[2] for s in picked) / n,
           "measured_ms": 1e3 * sum(s[3] for s in picked) / n,
           "mb_read": sum(c["bytes"] for c in costs) / n / 1e6,
           "bandwidth_ms": 1e3 * sum(c["bytes"] for c in costs) / n / (read_gbps * 1e9),
           "flop_ms": 1e3 * sum(c["flops"] for c in costs) / n / (gemm_gflops * 1e9)}
    out["ratio"] = out["measured_ms"] / max(out["bandwidth_ms"], out["flop_ms"])
    return out


def flop_limit(work: dict[str, Any], size: ModelSize, rate: float, warmup: int, samples_per_prompt: int = 1) -> dict[str, float]:
    """The measured steps' FLOP limit (median seconds per phase at ``rate`` FLOP/s). ``samples_per_prompt`` k > 1:
    GRPO's step on the same batches, each batch's first B / k prompts sampled k times (``grpo_batches``)."""
    per_step = []
    measured = work["batches"][warmup : len(work["batches"]) - (1 if work["profile_batch"] else 0)]
    k = samples_per_prompt
    for b in measured:
        prompts = [int(n) for n in b["attention_mask"].sum(1)]
        prompts = [prompts[i // k] for i in range(len(prompts))]  # row i answers prompt i // k (k = 1: itself)
        flops = step_flops(size, prompts, [int(n) for n in b["lengths"]], PPO.lora_r, k)
        per_step.append({**{k: v / rate for k, v in flops.items()}, "flops": sum(flops.values()),
                         "tokens": int(b["lengths"].sum())})
    summary = {p: statistics.median(s.get(p, 0.0) for s in per_step) for p in PHASES}
    summary["total"] = statistics.median(s["generate"] + s["forward"] + s["update"] for s in per_step)
    summary["tflop"] = statistics.median(s["flops"] for s in per_step) / 1e12
    summary["tokens"] = statistics.median(s["tokens"] for s in per_step)
    summary["tok_per_s"] = summary["tokens"] / summary["total"]
    return summary
