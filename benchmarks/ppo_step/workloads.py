"""The benchmark's rewards, model, classifier and workloads (prompts and per-sample response lengths), made once
by the parent process and read by every system."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ppo_step.machine import log
from ppo_step.settings import (DATA_SEED, FLAN_T5_BASE, FLAN_T5_BASE_PARAMETERS, GRPO_SAMPLES_PER_PROMPT,
                               LENGTH_SEED, NEW_TOKENS, NEW_TOKENS_TINY, PPO, WARMUP_NEW_TOKENS,
                               WARMUP_NEW_TOKENS_TINY, WORKLOAD_A_PROMPT_TOKENS, ModelSize)


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


def load_work(path: str) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=False)


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
