"""lit_rlhf's GRPO step: the real PPOModule.training_step (advantage_estimator grpo, k3 KL in the loss) run by a
minimal Lightning Trainer over the benchmark's prompts, timed step by step from the module's own phase timers."""

from __future__ import annotations

import time
from typing import Any

from grpo_trl.common import clocks, new_tokens, profile_table, step_record, stub_reward
from grpo_trl.shapes import BETA, LEARNING_RATE, LORA_ALPHA, LORA_R, LORA_TARGETS, NEW_TOKENS, PROMPTS_PER_STEP, SAMPLES

LIT_PHASES = {"time/ppo/generate": "generate", "time/ppo/reward": "reward", "time/ppo/forward": "scoring",
              "time/ppo/update": "update"}


def lit_module(model_dir: str, n_steps: int, fast: bool, dtype: str):
    """GRPO as a lit_rlhf user sets it up: 4 prompts x 4 samples, one mini-batch of 16, one epoch, LoRA r 16 on
    q_proj/v_proj (no dropout), k3 KL in the loss at a fixed beta 0.04, token-mean loss, AdamW lr 1e-5."""
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.rewards import Reward
    from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

    class StubReward(Reward):
        def compute(self, prompts, responses, references):
            import torch

            return torch.tensor(stub_reward(responses), dtype=torch.float32)

    return PPOModule(
        model_name=model_dir, reward=StubReward(), samples_per_prompt=SAMPLES, rollout_batch_size=PROMPTS_PER_STEP,
        mini_batch_size=PROMPTS_PER_STEP * SAMPLES, ppo_steps=n_steps, fast_rollout=fast, learning_rate=LEARNING_RATE,
        log_samples_every=0, export_adapter=False, num_threads=1, dtype=dtype, seed=0,
        lora=LoraSettings(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=list(LORA_TARGETS)),
        generation=GenerationSettings(min_new_tokens=NEW_TOKENS, max_new_tokens=(NEW_TOKENS, NEW_TOKENS + 1),
                                      top_k=0, top_p=1.0),
        ppo=PPOSettings(advantage_estimator="grpo", kl_in_loss=True, init_kl_coef=BETA, adaptive_kl=False,
                        loss_aggregation="token_mean", ppo_epochs=1),
    )


def lit_checks(module, fast: bool) -> dict[str, Any]:
    """What the step is set up to do, read back from the module."""
    counts = module.policy.parameter_counts()
    p = module.ppo
    return {"trainable_parameters": counts["trainable parameters with value head"],
            "all_parameters": counts["all parameters with value head"],
            "value_head": bool(module.policy.has_value_head), "kl_beta": module.kl_ctl.value,
            "kl_in_loss": p.kl_in_loss, "kl_estimator_in_loss": "k3", "loss_aggregation": p.loss_aggregation,
            "advantage_estimator": p.advantage_estimator, "scale_rewards": p.grpo_scale_rewards,
            "cliprange": p.cliprange, "ppo_epochs": p.ppo_epochs, "reference": "base with the adapter disabled"
            if p.uses_reference else "none", "fast_rollout": fast,
            "frozen_dtypes": sorted({str(q.dtype) for q in module.parameters() if not q.requires_grad}),
            "trainable_dtypes": sorted({str(q.dtype) for q in module.parameters() if q.requires_grad})}


def watch_old_pass(seen: list[bool]):
    """Records what ``old_logprobs_from_update`` decided each step (True: no old-log-prob pass)."""
    from lit_rlhf.modules import ppo as ppo_module

    real = ppo_module.old_logprobs_from_update

    def recording(*args, **kwargs):
        seen.append(bool(real(*args, **kwargs)))
        return seen[-1]

    ppo_module.old_logprobs_from_update = recording


def profile_phases(module, store: dict[str, str]) -> None:
    """Profiles (torch.profiler, CPU) the scoring pass and the update of the next step, each on its own."""
    import torch

    def wrap(owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def profiled(*args, **kwargs):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                result = real(*args, **kwargs)
            store[label] = profile_table(prof)
            store[label + ", by input shape"] = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=15)
            setattr(owner, name, real)
            return result

        setattr(owner, name, profiled)

    wrap(module.policy, "score", "scoring")
    wrap(module, "_ppo_update", "update")


def dual_timer():
    """lit_rlhf's PhaseTimer (wall seconds per phase, what the module logs) that also keeps CPU seconds in ``cpu``."""
    from contextlib import contextmanager

    from lit_rlhf.rollout import PhaseTimer

    class DualTimer(PhaseTimer):
        def __init__(self) -> None:
            super().__init__()
            self.cpu: dict[str, float] = {}

        @contextmanager
        def __call__(self, name: str):
            start, cpu = clocks()
            yield
            self[name] = time.perf_counter() - start
            self.cpu[name] = time.process_time() - cpu

    return DualTimer()


def worker_lit(args, batches: list[list[dict[str, Any]]], out: dict[str, Any]) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    fast = args.system == "lit_rlhf_fast"
    module = lit_module(args.model_dir, len(batches), fast, args.dtype)
    out["checks"] = lit_checks(module, fast)
    module.timings = dual_timer()
    old_skipped: list[bool] = []
    watch_old_pass(old_skipped)
    generated: list[list[int]] = []
    real_decode = module.policy.decode

    def recording_decode(response_ids, response_mask):
        generated.append([int(n) for n in response_mask.sum(1)])
        return real_decode(response_ids, response_mask)

    module.policy.decode = recording_decode
    data = [{"input_ids": torch.tensor([p["ids"] for p in b]), "attention_mask": torch.ones(len(b), len(b[0]["ids"]),
             dtype=torch.long), "query": [p["text"] for p in b]} for b in batches]
    timer = lit_timer(args, module, out, generated, old_skipped, len(batches))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False))


def lit_timer(args, module, out: dict[str, Any], generated: list, old_skipped: list, n_batches: int):
    """The callback that sets each step's response length (warm-up steps: short), times the step and records it."""
    import lightning as L
    import torch

    profile_at = n_batches - 1 if args.profile_out else None
    out["steps"], out["profiles"] = [], {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            n = new_tokens(batch_idx, args.warmup, NEW_TOKENS)
            pl_module.generation.min_new_tokens = n
            pl_module.response_length_limits = lambda b: torch.full((b,), n, dtype=torch.long)
            if batch_idx == profile_at:
                profile_phases(pl_module, out["profiles"])
            self.start = clocks()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            total, cpu_total = (now - then for now, then in zip(clocks(), self.start))
            phases = {LIT_PHASES[k]: v for k, v in pl_module.timings.items() if k in LIT_PHASES}
            cpu = {LIT_PHASES[k]: v for k, v in pl_module.timings.cpu.items() if k in LIT_PHASES}
            rec = step_record(phases, total, generated[-1], [int(batch["attention_mask"].shape[1])] * len(generated[-1]),
                              cpu, cpu_total)
            rec["old_logprob_pass_skipped"] = old_skipped[-1] if old_skipped else None
            rec["warmup"] = batch_idx < args.warmup
            rec["profiled"] = batch_idx == profile_at
            out["steps"].append(rec)
            print(f"[{args.system}] step {batch_idx}: {total:.2f} s " + " ".join(
                f"{k}={v:.2f}" for k, v in phases.items()) + f" lengths {rec['response_lengths']}", flush=True)

    return Timer()
