"""Benchmark: one PPO step's speed and memory for lit_rlhf (fast_rollout, the default, and exact mode), TRL
0.11.4 (batched and the recipe's loop), a hand-written bare-PyTorch floor, and the FLOP limit of the step on this
machine; beside them lit_rlhf's GRPO step (4 prompts x 4 samples: the same 16 responses, no value head). With
``--dtype bfloat16`` every system keeps its frozen weights in bf16 (trained weights fp32) and the FLOP limit
divides by the bf16 GEMM rate. lit_rlhf's cached decode loop is timed step by step against its bandwidth and
FLOP limits.

    python benchmarks/bench_ppo_step.py                       # workload A and B, all systems
    python benchmarks/bench_ppo_step.py --workload A --steps 3 --threads 1 --profile
    python benchmarks/bench_ppo_step.py --workload B --steps 2 --threads 1 --dtype bfloat16
    python benchmarks/bench_ppo_step.py --tiny --systems lit_rlhf,lit_rlhf_fast,floor   # smoke test, seconds

Model: the flan-t5-base architecture built from its config with random weights (untied lm_head, 247,577,856
parameters) plus a LoRA adapter (r 32, alpha 32, dropout 0.05 on q and v: 3,538,944) and a value head (769),
saved once with ``save_pretrained`` into the cache folder so that every system loads the same weights from a
local path. Rollout batch 16, mini-batch 4, 1 PPO epoch, AdamW lr 1.41e-5, fp32 (or bf16 frozen weights),
sampling top_k 0 / top_p 1.
GRPO (``lit_rlhf_grpo``): each batch's first 4 prompts sampled 4 times (the 16 lengths of PPO's step), mini-batch
4, fast_rollout, the recipe's GRPO settings (configs/detox_flan_t5_grpo.yaml), no value head.

Workloads (prompts and response lengths are made once by the parent process and saved to a file that every
system reads, so all systems get the same prompts, in the same order, with the same lengths):

* A: prompts of exactly 200 tokens, exactly 32 new tokens per response.
* B: the recipe's DialogSum prompts (200 < chars <= 1000, its template), tokenized by a 32128-entry tokenizer
  trained on the bundled train split; response lengths drawn per sample from [100, 400) with one seed.
* Warm-up steps (``--warmup``, not measured) use the same kind of prompts with 32 new tokens per response.

In both, end-of-sequence is blocked until each row's own length (min = max new tokens), so every system
generates exactly the same number of tokens.

Each system runs in its own process (TRL in its own virtual environment, ``benchmarks/.venv-trl``, built on
demand). The first ``--warmup`` steps are not measured; the report gives medians over ``--steps`` steps.
See benchmarks/README.md for what each system does and how lengths are forced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CACHE = HERE / ".cache"
TRL_VENV = HERE / ".venv-trl"
TRL_PINS = ["trl==0.11.4", "transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0"]
TORCH_PIN = "torch==2.13.0"

SYSTEMS = ("lit_rlhf", "lit_rlhf_fast", "lit_rlhf_grpo", "trl_batched", "trl_loop", "floor")
LIT_SYSTEMS = ("lit_rlhf", "lit_rlhf_fast", "lit_rlhf_grpo")
LIT_PPO_SYSTEMS = ("lit_rlhf", "lit_rlhf_fast")  # the PPO variants the goals are checked for
SYSTEM_LABELS = {
    "lit_rlhf": "lit_rlhf PPOModule exact (fast_rollout false)",
    "lit_rlhf_fast": "lit_rlhf PPOModule (fast_rollout, default)",
    "lit_rlhf_grpo": "lit_rlhf GRPO k 4 fast_rollout",
    "trl_batched": "TRL 0.11.4 batched generate",
    "trl_loop": "TRL 0.11.4 recipe loop",
    "floor": "bare PyTorch floor",
    "flop_limit": "FLOP limit",
    "flop_limit_grpo": "FLOP limit GRPO k 4",
}
DTYPES = ("float32", "bfloat16")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}
PHASES = ("generate", "reward", "forward", "advantages", "update", "other")
LIT_PHASES = {  # lit_rlhf's module.timings keys -> report phases
    "time/ppo/generate": "generate",
    "time/ppo/reward": "reward",
    "time/ppo/forward": "forward",
    "time/ppo/advantages": "advantages",
    "time/ppo/update": "update",
}


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ModelSize:
    """The T5 architecture under test."""

    name: str
    vocab_size: int
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    d_kv: int

    @property
    def inner(self) -> int:  # attention width h * d_kv
        return self.num_heads * self.d_kv


FLAN_T5_BASE = ModelSize("flan-t5-base", 32128, 768, 2048, 12, 12, 64)
TINY_T5 = ModelSize("tiny-t5", 2000, 64, 256, 2, 4, 16)  # lit_rlhf.models.tiny.build_tiny_t5's defaults
FLAN_T5_BASE_PARAMETERS = 247_577_856
LORA_PARAMETERS = 3_538_944  # 72 adapted Linear layers (q, v of enc self, dec self, dec cross) x 2 x 768 x 32
VALUE_HEAD_PARAMETERS = 769


@dataclass(frozen=True)
class PPOShape:
    """What one PPO step does, the same for every system."""

    rollout_batch: int = 16
    mini_batch: int = 4
    ppo_epochs: int = 1
    learning_rate: float = 1.41e-5
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q", "v")
    vf_coef: float = 0.1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    kl_coef: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95


PPO = PPOShape()
# GRPO beside PPO: the same 16 responses per step from 4 prompts x 4 samples (each batch's first 4 prompts; the
# 4 samples of prompt j get the lengths of rows 4j..4j+3), mini-batch 4; the recipe's settings
# (configs/detox_flan_t5_grpo.yaml): k3 KL in the loss, beta 0.04 fixed, per-sequence loss mean; no value head.
GRPO_SAMPLES_PER_PROMPT = 4
GRPO_SETTINGS = dict(advantage_estimator="grpo", kl_in_loss=True, init_kl_coef=0.04, adaptive_kl=False,
                     loss_aggregation="sequence_mean")
WORKLOAD_A_PROMPT_TOKENS = 200
# New tokens per response, [low, high) as the recipe's LengthSampler and lit_rlhf's max_new_tokens; --tiny
# shortens them so that the smoke run takes seconds.
NEW_TOKENS = {"A": (32, 33), "B": (100, 400)}
NEW_TOKENS_TINY = {"A": (8, 9), "B": (8, 24)}
# Warm-up steps (not measured) generate this many tokens per response: a full-length workload-B warm-up would
# cost as much as a measured step. The measured steps' draws start from the seed, whatever the warm-up.
WARMUP_NEW_TOKENS = 32
WARMUP_NEW_TOKENS_TINY = 8
LENGTH_SEED = 0
DATA_SEED = 0


# ---------------------------------------------------------------------------------------------- small utilities


def log(msg: str) -> None:
    print(msg, flush=True)


def vm_kib(field_name: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryWatch:
    """Peak RSS of the setup (model loading) and of the steps, from /proc/self/status VmHWM."""

    def __init__(self) -> None:
        self.setup_peak_kib = 0
        self.steps_peak_kib = 0
        self.reset_ok = False
        self.rss_after_setup_kib = 0

    def start_steps(self) -> None:
        self.setup_peak_kib = vm_kib("VmHWM")
        self.rss_after_setup_kib = vm_kib("VmRSS")
        self.reset_ok = reset_peak_rss()

    def end_steps(self) -> None:
        self.steps_peak_kib = vm_kib("VmHWM")

    def report(self) -> dict[str, Any]:
        mib = 1 / 1024
        return {
            "rss_after_setup_mib": self.rss_after_setup_kib * mib,
            "setup_peak_mib": self.setup_peak_kib * mib,
            # without the reset, VmHWM after the steps is the whole process's peak
            "steps_peak_mib": self.steps_peak_kib * mib if self.reset_ok else float("nan"),
            "process_peak_mib": max(self.setup_peak_kib, self.steps_peak_kib) * mib,
            "peak_reset_ok": self.reset_ok,
        }


@contextmanager
def timed(store: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    store[name] = store.get(name, 0.0) + time.perf_counter() - start


GEMM_REPEATS = 20
GEMM_REPEATS_TINY = 3  # --tiny: the rates are printed, not compared
DECODE_ROWS = (16, 8, 4, 1)  # rows still decoding at which the decode-step table compares steps with their limits
BANDWIDTH_MIB = 512  # the read-bandwidth tensor (fp32), far larger than the caches
BANDWIDTH_MIB_TINY = 64
BANDWIDTH_REPEATS = 20  # one pass over 512 MiB takes ~50 ms: on a shared machine most passes are interrupted


def best_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """The shortest of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rate(threads: int, n: int = 2048, repeats: int = GEMM_REPEATS, dtype: str = "float32",
              shape: tuple[int, int, int] | None = None) -> float:
    """Best GEMM rate (FLOP/s) of an [m, k] x [k, n] matmul with ``dtype`` inputs on ``threads`` threads;
    ``shape`` (m, k, n), default n x n x n."""
    import torch

    torch.set_num_threads(threads)
    m, k, n = shape or (n, n, n)
    a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
    return 2 * m * k * n / best_seconds(lambda: a @ b, repeats)


def read_bandwidth(threads: int, mib: int = BANDWIDTH_MIB, repeats: int = BANDWIDTH_REPEATS) -> float:
    """Best memory read rate (bytes/s): ``sum`` over an fp32 tensor of ``mib`` MiB on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.full((mib * 2**18,), 1.0)
    return x.numel() * 4 / best_seconds(x.sum, repeats, warmup=1)


def machine_rates(threads: int, dtype: str, size: ModelSize, tiny: bool) -> dict[str, Any]:
    """What the limits divide by, measured now: the 2048 x 2048 GEMM rate in fp32 and in bf16 (GFLOP/s), the
    read bandwidth (GB/s), and the GEMM rate of one decode step's shapes in ``dtype``: [b, d_model] x
    [d_model, d_ff] for each b of DECODE_ROWS."""
    repeats = GEMM_REPEATS_TINY if tiny else GEMM_REPEATS
    rows = {str(b): gemm_rate(threads, repeats=10 * repeats, dtype=dtype, shape=(b, size.d_model, size.d_ff)) / 1e9
            for b in DECODE_ROWS}
    bandwidth = read_bandwidth(threads, BANDWIDTH_MIB_TINY, 3) if tiny else read_bandwidth(threads)
    return {"gemm_gflops": gemm_rate(threads, repeats=repeats) / 1e9,
            "gemm_gflops_bf16": gemm_rate(threads, repeats=repeats, dtype="bfloat16") / 1e9,
            "read_gbps": bandwidth / 1e9,
            "gemm_rows_gflops": rows}


# ---------------------------------------------------------------------------------------------- rewards (every system)


def stub_scores(responses: list[str], cost_s: float) -> "torch.Tensor":
    """Deterministic pseudo-scores in [-0.5, 0.5) at a fixed cost (``cost_s`` seconds of sleep, default 0)."""
    import torch

    if cost_s > 0:
        time.sleep(cost_s)
    return torch.tensor([(sum(map(ord, r)) % 1000) / 1000 - 0.5 for r in responses], dtype=torch.float32)


class ClassifierScorer:
    """The recipe's reward shape: a RoBERTa-base-sized classifier (random weights, built from its config) reading
    prompt + response, batch 16, the ``nothate`` logit (label 0). Texts are truncated to 512 tokens."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval().requires_grad_(False)
        self.torch = torch

    def __call__(self, prompts: list[str], responses: list[str]) -> "torch.Tensor":
        texts = [p + r for p, r in zip(prompts, responses)]  # the recipe's query + response
        with self.torch.inference_mode():
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
            return self.model(**enc).logits[:, 0].float().clone()


def make_scorer(args: argparse.Namespace) -> Callable[[list[str], list[str]], "torch.Tensor"]:
    if args.reward == "classifier":
        return ClassifierScorer(args.classifier_dir)
    return lambda prompts, responses: stub_scores(responses, args.reward_cost_s)


# ---------------------------------------------------------------------------------------------- model and data (parent)


def t5_config(size: ModelSize, tokenizer) -> "T5Config":
    from transformers import T5Config

    return T5Config(
        vocab_size=size.vocab_size, d_model=size.d_model, d_ff=size.d_ff, d_kv=size.d_kv,
        num_layers=size.num_layers, num_decoder_layers=size.num_layers, num_heads=size.num_heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
        # FLAN-T5's config says False; transformers 5 reads it as "do not scale decoder outputs" and still ties
        # lm_head to the embedding when building from a config: lm_head is untied below.
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def build_model_dir(cache: Path, tiny: bool) -> Path:
    """The model every system loads (built once, then reused): weights, config and tokenizer."""
    if tiny:
        from lit_rlhf.models import build_tiny_t5

        return Path(build_tiny_t5(str(cache / "tiny-t5")))
    path = cache / "flan-t5-base-random"
    if (path / "bench_build.json").exists():
        return path
    import torch
    from transformers import GenerationConfig, T5ForConditionalGeneration

    from lit_rlhf.models import build_tokenizer

    start = time.perf_counter()
    tokenizer = build_tokenizer(FLAN_T5_BASE.vocab_size, "t5")
    tokenizer_s = time.perf_counter() - start
    log(f"trained the {len(tokenizer)}-entry tokenizer on the bundled DialogSum train split in {tokenizer_s:.1f} s")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(t5_config(FLAN_T5_BASE, tokenizer))
        model.lm_head.weight = torch.nn.Parameter(torch.randn(len(tokenizer), FLAN_T5_BASE.d_model) * FLAN_T5_BASE.d_model**-0.5)
    count = sum(p.numel() for p in model.parameters())
    if count != FLAN_T5_BASE_PARAMETERS:
        raise RuntimeError(f"built {count:,} parameters, expected flan-t5-base's {FLAN_T5_BASE_PARAMETERS:,}")
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "bench_build.json").write_text(json.dumps({"parameters": count, "tokenizer_train_s": tokenizer_s}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def build_classifier_dir(cache: Path, model_dir: Path, tiny: bool) -> Path:
    """A RoBERTa-base-sized sequence classifier (labels nothate / hate) from its config, random weights, with the
    policy's tokenizer (the classifier's cost is in its layers, not in which tokenizer feeds it)."""
    path = cache / ("roberta-tiny-classifier" if tiny else "roberta-base-classifier-random")
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else {}
    config = RobertaConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1}, **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RobertaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def quantiles(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))])

    return {"n": len(ordered), "min": ordered[0], "p10": q(0.1), "p50": q(0.5), "p90": q(0.9),
            "max": ordered[-1], "mean": sum(ordered) / len(ordered)}


def workload_prompts(name: str, model_dir: Path, n_batches: int) -> tuple[list[dict[str, Any]], list[int]]:
    """``n_batches`` collated batches of prompts of workload ``name`` (see ``build_workload``) and the prompt
    tokens of every candidate prompt."""
    import torch

    import datasets

    from lit_rlhf.data import DialogSumDataModule

    datasets.disable_progress_bars()
    batch = PPO.rollout_batch
    if name == "B":
        dm = DialogSumDataModule(model_name=str(model_dir), batch_size=batch, shuffle=True, seed=DATA_SEED)
        dm.setup("fit")
        loader = iter(dm.train_dataloader())
        return [next(loader) for _ in range(n_batches)], [len(ids) for ids in dm.train_set["input_ids"]]
    dm = DialogSumDataModule(
        model_name=str(model_dir), min_chars=0, max_chars=10**9, max_prompt_tokens=WORKLOAD_A_PROMPT_TOKENS,
        batch_size=batch, shuffle=True, seed=DATA_SEED,
    )
    dm.setup("fit")
    rows = [r for r in dm.train_set if len(r["input_ids"]) == WORKLOAD_A_PROMPT_TOKENS]
    if len(rows) < batch * n_batches:
        raise RuntimeError(f"only {len(rows)} prompts have {WORKLOAD_A_PROMPT_TOKENS} tokens")
    gen = torch.Generator().manual_seed(DATA_SEED)
    order = torch.randperm(len(rows), generator=gen)[: batch * n_batches].tolist()
    batches = [dm.collator([rows[i] for i in order[k * batch : (k + 1) * batch]]) for k in range(n_batches)]
    return batches, [WORKLOAD_A_PROMPT_TOKENS] * len(rows)


def build_workload(name: str, model_dir: Path, cache: Path, n_batches: int, tiny: bool, warmup: int,
                   profile_batch: bool = False) -> dict[str, Any]:
    """Prompts and per-sample response lengths of ``n_batches`` PPO steps, saved for every system to read.

    A: DialogSum prompts (recipe template) truncated by the data module to 200 tokens, keeping those that
       have exactly 200 (shuffled with seed 0); 32 new tokens each.
    B: the recipe's prompts from lit_rlhf's DialogSumDataModule (its filter, template, shuffle with seed 0).
    Lengths are drawn per sample with ``torch.randint(low, high, (16,), generator=Generator().manual_seed(0))``,
    one draw per measured step in order ([32, 33) always draws 32); the ``warmup`` first batches get
    WARMUP_NEW_TOKENS per response.
    """
    import torch

    batch = PPO.rollout_batch
    batches, all_lengths = workload_prompts(name, model_dir, n_batches)
    low, high = (NEW_TOKENS_TINY if tiny else NEW_TOKENS)[name]
    warmup_tokens = WARMUP_NEW_TOKENS_TINY if tiny else WARMUP_NEW_TOKENS
    gen = torch.Generator().manual_seed(LENGTH_SEED)
    for k, b in enumerate(batches):
        if k < warmup:
            b["lengths"] = torch.full((batch,), warmup_tokens, dtype=torch.long)
        else:
            b["lengths"] = torch.randint(low, high, (batch,), generator=gen)
    measured = batches[warmup : len(batches) - (1 if profile_batch else 0)]
    work = {
        "name": name,
        "batches": [{k: b[k] for k in ("input_ids", "attention_mask", "query", "lengths")} for b in batches],
        "prompt_tokens_all": quantiles(all_lengths),
        # the measured steps only (not the warm-up or the profiled extra step)
        "prompt_tokens_used": quantiles([int(n) for b in measured for n in b["attention_mask"].sum(1)]),
        # GRPO samples each batch's first B / k prompts k times (grpo_batches)
        "prompt_tokens_used_grpo": quantiles([int(n) for b in measured
                                              for n in b["attention_mask"][: batch // GRPO_SAMPLES_PER_PROMPT].sum(1)]),
        "new_tokens_used": quantiles([int(n) for b in measured for n in b["lengths"]]),
        "tiny": tiny,
        "new_tokens": (low, high),
        "profile_batch": profile_batch,  # the last batch is an extra, unmeasured step (profiled)
    }
    path = cache / f"workload_{name}{'_tiny' if tiny else ''}_{warmup}+{n_batches - warmup}{'_p' if profile_batch else ''}.pt"
    torch.save(work, path)
    work["path"] = str(path)
    return work


# ---------------------------------------------------------------------------------------------- FLOP limit


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


# ---------------------------------------------------------------------------------------------- workers


def load_work(path: str) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=False)


def step_record(phases: dict[str, float], total: float, tokens: int) -> dict[str, Any]:
    rec = {p: float(phases.get(p, 0.0)) for p in PHASES if p != "other"}
    rec["other"] = max(0.0, total - sum(rec.values()))
    rec["total"] = total
    rec["tokens"] = tokens
    return rec


def write_profile(prof, path: str, title: str) -> None:
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    Path(path).write_text(f"# {title}\n\n{table}\n")


def grpo_batches(batches: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """GRPO's view of PPO's batches: the first ``len(lengths) // k`` prompts of each batch (trimmed to their
    longest prompt) and all of its lengths [B], so that sample j of prompt i (row i*k + j) gets ``lengths[i*k + j]``
    and the step generates exactly the tokens PPO's step does."""
    out = []
    for b in batches:
        n = len(b["lengths"]) // k
        width = int(b["attention_mask"][:n].sum(1).max())
        out.append({"input_ids": b["input_ids"][:n, :width], "attention_mask": b["attention_mask"][:n, :width],
                    "query": list(b["query"][:n]), "lengths": b["lengths"]})
    return out


def lit_module(args: argparse.Namespace, work: dict[str, Any], n_steps: int):
    """The PPOModule of ``args.system``: defaults (lit_rlhf), fast_rollout (lit_rlhf_fast), or GRPO with k = 4
    samples of 4 prompts and fast_rollout (lit_rlhf_grpo); the benchmark's reward and length settings."""
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.settings import PPOSettings
    from lit_rlhf.settings import GenerationSettings, LoraSettings
    from lit_rlhf.rewards import Reward

    scorer = make_scorer(args)

    class BenchReward(Reward):
        def compute(self, prompts, responses, references):
            return scorer(prompts, responses)

    low, high = work["new_tokens"]
    grpo = args.system == "lit_rlhf_grpo"
    k = GRPO_SAMPLES_PER_PROMPT if grpo else 1
    # min_new_tokens >= every draw blocks end-of-sequence until each row's own limit, where it stops
    generation = GenerationSettings(min_new_tokens=high - 1, max_new_tokens=(low, high), top_k=0, top_p=1.0)
    return PPOModule(
        model_name=args.model_dir, reward=BenchReward(),
        lora=LoraSettings(r=PPO.lora_r, alpha=PPO.lora_alpha, dropout=PPO.lora_dropout, target_modules=list(PPO.lora_targets)),
        generation=generation, ppo=PPOSettings(ppo_epochs=PPO.ppo_epochs, **(GRPO_SETTINGS if grpo else {})),
        ppo_steps=n_steps, learning_rate=PPO.learning_rate, rollout_batch_size=PPO.rollout_batch // k,
        mini_batch_size=PPO.mini_batch, samples_per_prompt=k, seed=LENGTH_SEED, log_samples_every=0,
        export_adapter=False, fast_rollout=args.system in ("lit_rlhf_fast", "lit_rlhf_grpo"), dtype=args.dtype,
    )


def check_lit_step(system: str, response_ids: "torch.Tensor", lengths: "torch.Tensor", expected: "torch.Tensor") -> None:
    """The step generated each row's length; GRPO's k samples of a prompt are distinct draws (their common
    prefixes are not all identical). response_ids [B, T]; lengths, expected [B]."""
    import torch

    if not torch.equal(lengths, expected):
        raise RuntimeError(f"{system} generated lengths {lengths.tolist()}, expected {expected.tolist()}")
    if system != "lit_rlhf_grpo":
        return
    k = GRPO_SAMPLES_PER_PROMPT
    for g in range(len(lengths) // k):
        prefix = int(lengths[g * k : (g + 1) * k].min())
        group = response_ids[g * k : (g + 1) * k, :prefix]
        if bool((group == group[:1]).all()):
            raise RuntimeError(f"lit_rlhf_grpo: the {k} samples of prompt {g} are identical (not distinct draws)")


def lit_parameters(system: str, module) -> dict[str, int]:
    """Parameter counts (the value head's included where one is built); GRPO must have none."""
    counts = module.policy.parameter_counts()
    if system == "lit_rlhf_grpo":
        heads = [name for name, _ in module.named_parameters() if "value_head" in name]
        if module.policy.has_value_head or heads:
            raise RuntimeError(f"lit_rlhf_grpo built a value head: {heads}")
    return {"all_with_value_head": counts["all parameters with value head"],
            "trainable_with_value_head": counts["trainable parameters with value head"]}


def parameter_dtypes(system: str, named: Iterable[tuple[str, Any]], dtype: str) -> dict[str, list[str]]:
    """The dtypes of the frozen and of the trained parameters (checked: the frozen weights include ``dtype``,
    every trained one, LoRA and value head, is float32, so AdamW's state is float32 too)."""
    found: dict[str, set[str]] = {"frozen": set(), "trainable": set()}
    for _, p in named:
        found["trainable" if p.requires_grad else "frozen"].add(str(p.dtype).removeprefix("torch."))
    if dtype not in found["frozen"] or found["trainable"] != {"float32"}:
        raise RuntimeError(f"{system}: parameter dtypes {found}, expected frozen {dtype} and trainable float32")
    return {k: sorted(v) for k, v in found.items()}


class DecodeRecorder:
    """Times each step of lit_rlhf's cached decode loop (``lit_rlhf.models.decoding.sample_with_cache``) by wrapping,
    on the instance, ``policy.sample`` (one rollout) and ``policy.lm.step`` (one decoder step): a step lasts
    from its ``lm.step`` call to the next one (sampling and bookkeeping included), the last one until
    ``sample`` returns; the encoder (``lm.start``) is not in any step. ``rollouts[k]``: [rows, position,
    prompt width, seconds] per step of the k-th rollout."""

    def __init__(self, policy) -> None:
        self.rollouts: list[list[list[float]]] = []
        starts: list[tuple[int, int, int, float]] = []
        real_sample, real_step = policy.sample, policy.lm.step

        def sample(*args, **kwargs):
            starts.clear()
            rollout = real_sample(*args, **kwargs)
            ends = [s[3] for s in starts[1:]] + [time.perf_counter()]
            self.rollouts.append([[b, t, p, round(end - start, 6)] for (b, t, p, start), end in zip(starts, ends)])
            return rollout

        def step(model, state):
            starts.append((int(state.step_input.shape[0]), len(starts), int(state.attention.shape[1]), time.perf_counter()))
            return real_step(model, state)

        policy.sample, policy.lm.step = sample, step


def worker_lit_rlhf(args: argparse.Namespace, work: dict[str, Any], out: dict[str, Any]) -> None:
    """lit_rlhf's real PPOModule.training_step, run by a minimal Lightning Trainer fit over the workload's
    batches; ``lit_rlhf_fast`` sets ``fast_rollout=True`` (lit_rlhf's cached sampling loop, old log-probs and
    values from sampling); ``lit_rlhf_grpo`` samples 4 prompts 4 times each (``grpo_batches``) with fast_rollout
    and GRPO's settings. Response lengths: GenerationSettings(min_new_tokens >= every length) blocks
    end-of-sequence, and the module's per-sample length draw (``response_length_limits``, a draw from
    ``max_new_tokens`` = [low, high)) is replaced on the instance by the batch's shared lengths. A wrapper
    around ``policy.decode`` records the responses really generated; each step checks them."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    batches = work["batches"]
    if args.system == "lit_rlhf_grpo":
        batches = grpo_batches(batches, GRPO_SAMPLES_PER_PROMPT)
    n = len(batches)
    module = lit_module(args, work, n)
    out["parameters"] = lit_parameters(args.system, module)
    out["parameter_dtypes"] = parameter_dtypes(args.system, module.named_parameters(), args.dtype)
    decode = DecodeRecorder(module.policy) if args.system == "lit_rlhf_fast" else None

    generated: list[tuple[torch.Tensor, torch.Tensor]] = []
    current_lengths: list[torch.Tensor] = []

    def batch_lengths(batch_size: int) -> torch.Tensor:
        if batch_size != len(current_lengths[-1]):
            raise RuntimeError(f"the module asked for {batch_size} lengths, the batch has {len(current_lengths[-1])}")
        return current_lengths[-1].clone()

    module.response_length_limits = batch_lengths
    real_decode = module.policy.decode

    def recording_decode(response_ids, response_mask):  # observes the rollout's responses, changes nothing
        generated.append((response_ids.cpu(), response_mask.sum(1).cpu()))
        return real_decode(response_ids, response_mask)

    module.policy.decode = recording_decode
    memory = MemoryWatch()
    steps: list[dict[str, Any]] = []
    # an extra last batch, when the workload has one, is profiled (or just run, without --profile-out)
    profile_at = n - 1 if work["profile_batch"] else None
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[lit_step_timer(args, work, out, memory, steps, generated, current_lengths, profile_at)],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    if profile_at is None:
        memory.end_steps()
    if decode is not None:  # the measured steps' rollouts: not the warm-up, not the profiled extra step
        out["decode_steps"] = [s for r in decode.rollouts[args.warmup : profile_at] for s in r]
    out["steps"] = steps
    out["memory"] = memory.report()


def lit_step_timer(args: argparse.Namespace, work: dict[str, Any], out: dict[str, Any], memory: MemoryWatch,
                   steps: list[dict[str, Any]], generated: list, current_lengths: list, profile_at: int | None):
    """The Lightning callback that times each training step, checks its responses (``check_lit_step``),
    feeds the batch's lengths to the module and profiles the extra step ``profile_at`` (if any)."""
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            memory.start_steps()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            current_lengths.append(batch["lengths"])
            if batch_idx == profile_at:
                memory.end_steps()  # the profiled step is not a measured one
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            total = time.perf_counter() - self.start
            if batch_idx == profile_at:
                self.prof.__exit__(None, None, None)
                if args.profile_out:
                    write_profile(self.prof, args.profile_out, f"{SYSTEM_LABELS[args.system]}, workload {work['name']}")
                out["profiled_step"] = step_record({LIT_PHASES[k]: v for k, v in pl_module.timings.items()}, total, 0)
                return
            response_ids, lengths = generated[-1]
            check_lit_step(args.system, response_ids, lengths, batch["lengths"])
            phases = {LIT_PHASES[k]: v for k, v in pl_module.timings.items()}
            steps.append(step_record(phases, total, int(lengths.sum())))
            log(f"[{args.system}] step {batch_idx}: {total:.2f} s " + " ".join(f"{k}={v:.2f}" for k, v in phases.items()))

    return StepTimer()


def trl_models(args: argparse.Namespace, ref_copy: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM
    from trl import AutoModelForSeq2SeqLMWithValueHead, create_reference_model

    # --dtype bfloat16 loads as the recipe does: the base in bf16 (``torch_dtype`` of the value-head wrapper is
    # not used by TRL 0.11.4 for a model object); peft keeps the LoRA weights float32 (autocast_adapter_dtype),
    # TRL's value head is float32 and casts its input, its logits are cast to float32.
    dtype = getattr(torch, args.dtype)
    base = AutoModelForSeq2SeqLM.from_pretrained(args.model_dir, dtype=dtype)
    lora = LoraConfig(r=PPO.lora_r, lora_alpha=PPO.lora_alpha, target_modules=list(PPO.lora_targets),
                      lora_dropout=PPO.lora_dropout, bias="none", task_type="SEQ_2_SEQ_LM")
    peft_model = get_peft_model(base, lora)
    ppo_model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(peft_model, torch_dtype=dtype, is_trainable=True)
    # The recipe makes a full reference copy; TRL then ignores it for a PEFT policy (it disables the adapter
    # instead) but keeps it in memory. --trl-ref adapter passes None, as TRL's docs advise for PEFT.
    ref_model = create_reference_model(ppo_model) if ref_copy else None
    return ppo_model, ref_model


def trl_generate(trainer, queries: list, lengths: list[int], batched: bool) -> list:
    """The responses of TRL's generate: one batched call of max(lengths) tokens, each response cut to its
    length, or the recipe's loop of one call per prompt with its own length (checked)."""
    sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0}
    if batched:
        top = max(lengths)
        outputs = trainer.generate(queries, batch_size=len(queries), return_prompt=False,
                                   min_new_tokens=top, max_new_tokens=top, **sampling)
        # seq2seq outputs start with the decoder start token
        responses = [o[1 : 1 + n] for o, n in zip(outputs, lengths)]
    else:
        responses = []
        for query, n in zip(queries, lengths):
            summary = trainer.generate(query, min_new_tokens=n, max_new_tokens=n, **sampling)
            responses.append(summary.squeeze()[-n:])
    if [len(r) for r in responses] != lengths:
        raise RuntimeError(f"TRL generated {[len(r) for r in responses]} tokens, expected {lengths}")
    return responses


def worker_trl(args: argparse.Namespace, work: dict[str, Any], out: dict[str, Any], batched: bool) -> None:
    """TRL 0.11.4's PPOTrainer as the FLAN-T5 detoxification recipe sets it up (LoRA policy wrapped in
    AutoModelForSeq2SeqLMWithValueHead, reference copy, batch 16, mini-batch 4, 1 epoch), with either one batched
    generate of all 16 prompts or the recipe's loop of one generate per prompt.

    Lengths: the loop gives each prompt min_new_tokens = max_new_tokens = its length. TRL's batched generate has
    one length per call, so it generates max(lengths) for every row (end-of-sequence blocked) and each response
    is cut to its own length, as a user of TRL would have to."""
    from transformers import AutoTokenizer
    from trl import PPOConfig, PPOTrainer

    scorer = make_scorer(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ppo_model, ref_model = trl_models(args, ref_copy=args.trl_ref == "copy")
    config = PPOConfig(model_name=args.model_dir, learning_rate=PPO.learning_rate, ppo_epochs=PPO.ppo_epochs,
                       mini_batch_size=PPO.mini_batch, batch_size=PPO.rollout_batch, seed=0)
    trainer = PPOTrainer(config=config, model=ppo_model, ref_model=ref_model, tokenizer=tokenizer)
    trainable = sum(p.numel() for p in ppo_model.parameters() if p.requires_grad)
    out["parameters"] = {"all_with_value_head": sum(p.numel() for p in ppo_model.parameters()),
                         "trainable_with_value_head": trainable}
    out["parameter_dtypes"] = parameter_dtypes(args.system, ppo_model.named_parameters(), args.dtype)
    memory = MemoryWatch()
    memory.start_steps()
    steps = []
    batches = work["batches"][:-1] if work["profile_batch"] else work["batches"]
    for index, batch in enumerate(batches):
        queries = [ids[m.bool()] for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        lengths = [int(n) for n in batch["lengths"]]
        phases: dict[str, float] = {}
        start = time.perf_counter()
        with timed(phases, "generate"):
            responses = trl_generate(trainer, queries, lengths, batched)
        with timed(phases, "reward"):
            texts = [tokenizer.decode(r) for r in responses]
            scores = scorer(batch["query"], texts)
        stats = trainer.step(queries, responses, list(scores))
        total = time.perf_counter() - start
        phases["forward"] = stats["time/ppo/forward_pass"]
        phases["advantages"] = stats["time/ppo/compute_rewards"] + stats["time/ppo/compute_advantages"]
        phases["update"] = stats["time/ppo/optimize_step"]
        rec = step_record(phases, total, sum(lengths))
        if index >= args.warmup:
            steps.append(rec)
        log(f"[trl {'batched' if batched else 'loop'}] step {index}: {total:.2f} s "
            + " ".join(f"{k}={v:.2f}" for k, v in phases.items()))
    memory.end_steps()
    out["steps"] = steps
    out["memory"] = memory.report()


class Floor:
    """The least work of one PPO step in bare PyTorch on the same weights (transformers' T5 blocks + peft LoRA):
    one encoder pass and a KV-cached decode loop (eval mode) that keeps each sampled token's log-prob and value
    and drops every row from the batch once it has its length; one reference forward per length-sorted group
    with the adapter disabled; one forward + backward + AdamW step per mini-batch (eval mode: no dropout).
    ``dtype`` bfloat16: the frozen weights in bf16; LoRA (peft's autocast_adapter_dtype), the value head (fed
    float32 hidden states) and AdamW's state float32; log-probs from float32 logits."""

    def __init__(self, model_dir: str, dtype: str = "float32") -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        lora = LoraConfig(r=PPO.lora_r, lora_alpha=PPO.lora_alpha, target_modules=list(PPO.lora_targets),
                          lora_dropout=PPO.lora_dropout, bias="none", task_type="SEQ_2_SEQ_LM")
        self.peft = get_peft_model(base, lora).eval()
        self.t5 = self.peft.base_model.model  # T5ForConditionalGeneration with LoRA layers inside
        self.value_head = torch.nn.Linear(self.t5.config.d_model, 1)
        params = [p for p in self.peft.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=PPO.learning_rate, weight_decay=0.0)
        self.start_id = self.t5.config.decoder_start_token_id
        self.eos_id = self.t5.config.eos_token_id
        self.scale = self.t5.model_dim**-0.5 if self.t5.config.scale_decoder_outputs else 1.0
        self.generator = torch.Generator().manual_seed(0)
        self.first_ratio_error = None

    def parameter_count(self) -> dict[str, int]:
        all_ = sum(p.numel() for p in self.peft.parameters()) + sum(p.numel() for p in self.value_head.parameters())
        return {"all_with_value_head": all_, "trainable_with_value_head": sum(p.numel() for p in self.params)}

    def rollout(self, ids, mask, lengths):
        """Sampled tokens, their log-probs and values: [B, T] each (right-padded), in the input row order."""
        torch = self.torch
        B, T = len(lengths), int(lengths.max())
        order = torch.argsort(lengths, descending=True, stable=True)  # finished rows leave from the end
        ids, mask, lens = ids[order], mask[order], lengths[order]
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        tokens = torch.zeros(B, T, dtype=torch.long)
        logps, values = torch.zeros(B, T), torch.zeros(B, T)
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        with torch.no_grad():
            enc = self.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, P, d]
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            x = torch.full((B, 1), self.start_id, dtype=torch.long)
            alive = B
            for t in range(T):
                n = int((lens > t).sum())
                if n < alive:  # rows that have their length leave the batch (and the KV cache)
                    cache.batch_select_indices(torch.arange(n))
                    enc, mask, x, alive = enc[:n], mask[:n], x[:n], n
                h = self.t5.decoder(input_ids=x, encoder_hidden_states=enc, encoder_attention_mask=mask,
                                    cache=cache, use_cache=True).last_hidden_state[:, -1]  # [n, d]
                logits = self.t5.lm_head(h * self.scale).float()  # [n, V]
                logp = torch.log_softmax(logits, -1)
                probs = logp.exp()
                probs[:, self.eos_id] = 0.0  # end-of-sequence blocked until the row's length (min = max)
                tok = torch.multinomial(probs, 1, generator=self.generator)  # top_k 0, top_p 1: plain sampling
                tokens[:n, t] = tok[:, 0]
                logps[:n, t] = logp.gather(1, tok)[:, 0]
                values[:n, t] = self.value_head(h.float())[:, 0]
                x = tok
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(B)
        return tokens[unsort], logps[unsort], values[unsort]

    def teacher_forced(self, q, qm, r, rm, with_values: bool):
        """Log-probs [b, t] (and values) of response tokens r given queries q, one forward pass."""
        torch = self.torch
        start = torch.full_like(r[:, :1], self.start_id)
        dec_in = torch.cat([start, r[:, :-1]], 1)
        dec_mask = torch.cat([torch.ones_like(start), rm[:, :-1]], 1)
        enc = self.t5.encoder(input_ids=q, attention_mask=qm).last_hidden_state
        h = self.t5.decoder(input_ids=dec_in, attention_mask=dec_mask, encoder_hidden_states=enc,
                            encoder_attention_mask=qm, use_cache=False).last_hidden_state  # [b, t, d]
        logits = self.t5.lm_head(h * self.scale).float()
        logp = logits.gather(-1, r[..., None])[..., 0] - logits.logsumexp(-1)
        return logp, (self.value_head(h.float())[..., 0] if with_values else None)

    @staticmethod
    def groups(lengths, size: int):
        import torch

        order = torch.argsort(lengths, stable=True)
        return list(order.split(size))

    def trim(self, ids, mask, resp, rmask, idx):
        q, qm, r, rm = ids[idx], mask[idx], resp[idx], rmask[idx]
        width, t = int(qm.sum(1).max()), int(rm.sum(1).max())
        return q[:, :width], qm[:, :width], r[:, :t], rm[:, :t]

    def advantages(self, scores, logps, ref_logps, values, rmask):
        torch = self.torch
        rewards = -PPO.kl_coef * (logps - ref_logps) * rmask
        last = rmask.sum(1).long() - 1
        rewards[torch.arange(len(scores)), last] += scores
        adv = torch.zeros_like(rewards)
        gae = torch.zeros(len(scores))
        T = rewards.shape[1]
        for t in reversed(range(T)):
            next_v = values[:, t + 1] * rmask[:, t + 1] if t + 1 < T else torch.zeros(len(scores))
            delta = rewards[:, t] + PPO.gamma * next_v - values[:, t]
            gae = (delta + PPO.gamma * PPO.lam * gae) * rmask[:, t]
            adv[:, t] = gae
        returns = adv + values
        n = rmask.sum()
        mean = (adv * rmask).sum() / n
        var = (((adv - mean) * rmask) ** 2).sum() / (n - 1)
        return (adv - mean) * torch.rsqrt(var + 1e-8) * rmask, returns

    def update(self, ids, mask, resp, rmask, old_logps, old_values, adv, returns, groups) -> None:
        torch = self.torch
        for k in torch.randperm(len(groups), generator=self.generator).tolist():
            idx = groups[k]
            q, qm, r, rm = self.trim(ids, mask, resp, rmask, idx)
            t = r.shape[1]
            logp, v = self.teacher_forced(q, qm, r, rm, with_values=True)
            old_lp, old_v, a, ret = old_logps[idx, :t], old_values[idx, :t], adv[idx, :t], returns[idx, :t]
            ratio = torch.exp(logp - old_lp)
            if self.first_ratio_error is None:
                self.first_ratio_error = float(((ratio - 1).abs() * rm).max())
            n = rm.sum()
            pg = (torch.max(-a * ratio, -a * ratio.clamp(1 - PPO.cliprange, 1 + PPO.cliprange)) * rm).sum() / n
            v_clip = old_v + (v - old_v).clamp(-PPO.cliprange_value, PPO.cliprange_value)
            vf = 0.5 * (torch.max((v - ret) ** 2, (v_clip - ret) ** 2) * rm).sum() / n
            loss = pg + PPO.vf_coef * vf
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def step(self, batch, scorer) -> tuple[dict[str, float], int]:
        torch = self.torch
        phases: dict[str, float] = {}
        ids, mask, lengths = batch["input_ids"], batch["attention_mask"], batch["lengths"]
        with timed(phases, "generate"):
            resp, old_logps, old_values = self.rollout(ids, mask, lengths)
            rmask = (torch.arange(resp.shape[1])[None] < lengths[:, None]).long()
        with timed(phases, "reward"):
            texts = self.tokenizer.batch_decode(resp * rmask, skip_special_tokens=True)
            scores = scorer(batch["query"], texts)
        groups = self.groups(lengths, PPO.mini_batch)
        with timed(phases, "forward"):  # the reference only: the rollout kept the policy's log-probs and values
            ref_logps = torch.zeros_like(old_logps)
            with torch.no_grad(), self.peft.disable_adapter():
                for idx in groups:
                    q, qm, r, rm = self.trim(ids, mask, resp, rmask, idx)
                    ref_logps[idx, : r.shape[1]] = self.teacher_forced(q, qm, r, rm, with_values=False)[0]
        with timed(phases, "advantages"):
            adv, returns = self.advantages(scores, old_logps, ref_logps, old_values, rmask.float())
        with timed(phases, "update"):
            self.update(ids, mask, resp, rmask, old_logps, old_values, adv, returns, groups)
        return phases, int(rmask.sum())


def worker_floor(args: argparse.Namespace, work: dict[str, Any], out: dict[str, Any]) -> None:
    import torch

    scorer = make_scorer(args)
    floor = Floor(args.model_dir, args.dtype)
    out["parameters"] = floor.parameter_count()
    out["parameter_dtypes"] = parameter_dtypes(args.system, [*floor.peft.named_parameters(),
                                                             *floor.value_head.named_parameters()], args.dtype)
    memory = MemoryWatch()
    memory.start_steps()
    steps = []
    batches = work["batches"]
    measured = len(batches) - (1 if work["profile_batch"] else 0)
    for index in range(measured):
        start = time.perf_counter()
        phases, tokens = floor.step(batches[index], scorer)
        total = time.perf_counter() - start
        if index >= args.warmup:
            steps.append(step_record(phases, total, tokens))
        log(f"[floor] step {index}: {total:.2f} s " + " ".join(f"{k}={v:.2f}" for k, v in phases.items()))
    memory.end_steps()
    if work["profile_batch"] and args.profile_out:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            phases, tokens = floor.step(batches[-1], scorer)
            total = time.perf_counter() - start
        write_profile(prof, args.profile_out, f"bare PyTorch floor, workload {work['name']}")
        out["profiled_step"] = step_record(phases, total, tokens)
    out["first_minibatch_ratio_error"] = floor.first_ratio_error
    out["steps"] = steps
    out["memory"] = memory.report()


def run_worker(args: argparse.Namespace) -> None:
    """Entry point of one system's process: runs the steps and writes JSON to ``args.out``."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = load_work(args.workload_file)
    out: dict[str, Any] = {"system": args.system, "workload": work["name"], "threads": torch.get_num_threads(),
                           "dtype": args.dtype}
    start = time.perf_counter()
    if args.system in LIT_SYSTEMS:
        worker_lit_rlhf(args, work, out)
        out["steps"] = out["steps"][args.warmup :]
    elif args.system == "trl_batched":
        worker_trl(args, work, out, batched=True)
    elif args.system == "trl_loop":
        worker_trl(args, work, out, batched=False)
    elif args.system == "floor":
        worker_floor(args, work, out)
    else:
        raise ValueError(f"unknown system {args.system!r}")
    out["wall_s"] = time.perf_counter() - start
    # how busy the machine was around this system's steps, in the run's dtype
    out["gemm_gflops"] = gemm_rate(args.threads, repeats=args.gemm_repeats, dtype=args.dtype) / 1e9
    out["versions"] = library_versions()
    Path(args.out).write_text(json.dumps(out, indent=1))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "lightning", "trl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# ---------------------------------------------------------------------------------------------- parent


def trl_python(build: bool) -> Path | None:
    """The TRL environment's python; built on demand (torch pinned first so pip cannot swap it)."""
    python = TRL_VENV / "bin" / "python"
    if python.exists():
        check = subprocess.run([str(python), "-c", "import trl, torch; print(trl.__version__, torch.__version__)"],
                               capture_output=True, text=True)
        if check.returncode == 0:
            return python
        log(f"benchmarks/.venv-trl is broken ({check.stderr.strip().splitlines()[-1:]}); rebuilding")
    if not build:
        return None
    log("building benchmarks/.venv-trl (torch 2.13.0, TRL 0.11.4 and its pinned dependencies) ...")
    shutil.rmtree(TRL_VENV, ignore_errors=True)
    commands = [
        [sys.executable, "-m", "venv", str(TRL_VENV)],
        [str(TRL_VENV / "bin" / "pip"), "install", "-q", TORCH_PIN],
        [str(TRL_VENV / "bin" / "pip"), "install", "-q", *TRL_PINS, TORCH_PIN],
    ]
    for cmd in commands:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"could not build the TRL environment ({' '.join(cmd[-3:])}):\n{done.stderr[-2000:]}")
            return None
    return python


def run_system(system: str, work: dict[str, Any], args: argparse.Namespace, python: Path, logs: Path,
               profile: str | None) -> dict[str, Any] | None:
    out_path = logs / f"{system}_{work['name']}_{args.dtype}.json"
    log_path = logs / f"{system}_{work['name']}_{args.dtype}.log"
    out_path.unlink(missing_ok=True)
    cmd = [str(python), str(Path(__file__).resolve()), "worker", "--system", system,
           "--workload-file", work["path"], "--model-dir", str(args.model_dir), "--out", str(out_path),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--reward", args.reward,
           "--reward-cost-s", str(args.reward_cost_s), "--classifier-dir", str(args.classifier_dir or ""),
           "--trl-ref", args.trl_ref, "--dtype", args.dtype, "--gemm-repeats", str(args.gemm_repeats)]
    if profile:
        cmd += ["--profile-out", profile]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) if system in LIT_SYSTEMS else os.environ.get("PYTHONPATH", ""))
    log(f"--- {SYSTEM_LABELS[system]} on workload {work['name']}, {args.dtype} (log: {log_path})")
    start = time.perf_counter()
    with open(log_path, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if done.returncode != 0 or not out_path.exists():
        tail = log_path.read_text().splitlines()[-25:]
        log(f"{system} failed (exit {done.returncode}) after {time.perf_counter() - start:.0f} s:\n  " + "\n  ".join(tail))
        return None
    result = json.loads(out_path.read_text())
    result["process_s"] = time.perf_counter() - start
    log(f"    done in {result['process_s']:.0f} s")
    return result


def summarize(result: dict[str, Any]) -> dict[str, float]:
    steps = result["steps"]
    summary = {p: statistics.median(s[p] for s in steps) for p in (*PHASES, "total")}
    summary["tokens"] = statistics.median(s["tokens"] for s in steps)
    summary["tok_per_s"] = summary["tokens"] / summary["total"]
    summary["n_steps"] = len(steps)
    summary["all_totals"] = [round(s["total"], 2) for s in steps]
    summary.update({k: result["memory"][k] for k in ("steps_peak_mib", "process_peak_mib")})
    return summary


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


def fmt_quantiles(q: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" if k == "mean" else f"{k} {v:.0f}" for k, v in q.items())


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def ratio(a: dict | None, b: dict | None, key: str = "total") -> float | None:
    if not a or not b or not b.get(key):
        return None
    return a[key] / b[key]


def ratio_columns(sec: dict[str, Any]) -> list[tuple[str, str]]:
    """The ratio columns of a section's table: (header, row key); bf16 tables add TRL batched of the fp32 run
    of the same workload on the same machine (row key ``trl_batched_fp32``, see ``fp32_baseline``)."""
    tag = "" if sec["run"]["dtype"] == "float32" else " " + DTYPE_SHORT[sec["run"]["dtype"]]
    columns = [(f"÷ TRL batched{tag}", "trl_batched"), (f"÷ TRL loop{tag}", "trl_loop"), (f"÷ floor{tag}", "floor"),
               (f"÷ FLOP limit{tag}", "flop_limit")]
    if tag:
        columns.append(("÷ TRL batched fp32", "trl_batched_fp32"))
    return columns


def fp32_baseline(sec: dict[str, Any], context: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """TRL batched's row of the float32 run of ``sec``'s workload, if that run was on the same machine with the
    same threads (None otherwise)."""
    run = sec["run"]
    other = context.get(section_key(run["workload"], "float32"))
    if other is None or run["dtype"] == "float32":
        return None
    same = run.get("machine") and other["run"].get("machine") == run["machine"] and other["run"]["threads"] == run["threads"]
    return other["rows"].get("trl_batched") if same else None


def workload_table(sec: dict[str, Any], context: dict[str, dict[str, Any]]) -> str:
    rows, run = sec["rows"], sec["run"]
    columns = ratio_columns(sec)
    base = {key: rows.get(key) for _, key in columns}
    base["trl_batched_fp32"] = fp32_baseline(sec, context)
    head = ("| system | s/step | generate | reward | forward | advantages | update | other | resp. tok/s "
            "| peak RSS steps (MiB) | process peak (MiB) | " + " | ".join(h for h, _ in columns) + " |")
    lines = [f"### Workload {run['workload']}, {run['dtype']}: seconds per PPO step (median), by phase", "", head,
             "|" + "---|" * (11 + len(columns))]
    for system in (*SYSTEMS, "flop_limit", "flop_limit_grpo"):
        s = rows.get(system)
        if s is None:
            continue
        cells = [SYSTEM_LABELS[system], fmt(s["total"])] + [fmt(s.get(p)) for p in PHASES]
        cells += [fmt(s["tok_per_s"], 1), fmt(s.get("steps_peak_mib"), 0), fmt(s.get("process_peak_mib"), 0)]
        grpo = system in ("lit_rlhf_grpo", "flop_limit_grpo")  # against its own FLOP limit
        for _, key in columns:
            against = rows.get("flop_limit_grpo") if grpo and key == "flop_limit" else base[key]
            cells.append(fmt(ratio(s, against)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios are this system's seconds per step ÷ the other's (below 1: faster). FLOP-limit phases: "
              "generate = one forward, forward = the reference forward, update = two forwards."]
    if run["dtype"] != "float32":
        lines.append("÷ TRL batched fp32: TRL batched of the float32 table of this workload, " + (
            "measured on the same machine with the same threads." if base["trl_batched_fp32"] else
            "not available (no float32 run of TRL batched on this machine and threads in the results file)."))
    if "flop_limit_grpo" in rows:
        lines.append("GRPO (4 prompts × 4 samples, the 16 lengths of PPO's step, no value head) is divided by its own "
                     "FLOP limit, which runs the encoder once per prompt in generation.")
    return "\n".join(lines)


# The speed and memory goals, by (workload, dtype): speed-ups vs TRL batched in the section's dtype ("trl") and
# in float32 on the same machine ("trl32"), vs the recipe's loop ("loop"); time ÷ floor at most "floor"; the
# fraction of the FLOP limit reached at least "flop_fraction", or time ÷ FLOP limit at most "flop_ratio"; peak
# RSS ÷ TRL batched at most "rss".
GOALS: dict[tuple[str, str], dict[str, float]] = {
    ("A", "float32"): {"trl": 1.35, "floor": 1.05, "flop_fraction": 0.85, "rss": 0.7},
    ("A", "bfloat16"): {"trl": 1.5, "trl32": 1.7, "floor": 1.05, "rss": 0.7},
    ("B", "float32"): {"trl": 2.0, "loop": 3.0, "flop_ratio": 1.6, "rss": 0.7},
    ("B", "bfloat16"): {"trl": 2.0, "trl32": 3.0, "rss": 0.7},
}


def goals(sec: dict[str, Any], context: dict[str, dict[str, Any]]) -> list[str]:
    """The goals of ``GOALS``, checked for each lit_rlhf PPO variant that ran, against TRL in the section's dtype
    (and, for bf16, against TRL batched in fp32 on the same machine)."""

    def check(text: str, value: float | None, ok: Callable[[float], bool]) -> str:
        if value is None:
            return f"  - {text}: not measured"
        return f"  - {text}: {value:.2f} — {'met' if ok(value) else 'NOT met'}"

    rows, name, dtype = sec["rows"], sec["run"]["workload"], sec["run"]["dtype"]
    tag = "" if dtype == "float32" else " " + DTYPE_SHORT[dtype]
    trl, loop, trl32 = rows.get("trl_batched"), rows.get("trl_loop"), fp32_baseline(sec, context)
    goal = GOALS.get((name, dtype), {})
    out = []
    for system in LIT_PPO_SYSTEMS:
        lit = rows.get(system)
        if not lit:
            continue
        out.append(f"- {SYSTEM_LABELS[system]}, workload {name}, {dtype}:")
        at_least = [("trl", f"speed-up vs TRL batched{tag}", ratio(trl, lit)),
                    ("trl32", "speed-up vs TRL batched fp32", ratio(trl32, lit)),
                    ("loop", f"speed-up vs TRL loop{tag}", ratio(loop, lit)),
                    ("flop_fraction", "fraction of the FLOP limit", ratio(rows.get("flop_limit"), lit))]
        at_most = [("floor", "time ÷ floor", ratio(lit, rows.get("floor"))),
                   ("flop_ratio", "time ÷ FLOP limit", ratio(lit, rows.get("flop_limit"))),
                   ("rss", f"peak RSS during steps ÷ TRL batched{tag}", ratio(lit, trl, "steps_peak_mib")),
                   ("rss", f"process peak RSS ÷ TRL batched{tag}", ratio(lit, trl, "process_peak_mib"))]
        for key, text, value in at_least:
            if key in goal:
                out.append(check(f"{text} (goal ≥ {goal[key]})", value, lambda v, g=goal[key]: v >= g))
        for key, text, value in at_most:
            if key in goal:
                out.append(check(f"{text} (goal ≤ {goal[key]})", value, lambda v, g=goal[key]: v <= g))
    return out + grpo_lines(name, rows)


def grpo_lines(name: str, rows: dict[str, dict[str, float]]) -> list[str]:
    """GRPO against PPO with fast_rollout on the same responses count (no goal: what a critic-free step costs)."""
    grpo, ppo = rows.get("lit_rlhf_grpo"), rows.get("lit_rlhf_fast")
    if not grpo:
        return []
    out = [f"- {SYSTEM_LABELS['lit_rlhf_grpo']} ÷ {SYSTEM_LABELS['lit_rlhf_fast']}, workload {name} "
           "(same 16 responses per step):"]
    for text, key in (("time per step", "total"), ("generate", "generate"), ("forward", "forward"),
                      ("update", "update"), ("peak RSS during steps", "steps_peak_mib"),
                      ("process peak RSS", "process_peak_mib")):
        value = ratio(grpo, ppo, key)
        out.append(f"  - {text}: " + ("not measured" if value is None else f"{value:.2f}"))
    return out


def phase_excess_line(rows: dict[str, dict[str, float]], system: str = "lit_rlhf_fast") -> str | None:
    """Where the seconds of ``system``'s step above the FLOP limit go: each phase against its FLOP-limit phase."""
    lit, limit = rows.get(system), rows.get("flop_limit")
    if not lit or not limit:
        return None
    excess = {p: lit.get(p, 0.0) - limit.get(p, 0.0) for p in PHASES}
    total = lit["total"] - limit["total"]
    parts = [f"{p} {lit[p]:.2f} s vs {limit[p]:.2f} ({excess[p]:+.2f} s)" for p in ("generate", "forward", "update")]
    rest = sum(v for p, v in excess.items() if p not in ("generate", "forward", "update"))
    shares = ", ".join(f"{p} {100 * excess[p] / total:.0f} %" for p in ("generate", "forward", "update")) if total > 0 else "–"
    return (f"{SYSTEM_LABELS[system]} against the FLOP limit, by phase: " + "; ".join(parts)
            + f"; reward + advantages + other {rest:+.2f} s. Of the {total:.2f} s per step above the limit: {shares}.")


def best_rates(run: dict[str, Any]) -> dict[str, Any] | None:
    """The higher of the before/after measurements of each rate of a run (None for runs that kept only the
    fp32 GEMM rate)."""
    if "rates" not in run:
        return None
    before, after = run["rates"]
    best = {k: max(before[k], after[k]) for k in ("gemm_gflops", "gemm_gflops_bf16", "read_gbps")}
    best["gemm_rows_gflops"] = {b: max(before["gemm_rows_gflops"][b], after["gemm_rows_gflops"][b])
                                for b in before["gemm_rows_gflops"]}
    return best


def decode_table_lines(sec: dict[str, Any], size: ModelSize, system: str = "lit_rlhf_fast") -> list[str]:
    """The decode-step table of ``system``'s cached decode loop: measured ms per step at b rows still running
    against the bandwidth and FLOP limits of that step (``decode_rows_summary``)."""
    steps, rates = sec["raw"].get(system, {}).get("decode_steps"), best_rates(sec["run"])
    if not steps or not rates:
        return []
    dtype = sec["run"]["dtype"]
    lines = [f"Decode steps of {SYSTEM_LABELS[system]} ({len(steps)} in the measured steps, {sum(s[3] for s in steps):.2f} s "
             f"in all), by rows still running, against their limits ({dtype}; read bandwidth {rates['read_gbps']:.1f} GB/s; "
             f"GEMM rate of [b, {size.d_model}] × [{size.d_model}, {size.d_ff}] in {dtype}):", "",
             "| b | steps | mean position | prompt width | MB read | GEMM GFLOP/s | ms measured | ms bandwidth limit "
             "| ms FLOP limit | measured ÷ limit |", "|" + "---|" * 10]
    for b in DECODE_ROWS:
        rate = rates["gemm_rows_gflops"][str(b)]
        row = decode_rows_summary(steps, b, size, dtype, rates["read_gbps"], rate)
        if row is None:
            continue
        lines.append(f"| {b} | {row['steps']} | {row['position']:.0f} | {row['prompt']:.0f} | {row['mb_read']:.0f} | "
                     f"{rate:.0f} | {row['measured_ms']:.1f} | {row['bandwidth_ms']:.1f} | {row['flop_ms']:.1f} | "
                     f"{row['ratio']:.2f} |")
    lines += ["", "A step: from one decoder call to the next (sampling included). MB read: the decoder's weights "
              "used per step plus the rows' KV cache (self and cross attention); limit = the larger of the two."]
    return lines


def cpu_flags() -> str:
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    model, flags = "?", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return f"{model}; flags: {' '.join(w for w in wanted if w in flags)}"


def machine_description() -> str:
    return f"{platform.node()}, {os.cpu_count()} CPU cores, {cpu_flags()}"


def section_key(workload: str, dtype: str) -> str:
    return f"{workload}/{dtype}"


def upgrade_sections(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sections keyed by workload and dtype ("A/float32"), in report order (A before B, fp32 before bf16).
    Results written before the dtype was recorded are keyed by workload alone ("A") and are float32."""
    out = {}
    for key, sec in sections.items():
        workload, _, dtype = key.partition("/")
        sec["run"].setdefault("workload", workload)
        sec["run"].setdefault("dtype", dtype or "float32")
        out[section_key(sec["run"]["workload"], sec["run"]["dtype"])] = sec
    order = sorted(out, key=lambda k: (out[k]["run"]["workload"], DTYPES.index(out[k]["run"]["dtype"])))
    return {k: out[k] for k in order}


def log_rates(when: str, rates: dict[str, Any]) -> None:
    log(f"rates {when}: GEMM 2048x2048 fp32 {rates['gemm_gflops']:.0f} GFLOP/s, bf16 {rates['gemm_gflops_bf16']:.0f}; "
        f"read bandwidth {rates['read_gbps']:.1f} GB/s; decode-shape GEMM "
        + ", ".join(f"b {b}: {r:.0f}" for b, r in rates["gemm_rows_gflops"].items()) + f"; load {os.getloadavg()}")


def prepare(args: argparse.Namespace) -> tuple[ModelSize, list[str], Path | None]:
    """Builds (or finds) the model, the classifier and the TRL environment; the systems that can run."""
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    (args.cache_dir / "logs").mkdir(exist_ok=True)
    size = TINY_T5 if args.tiny else FLAN_T5_BASE
    args.model_dir = build_model_dir(args.cache_dir, args.tiny)
    log(f"model: {size.name} from config, random weights, at {args.model_dir}; frozen weights {args.dtype}")
    if args.reward == "classifier":
        args.classifier_dir = build_classifier_dir(args.cache_dir, args.model_dir, args.tiny)
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    python_trl = None
    if any(s.startswith("trl") for s in systems):
        python_trl = trl_python(build=not args.tiny)
        if python_trl is None:
            log("TRL systems skipped: " + ("benchmarks/.venv-trl does not exist (--tiny does not build it)"
                                             if args.tiny else "the TRL environment could not be built"))
            systems = [s for s in systems if not s.startswith("trl")]
    return size, systems, python_trl


def run_workload(name: str, size: ModelSize, systems: list[str], python_trl: Path | None,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Every system on workload ``name``, between two measurements of the machine's rates: one report section."""
    started, load_start = time.time(), os.getloadavg()
    before = machine_rates(args.threads, args.dtype, size, args.tiny)
    log_rates("before", before)
    steps = args.steps if name == "A" or args.steps_b is None else args.steps_b
    profile_batch = args.profile and name == "A"
    n_batches = args.warmup + steps + (1 if profile_batch else 0)
    work = build_workload(name, args.model_dir, args.cache_dir, n_batches, args.tiny, args.warmup,
                          profile_batch=profile_batch)
    log(f"workload {name}: {n_batches} batches of {PPO.rollout_batch}; prompt tokens (all candidate prompts) "
        f"{work['prompt_tokens_all']}; prompt tokens (used) {work['prompt_tokens_used']}; new tokens "
        f"{work['new_tokens_used']}")
    raw = {}
    for system in systems:
        python = python_trl if system.startswith("trl") else Path(sys.executable)
        profile = (str(args.cache_dir / f"profile_{system}_{name}_{args.dtype}.txt")
                   if profile_batch and system in (*LIT_SYSTEMS, "floor") else None)
        result = run_system(system, work, args, python, args.cache_dir / "logs", profile)
        if result is not None:
            raw[system] = result
            if profile:
                result["profile_table"] = Path(profile).read_text() if Path(profile).exists() else None
    after = machine_rates(args.threads, args.dtype, size, args.tiny)
    log_rates("after", after)
    key = "gemm_gflops" if args.dtype == "float32" else "gemm_gflops_bf16"
    rate = 1e9 * max(before[key], after[key])
    rows = {system: summarize(r) for system, r in raw.items()}
    rows["flop_limit"] = flop_limit(work, size, rate, args.warmup)
    if "lit_rlhf_grpo" in systems:
        rows["flop_limit_grpo"] = flop_limit(work, size, rate, args.warmup, GRPO_SAMPLES_PER_PROMPT)
    run = {"workload": name, "dtype": args.dtype, "machine": machine_description(),
           "command": "python " + " ".join([os.path.relpath(__file__, REPO), *args.argv]),
           "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
           "minutes": (time.time() - started) / 60, "load_start": load_start, "load_end": os.getloadavg(),
           "gemm_gflops": [before["gemm_gflops"], after["gemm_gflops"]], "rates": [before, after],
           "gemm_repeats": args.gemm_repeats, "bandwidth_mib": BANDWIDTH_MIB_TINY if args.tiny else BANDWIDTH_MIB,
           "bandwidth_repeats": 3 if args.tiny else BANDWIDTH_REPEATS,
           "threads": args.threads, "reward": args.reward, "reward_cost_s": args.reward_cost_s,
           "trl_ref": args.trl_ref, "warmup": args.warmup, "systems_missing": [s for s in systems if s not in raw]}
    return {"rows": rows, "raw": raw, "work": {k: v for k, v in work.items() if k != "batches"}, "run": run}


def run_parent(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    size, systems, python_trl = prepare(args)
    sections = {}
    for name in (["A", "B"] if args.workload == "both" else [args.workload]):
        sections[section_key(name, args.dtype)] = run_workload(name, size, systems, python_trl, args)
    context = dict(sections)
    if args.results:
        json_path = Path(args.results).with_suffix(".json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        store = {"model": size.name, "sections": sections}
        if json_path.exists():  # keep the other workloads and dtypes of earlier runs on the same model
            old = json.loads(json_path.read_text())
            if old.get("model") == size.name:
                store["sections"] = {**upgrade_sections(old.get("sections", {})), **sections}
        store["sections"] = context = upgrade_sections(store["sections"])
        json_path.write_text(json.dumps(store, indent=1, default=str))
    print("\n" + render_report(size, sections, context))
    if args.results:
        write_report(Path(args.results), size, context)
    return 1 if any(sec["run"]["systems_missing"] for sec in sections.values()) else 0


NOTES_MARKER = "<!-- notes: text from here on is kept when the report is rewritten -->"


def write_report(path: Path, size: ModelSize, sections: dict[str, dict[str, Any]]) -> None:
    """Write the report, keeping the hand-written notes of the previous one (from NOTES_MARKER on)."""
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER):]
    path.write_text(render_report(size, sections) + "\n" + (notes or NOTES_MARKER + "\n"))
    log(f"wrote {path} and {path.with_suffix('.json').name}")


def rerender(args: argparse.Namespace) -> int:
    """--render: rewrite the report from its JSON (after editing the notes or the renderer), running nothing."""
    store = json.loads(Path(args.results).with_suffix(".json").read_text())
    size = {s.name: s for s in (FLAN_T5_BASE, TINY_T5)}[store["model"]]
    write_report(Path(args.results), size, upgrade_sections(store["sections"]))
    return 0


def render_report(size: ModelSize, sections: dict[str, dict[str, Any]],
                  context: dict[str, dict[str, Any]] | None = None) -> str:
    """The report of ``sections``; ``context``: every section of the results file (bf16 tables compare with
    the fp32 table of their workload)."""
    versions: dict[str, str] = {}
    for sec in sections.values():
        for r in sec["raw"].values():
            versions.update(r.get("versions", {}))
    machines = {sec["run"].get("machine") for sec in sections.values()}
    machine = machines.pop() if len(machines) == 1 and None not in machines else "given with each workload below"
    lines = [
        "# PPO step benchmark: lit_rlhf vs TRL 0.11.4, the recipe's loop, the bare floor and the FLOP limit",
        "",
        "Written by `benchmarks/bench_ppo_step.py` (see benchmarks/README.md for what each system does).",
        "",
        f"- Machine: {machine}. Shared with other users: systems ran one after another, and the load average and "
        "GEMM rate of each run are given with it.",
        f"- Versions: Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
        f"- Model: {size.name} architecture (d_model {size.d_model}, d_ff {size.d_ff}, {size.num_layers}+{size.num_layers} "
        f"layers, {size.num_heads} heads, d_kv {size.d_kv}, gated-gelu, vocab {size.vocab_size}, untied lm_head), random "
        f"weights, LoRA r {PPO.lora_r} / alpha {PPO.lora_alpha} / dropout {PPO.lora_dropout} on q, v, value head. Frozen "
        "weights in each table's dtype (float32 or bfloat16); LoRA, value head and AdamW's state always float32.",
        f"- PPO: rollout batch {PPO.rollout_batch}, mini-batch {PPO.mini_batch}, {PPO.ppo_epochs} epoch, lr "
        f"{PPO.learning_rate}; sampling top_k 0, top_p 1.0; end-of-sequence blocked until each row's length.",
        "",
    ]
    for sec in sections.values():
        lines += render_section(size, sec, context or sections)
    return "\n".join(lines)


def rates_line(run: dict[str, Any]) -> str:
    """The rates the limits divide by, as measured before and after the run."""
    g = run["gemm_gflops"]
    if "rates" not in run:
        return (f"fp32 GEMM rate (2048×2048, best of {run.get('gemm_repeats', GEMM_REPEATS)}, {run['threads']} threads): "
                f"{g[0]:.0f} GFLOP/s before, {g[1]:.0f} after; the FLOP limit uses the higher.")
    before, after = run["rates"]
    return (f"GEMM rate (2048×2048, best of {run['gemm_repeats']}, {run['threads']} threads): fp32 {g[0]:.0f} GFLOP/s "
            f"before, {g[1]:.0f} after; bf16 {before['gemm_gflops_bf16']:.0f} before, {after['gemm_gflops_bf16']:.0f} "
            f"after; the FLOP limit uses the higher {DTYPE_SHORT[run['dtype']]} rate. Read bandwidth (sum over "
            f"{run['bandwidth_mib']} MiB fp32, best of {run.get('bandwidth_repeats', 10)}): {before['read_gbps']:.1f} GB/s before, {after['read_gbps']:.1f} after.")


def section_facts(sec: dict[str, Any]) -> list[str]:
    """The bullet list that opens a section: command, machine, load and rates, reward, prompts, parameters."""
    raw, work, run = sec["raw"], sec["work"], sec["run"]
    counts = {s: r["parameters"] for s, r in raw.items() if r.get("parameters")}
    dtypes = {s: r["parameter_dtypes"] for s, r in raw.items() if r.get("parameter_dtypes")}
    lines = [
        f"- Command: `{run['command']}`; started {run['started']}, {run['minutes']:.0f} min."
        + (f" Machine: {run['machine']}." if run.get("machine") else ""),
        f"- Load average (1/5/15 min): {tuple(round(x, 2) for x in run['load_start'])} at the start, "
        f"{tuple(round(x, 2) for x in run['load_end'])} at the end. " + rates_line(run),
        "- Reward: " + ("RoBERTa-base-sized classifier (random weights) on query + response"
                         if run["reward"] == "classifier" else f"stub (fixed cost {run['reward_cost_s']} s)")
        + f"; TRL reference model: {run['trl_ref']}; {run['warmup']} warm-up step(s) per system, not measured.",
        f"- Prompt tokens, all candidate prompts: {fmt_quantiles(work['prompt_tokens_all'])}; the measured "
        f"steps' prompts: {fmt_quantiles(work['prompt_tokens_used'])}. New tokens per response in the measured "
        f"steps: {fmt_quantiles(work['new_tokens_used'])} (warm-up steps: {WARMUP_NEW_TOKENS}).",
    ]
    if "lit_rlhf_grpo" in raw and work.get("prompt_tokens_used_grpo"):
        lines.append(f"- GRPO's prompts (each batch's first {PPO.rollout_batch // GRPO_SAMPLES_PER_PROMPT}, "
                     f"{GRPO_SAMPLES_PER_PROMPT} samples each): {fmt_quantiles(work['prompt_tokens_used_grpo'])}.")
    if counts:
        lines.append("- Parameters (all / trainable, value head included where one is built): " + "; ".join(
            f"{s} {c['all_with_value_head']:,} / {c['trainable_with_value_head']:,}" for s, c in counts.items()) + ".")
    if dtypes:
        lines.append("- Parameter dtypes (frozen / trainable, checked): " + "; ".join(
            f"{s} {'+'.join(d['frozen'])} / {'+'.join(d['trainable'])}" for s, d in dtypes.items()) + ".")
    return lines


def render_section(size: ModelSize, sec: dict[str, Any], context: dict[str, dict[str, Any]]) -> list[str]:
    rows, raw, run = sec["rows"], sec["raw"], sec["run"]
    lines = [f"## Workload {run['workload']}, {run['dtype']}", "", *section_facts(sec), "", workload_table(sec, context), ""]
    lines.append(f"FLOP limit: {rows['flop_limit']['tflop']:.2f} TFLOP per step (median)"
                 + (f"; GRPO's: {rows['flop_limit_grpo']['tflop']:.2f}." if "flop_limit_grpo" in rows else "."))
    lines.append("Measured steps (s): " + "; ".join(f"{s} {rows[s]['all_totals']}" for s in SYSTEMS if s in rows) + ".")
    lines.append("Per process: " + "; ".join(
        f"{s} {r['process_s']:.0f} s in all, {DTYPE_SHORT[r.get('dtype', 'float32')]} GEMM "
        f"{r.get('gemm_gflops', float('nan')):.0f} GFLOP/s after its setup" for s, r in raw.items()) + ".")
    floor = raw.get("floor")
    if floor and floor.get("first_minibatch_ratio_error") is not None:
        lines.append(f"Floor check: first mini-batch |ratio − 1| ≤ {floor['first_minibatch_ratio_error']:.1e} "
                     "(its decode-loop log-probs match a teacher-forced forward).")
    if run["systems_missing"]:
        lines.append(f"Not measured (failed): {', '.join(run['systems_missing'])}.")
    excess = phase_excess_line(rows)
    if excess:
        lines += ["", excess]
    decode = decode_table_lines(sec, size)
    if decode:
        lines += ["", *decode]
    goal_lines = goals(sec, context)
    if goal_lines:
        lines += ["", "Goals:", "", *goal_lines]
    return lines + [""] + profile_lines(raw)


def profile_lines(raw: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for system, r in raw.items():
        table = r.get("profile_table")
        if not table:
            continue
        step = r.get("profiled_step", {})
        lines += [f"Profile of one extra {SYSTEM_LABELS[system]} step ({step.get('total', float('nan')):.1f} s under "
                  "the profiler; phases " + ", ".join(f"{p} {step.get(p, 0):.1f}" for p in PHASES[:-1] if p in step)
                  + "), top ops by self CPU time:", "", "```",
                  *[ln[:150] for ln in table.splitlines()[2:22]], "```", ""]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = argv[:1] == ["worker"]
    if sub:
        argv = argv[1:]
        parser.add_argument("--system", required=True, choices=SYSTEMS)
        parser.add_argument("--workload-file", required=True)
        parser.add_argument("--model-dir", required=True)
        parser.add_argument("--out", required=True)
        parser.add_argument("--profile-out", default=None, help="write a torch.profiler table of one extra step here")
        parser.add_argument("--gemm-repeats", type=int, default=GEMM_REPEATS)
    parser.add_argument("--workload", choices=("A", "B", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per system (default 3; --tiny: 2)")
    parser.add_argument("--steps-b", type=int, default=None, help="measured steps for workload B (default: --steps)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up steps per system")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: the embedded tiny T5 sizes, 2 steps, seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every process (default: all cores; --tiny: 1)")
    parser.add_argument("--reward", choices=("stub", "classifier"), default="stub")
    parser.add_argument("--reward-cost-s", type=float, default=0.0, help="fixed seconds the stub reward sleeps")
    parser.add_argument("--classifier-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the frozen weights' dtype (bfloat16: LoRA, value head and optimizer stay float32)")
    parser.add_argument("--trl-ref", choices=("copy", "adapter"), default="copy",
                        help="TRL reference: the recipe's full copy (default) or None (adapter disabled)")
    if not sub:
        parser.add_argument("--profile", action="store_true",
                            help="profile one extra lit_rlhf and floor step on workload A (torch.profiler top ops)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="built model, tokenizer, workloads, logs")
    parser.add_argument("--results", default=None, help="write the report here (default benchmarks/RESULTS.md; --tiny: none)")
    if not sub:
        parser.add_argument("--render", action="store_true", help="only rewrite the report from its JSON")
    args = parser.parse_args(argv)
    args.mode = "worker" if sub else "parent"
    args.argv = argv
    if not sub:
        if args.steps is None:
            args.steps = 2 if args.tiny else 3
        if args.threads is None:
            # tiny models: one thread avoids oversubscription on a shared 2-core machine (as tests/conftest.py)
            args.threads = 1 if args.tiny else os.cpu_count()
        if args.results is None and not args.tiny:
            args.results = str(HERE / "RESULTS.md")
        args.gemm_repeats = GEMM_REPEATS_TINY if args.tiny else GEMM_REPEATS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "worker":
        run_worker(args)
        return 0
    if args.render:
        return rerender(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
