"""The GRPO benchmark's model shapes (config-built Qwen2, random weights), its 32k byte-level BPE tokenizer, the
prompts (exactly ``PROMPT_TOKENS`` tokens each, the same ids after a decode/encode round trip, so that a system fed
text and one fed ids see the same tokens) and the step's matmul FLOP count."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROMPTS_PER_STEP = 4
SAMPLES = 4
PROMPT_TOKENS = 64
NEW_TOKENS = 64
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ("q_proj", "v_proj")
BETA = 0.04
LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class Shape:
    """A Qwen2 decoder (tied embeddings, as Qwen2.5-0.5B)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    "tiny": Shape("qwen2-tiny", 2000, 64, 2, 4, 2, 128),
    "40m": Shape("qwen2-40m", 32000, 512, 8, 8, 2, 1536),
    # Qwen2.5-0.5B's body with a 32k vocabulary
    "387m": Shape("qwen2-387m", 32000, 896, 24, 14, 2, 4864),
}


def build_model_dir(cache: Path, shape: Shape) -> Path:
    """Weights (seed 0), config and tokenizer under ``cache/<shape.name>``, built once; both systems load it."""
    path = cache / shape.name
    if (path / "bench_build.json").exists():
        return path
    import torch
    import transformers as tf

    from lit_rlhf.models import resolve_model_path
    from lit_rlhf.models.tiny import build_tokenizer

    if shape.name == "qwen2-tiny":  # the embedded tiny GPT-2's: the same kind of tokenizer, built once per cache
        tokenizer = tf.AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    else:
        tokenizer = build_tokenizer(shape.vocab, "gpt2")  # byte-level BPE on the bundled DialogSum train split
    eos = tokenizer.eos_token_id
    config = tf.Qwen2Config(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                            num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                            vocab_size=shape.vocab, tie_word_embeddings=True, max_position_embeddings=1024,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config)
    model.generation_config = tf.GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    parameters = sum(p.numel() for p in model.parameters())
    (tmp / "bench_build.json").write_text(json.dumps({"shape": asdict(shape), "parameters": parameters}))
    tmp.rename(path)
    return path


def model_parameters(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "bench_build.json").read_text())["parameters"]


def build_prompts(model_dir: Path, n_steps: int, tokens: int = PROMPT_TOKENS) -> list[list[dict[str, Any]]]:
    """``n_steps`` batches of ``PROMPTS_PER_STEP`` prompts: DialogSum dialogues (bundled validation split) cut to
    ``tokens`` tokens, kept only when their text encodes back to exactly those ids. Each prompt: ids, text."""
    from transformers import AutoTokenizer

    from lit_rlhf.data.sources import load_bundled

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = load_bundled("dialogsum")["validation"]
    prompts: list[dict[str, Any]] = []
    for row in rows:
        ids = tokenizer(row["dialogue"], add_special_tokens=False)["input_ids"][:tokens]
        text = tokenizer.decode(ids)
        if len(ids) == tokens and tokenizer(text, add_special_tokens=False)["input_ids"] == ids:
            prompts.append({"ids": ids, "text": text})
        if len(prompts) == n_steps * PROMPTS_PER_STEP:
            break
    if len(prompts) < n_steps * PROMPTS_PER_STEP:
        raise RuntimeError(f"only {len(prompts)} round-trip-exact prompts of {tokens} tokens")
    return [prompts[i : i + PROMPTS_PER_STEP] for i in range(0, len(prompts), PROMPTS_PER_STEP)]


def forward_flops(shape: Shape, prompt: int, response: int, lora_r: int = LORA_R) -> dict[str, float]:
    """Matmul FLOPs (2 m n k) of one teacher-forced forward over ``prompt`` + ``response`` tokens: q k v o (grouped
    k, v), causal attention (lower triangle), the gated MLP, LoRA on q and v, and the LM head on the response
    positions only (the least a log-prob needs). ``prompt``: the first ``prompt`` tokens' share (the same for every
    sample of a prompt); ``lora``: the LoRA matmuls' share (their weight gradients cost as much again)."""
    d, f, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lora = 2 * (d * lora_r + lora_r * q) + 2 * (d * lora_r + lora_r * kv)  # per token per layer
    per_token = L * (2 * d * q + 2 * 2 * d * kv + 2 * q * d + 3 * 2 * d * f + lora)

    def attention(start: int, end: int) -> float:  # scores + weighted values of positions start..end-1
        return L * 2 * 2 * q * sum(pos + 1 for pos in range(start, end))

    total_tokens = prompt + response
    prompt_part = prompt * per_token + attention(0, prompt)
    response_part = response * per_token + attention(prompt, total_tokens) + response * 2 * d * V
    return {"total": prompt_part + response_part, "prompt": prompt_part, "lora": total_tokens * L * lora}


def step_flops(shape: Shape, prompts: int = PROMPTS_PER_STEP, samples: int = SAMPLES, prompt: int = PROMPT_TOKENS,
               response: int = NEW_TOKENS, lora_r: int = LORA_R) -> dict[str, float]:
    """Least matmul work of one GRPO step, by phase: generate = one forward per response with each prompt's
    tokens once (KV cache, prefix shared by its samples); scoring = the reference forward (on-policy: no old
    log-prob pass); update = forward + activation gradients (two forwards; frozen weights need no weight gradient)
    plus the LoRA weight gradients."""
    one = forward_flops(shape, prompt, response, lora_r)
    rows = prompts * samples
    return {"generate": rows * one["total"] - (rows - prompts) * one["prompt"],
            "scoring": rows * one["total"],
            "update": rows * (2 * one["total"] + one["lora"])}
