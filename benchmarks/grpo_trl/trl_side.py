"""TRL 1.16's GRPOTrainer on the same prompts, model and step (runs in the TRL environment: no lit_rlhf here).

Phases are measured by wrapping, on the trainer instance: ``_generate_and_score_completions`` (generation,
reward, scoring), ``_generate_single_turn`` (transformers' ``generate``, the generate phase), ``_calculate_rewards``
(reward) and ``_get_per_token_logps_and_entropies`` (each teacher-forced log-prob pass: inside generate-and-score it
is scoring; the update's forward is the other); update = the step minus generate-and-score (the loss's forward,
backward and AdamW step)."""

from __future__ import annotations

from typing import Any

from grpo_trl.common import clocks, new_tokens, step_record, stub_reward, timed
from grpo_trl.shapes import BETA, LEARNING_RATE, LORA_ALPHA, LORA_R, LORA_TARGETS, NEW_TOKENS, PROMPTS_PER_STEP, SAMPLES


def trl_config(out_dir: str, n_steps: int, dtype: str):
    """GRPOConfig matching lit_rlhf's step: one generation batch of 16 = one optimizer step (steps_per_generation
    1, gradient_accumulation 1, num_iterations 1: on-policy, no old-log-prob pass), exactly 64 new tokens, beta
    0.04 (k3 in the loss), loss_type dapo (token mean over the generation batch), group-scaled rewards, no gradient
    checkpointing (GRPOConfig's default is on), no gradient clipping (lit_rlhf's default), constant lr, no
    autocast (bf16 False: the frozen weights' dtype is set on the model, as lit_rlhf's dtype does)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, seed=0, max_steps=n_steps, per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES,
        num_generations=SAMPLES, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS}, temperature=1.0,
        top_p=1.0, top_k=0, beta=BETA, loss_type="dapo", scale_rewards="group", epsilon=0.2,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, gradient_checkpointing=False, bf16=False, fp16=False, disable_dropout=True,
        shuffle_dataset=False, dataloader_num_workers=0, report_to="none", save_strategy="no", logging_steps=1,
        log_completions=False, remove_unused_columns=False,
    )


def trl_trainer(args, batches: list[list[dict[str, Any]]]):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    prompts = [p["text"] for b in batches for p in b]

    def reward(completions, **kwargs):
        return stub_reward(completions)

    return GRPOTrainer(
        model=model, reward_funcs=reward, args=trl_config(args.cache_dir + "/trl_out", len(batches), args.dtype),
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
        peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                               task_type="CAUSAL_LM"),
    )


def trl_checks(trainer) -> dict[str, Any]:
    from peft import PeftModel

    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peft = isinstance(model, PeftModel)
    reference = ("separate model" if trainer.ref_model is not None else
                 "base with the adapter disabled" if peft and trainer.beta != 0 else "none")
    return {"trainable_parameters": trainable, "all_parameters": sum(p.numel() for p in model.parameters()),
            "kl_beta": trainer.beta, "kl_in_loss": True, "kl_estimator_in_loss": "k3", "loss_type": trainer.loss_type,
            "scale_rewards": trainer.scale_rewards, "epsilon": trainer.epsilon_low,
            "num_iterations": trainer.num_iterations, "steps_per_generation": trainer.args.steps_per_generation,
            "gradient_checkpointing": trainer.args.gradient_checkpointing, "reference": reference,
            "frozen_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
            "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})}


def instrument(trainer, phases: dict[str, float], seen: dict[str, Any]) -> None:
    """Wraps the trainer's methods on the instance to time the phases and record lengths and passes."""
    real_gs, real_gen = trainer._generate_and_score_completions, trainer._generate_single_turn
    real_rew, real_logps = trainer._calculate_rewards, trainer._get_per_token_logps_and_entropies

    def generate_and_score(*a, **k):
        seen["inside"] = True
        try:
            with timed(phases, "generate_and_score"):
                return real_gs(*a, **k)
        finally:
            seen["inside"] = False

    def generate(prompt_ids, *a, **k):
        with timed(phases, "generate"):
            completion_ids, logprobs = real_gen(prompt_ids, *a, **k)
        seen["prompt_lengths"] = [len(p) for p in prompt_ids]
        seen["lengths"] = [len(c) for c in completion_ids]
        return completion_ids, logprobs

    def rewards(*a, **k):
        with timed(phases, "reward"):
            return real_rew(*a, **k)

    def logps(*a, **k):
        key = "scoring" if seen.get("inside") else "update_forward"
        seen[key + "_passes"] = seen.get(key + "_passes", 0) + 1
        with timed(phases, key):
            return real_logps(*a, **k)

    trainer._generate_and_score_completions, trainer._generate_single_turn = generate_and_score, generate
    trainer._calculate_rewards, trainer._get_per_token_logps_and_entropies = rewards, logps


def trl_phases(phases: dict[str, float], total: float, prefix: str = "") -> dict[str, float]:
    """generate, reward, scoring (the rest of generate-and-score) and update (the rest of the step)."""
    gen, rew, gs = (phases.get(prefix + k, 0.0) for k in ("generate", "reward", "generate_and_score"))
    return {"generate": gen, "reward": rew, "scoring": gs - gen - rew, "update": total - gs}


def worker_trl(args, batches: list[list[dict[str, Any]]], out: dict[str, Any]) -> None:
    from transformers import TrainerCallback

    trainer = trl_trainer(args, batches)
    out["checks"] = trl_checks(trainer)
    phases: dict[str, float] = {}
    seen: dict[str, Any] = {}
    instrument(trainer, phases, seen)
    out["steps"] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            n = new_tokens(state.global_step, args.warmup, NEW_TOKENS)
            trainer.generation_config.max_new_tokens = trainer.generation_config.min_new_tokens = n
            trainer.generation_kwargs.update(max_new_tokens=n, min_new_tokens=n)
            phases.clear()
            for key in ("scoring_passes", "update_forward_passes"):
                seen.pop(key, None)
            self.start = clocks()

        def on_step_end(self, targs, state, control, **kwargs):
            total, cpu_total = (now - then for now, then in zip(clocks(), self.start))
            rec = step_record(trl_phases(phases, total), total, seen["lengths"], seen["prompt_lengths"],
                              trl_phases(phases, cpu_total, "cpu:"), cpu_total)
            rec["logprob_passes_in_scoring"] = seen.get("scoring_passes", 0)
            rec["update_forward_s"] = phases.get("update_forward", 0.0)
            rec["warmup"] = state.global_step - 1 < args.warmup
            out["steps"].append(rec)
            print(f"[trl] step {state.global_step - 1}: {total:.2f} s " + " ".join(
                f"{k}={rec[k]:.2f}" for k in ("generate", "scoring", "update")) +
                f" lengths {rec['response_lengths']} scoring passes {rec['logprob_passes_in_scoring']}", flush=True)

    trainer.add_callback(Timer())
    trainer.train()
