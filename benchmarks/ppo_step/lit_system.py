"""lit_rlhf's own step: PPOModule.training_step (exact, fast_rollout, GRPO k 4) run by a Lightning Trainer over the
workload's batches, timed step by step, with its cached decode loop timed decoder step by decoder step."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ppo_step.machine import MemoryWatch, log
from ppo_step.records import parameter_dtypes, step_record, write_profile
from ppo_step.settings import GRPO_SAMPLES_PER_PROMPT, GRPO_SETTINGS, LENGTH_SEED, LIT_PHASES, PPO, SYSTEM_LABELS
from ppo_step.workloads import grpo_batches, make_scorer


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

        def step(model, state, *args):
            starts.append((int(state.step_input.shape[0]), len(starts), int(state.attention.shape[1]), time.perf_counter()))
            return real_step(model, state, *args)

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
