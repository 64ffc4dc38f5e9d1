"""TRL 0.11.4's PPOTrainer as the FLAN-T5 detoxification recipe sets it up, run in its own virtual environment
(``benchmarks/.venv-trl``, built on demand)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ppo_step.machine import MemoryWatch, log, timed
from ppo_step.records import parameter_dtypes, step_record
from ppo_step.settings import PPO, TORCH_PIN, TRL_PINS, TRL_VENV
from ppo_step.workloads import make_scorer


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


def trl_python(build: bool, venv: Path = TRL_VENV, pins: list[str] = TRL_PINS) -> Path | None:
    """The python of a TRL environment (``venv`` with ``pins``, by default TRL 0.11's ``benchmarks/.venv-trl``);
    built on demand (torch pinned first so pip cannot swap it)."""
    python, name = venv / "bin" / "python", f"benchmarks/{venv.name}"
    if python.exists():
        check = subprocess.run([str(python), "-c", "import trl, torch; print(trl.__version__, torch.__version__)"],
                               capture_output=True, text=True)
        if check.returncode == 0:
            return python
        log(f"{name} is broken ({check.stderr.strip().splitlines()[-1:]}); rebuilding")
    if not build:
        return None
    log(f"building {name} ({TORCH_PIN}, {' '.join(pins)}) ...")
    shutil.rmtree(venv, ignore_errors=True)
    commands = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", TORCH_PIN],
        [str(python), "-m", "pip", "install", "-q", *pins, TORCH_PIN],
    ]
    for cmd in commands:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"could not build the TRL environment ({' '.join(cmd[-3:])}):\n{done.stderr[-2000:]}")
            return None
    return python
