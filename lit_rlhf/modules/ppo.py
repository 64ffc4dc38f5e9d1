"""PPOModule: one PPO step per Lightning ``training_step``, with manual optimization.

    rollout      generate (``lit_rlhf.rollout``) -> reward -> log-probs, values, reference log-probs (``Policy.score``)
    advantages   KL-shaped rewards -> GAE (or a critic-free estimator) -> whitening over the global batch
    update       ppo_epochs x mini-batches of the clipped policy loss (+ vf_coef x clipped value loss)
    KL control   adaptive or fixed beta, fed the global mean KL

``trainer.global_step`` counts optimizer steps (PPO steps x mini-batches x epochs); the module counts PPO
steps in ``ppo_step``, logs metrics against it and stops the run after ``ppo_steps`` of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_rlhf.modules.base import BuildsPolicy
from lit_rlhf.runtime import distributed as dist
from lit_rlhf import objectives
from lit_rlhf import rollout as ro
from lit_rlhf.runtime import SkipGuard
from lit_rlhf.runtime import DegenerateWatch
from lit_rlhf.models import Policy, model_source_errors
from lit_rlhf.rewards import ProfanityReward, Reward, check_reward_inputs
from lit_rlhf.rollout import Rollout
from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings, as_settings, check, check_precision, plain
from lit_rlhf.settings import lora_settings
from lit_rlhf.settings import WeightDtype, dtype_errors, memory_errors, run_errors
from lit_rlhf.runtime import NumThreads, num_threads_errors

__all__ = ["PPOModule", "PPOSettings", "Rollout"]


class PPOModule(BuildsPolicy, L.LightningModule):
    """RLHF with PPO on a Hugging Face language model with a LoRA adapter and a value head.

    Args:
        model_name: policy: hub name, local path or ``embedded:...``; also picks the data's tokenizer (linked).
        reward: what scores a response (``lit_rlhf.rewards``); default the offline ``ProfanityReward``.
        lora: the LoRA adapter trained by PPO.
        generation: rollout sampling settings.
        ppo: PPO hyperparameters.
        ppo_steps: PPO steps (rollout + update) to run; None: until the trainer stops (max_steps counts optimizer steps).
        learning_rate: AdamW learning rate of the trainable parameters (adapter + value head).
        weight_decay: AdamW weight decay (0: Adam, as the recipe).
        rollout_batch_size: prompts per PPO step per process (linked from data.batch_size).
        mini_batch_size: samples per optimizer step; must divide rollout_batch_size (see micro_batch_size).
        train_dropout: dropout in the update's forward (off: the first importance ratio is exactly 1).
        init_adapter: start from a PEFT adapter, merged into the frozen base (see ``Policy``).
        reference_model: a separate frozen reference model instead of the adapter-disabled policy.
        value_head_dropout: dropout before the value head (active only with train_dropout).
        dtype: dtype of the frozen base (bfloat16: half the memory; adapter, value head, optimizer stay float32).
            auto: bfloat16 on a CUDA device with bfloat16, float32 elsewhere (a CPU); the run logs its choice.
        seed: seed of the per-sample response-length draws and of validation/test sampling.
        log_samples_every: write a prompt / response / reward table every N PPO steps (0: never).
        num_log_samples: rows in that table.
        export_adapter: save the adapter (``save_pretrained``) into ``<log_dir>/adapter`` at the end of fit.
        max_consecutive_skips: stop with an explanation after this many unsafe updates in a row were skipped.
        fast_rollout: sample with the cached loop (``lit_rlhf.models.decoding``), keeping its log-probs and values: no
            scoring forward; the first ratio is then 1 up to float rounding. ``false``: ``generate``, then a
            scoring forward in the update's grouping (first ratio exactly 1); needed with FSDP or ZeRO-3.
        samples_per_prompt: responses per prompt (k): a step has data.batch_size x k of them (grpo, rloo: k >= 2).
        predict_do_sample: sample in ``predict`` (default: greedy decoding).
        num_threads: torch's intra-op CPU threads; auto: 1 for a small policy, else all cores (``lit_rlhf.runtime.threads``).
        gradient_checkpointing: recompute each transformer block's activations in the update's backward pass
            instead of keeping them: activation memory of one block instead of all, for about one more forward.
        attn_implementation: the attention kernel ``from_pretrained`` builds (sdpa, eager, flash_attention_2, ...);
            null: transformers' own choice.
        micro_batch_size: rows per forward/backward in the update; their gradients are accumulated into one
            optimizer step of mini_batch_size rows (the same gradient as one pass: each micro-batch's loss divides
            by the mini-batch's token count). Must divide mini_batch_size; null: one pass per mini-batch.
    """

    policy: Policy  # built in configure_model

    def __init__(
        self,
        model_name: str = "embedded:tiny-t5",
        reward: Reward = lazy_instance(ProfanityReward),
        lora: LoraSettings = LoraSettings(),
        generation: GenerationSettings = GenerationSettings(),
        ppo: PPOSettings = PPOSettings(),
        ppo_steps: int | None = 10,
        learning_rate: float = 1.41e-5,
        weight_decay: float = 0.0,
        rollout_batch_size: int = 16,
        mini_batch_size: int = 4,
        train_dropout: bool = False,
        init_adapter: str | None = None,
        reference_model: str | None = None,
        value_head_dropout: float = 0.1,
        dtype: WeightDtype = "auto",
        seed: int = 0,
        log_samples_every: int = 10,
        num_log_samples: int = 4,
        export_adapter: bool = True,
        max_consecutive_skips: int = 8,
        fast_rollout: bool = True,
        samples_per_prompt: int = 1,
        predict_do_sample: bool = False,
        num_threads: NumThreads = "auto",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        micro_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        # Settings groups come back as plain dicts from a checkpoint's hyperparameters.
        lora = lora_settings(lora)
        generation, ppo = as_settings(GenerationSettings, generation), as_settings(PPOSettings, ppo)
        check(generation.errors() + ppo.errors() + run_errors(
            ppo_steps, learning_rate, rollout_batch_size, mini_batch_size, max_consecutive_skips, samples_per_prompt,
            ppo.advantage_estimator) + num_threads_errors(num_threads)
            + memory_errors(generation.batch_size, samples_per_prompt, mini_batch_size, micro_batch_size))
        # Plain dicts keep checkpoints loadable with torch.load(weights_only=True), which resuming uses.
        self.save_hyperparameters(ignore=["reward", "lora", "generation", "ppo"])
        self.hparams.update(lora=plain(lora), generation=plain(generation), ppo=plain(ppo))
        self.automatic_optimization = False
        # Checkpoints hold only the trainable weights; the frozen base comes back from model_name.
        self.strict_loading = False
        # The policy (with a separate reference) is built in configure_model, where a strategy places or shards
        # it; what can fail cheaply is checked now, before a run folder is written.
        check(dtype_errors(dtype, lora_bias=lora.bias) + model_source_errors(
            {"model.model_name": model_name, "model.init_adapter": init_adapter, "model.reference_model": reference_model}))
        self.policy_kwargs = dict(
            model_name=model_name, lora=lora, init_adapter=init_adapter, reference_model=reference_model,
            value_head_dropout=value_head_dropout, value_head=not ppo.critic_free,
            gradient_checkpointing=gradient_checkpointing, attn_implementation=attn_implementation,
        )
        self.weight_dtype = "float32"  # model.dtype as resolved on the run's device (configure_model)
        self.reward = reward
        self.score_predictions = True  # False in predict when the data lacks what the reward reads (setup)
        # Load and validate the reward now (unknown label, missing model), before a run directory is written.
        self.reward.setup()
        self.ppo, self.generation = ppo, generation
        self.kl_ctl = ppo.kl_controller()
        self.ppo_step = 0
        self._own_rng_restored = False  # on_load_checkpoint gave this process its own RNG states back
        self.skips, self.degenerate = SkipGuard(max_consecutive_skips), DegenerateWatch()
        self.length_generator = torch.Generator().manual_seed(seed)
        self.timings = ro.PhaseTimer()  # seconds per phase of the last step

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        # before the model loads: gradient clipping the strategy cannot do is refused now, not at the first update
        dist.configure_grad_clipping(self._trainer, self.ppo.max_grad_norm)
        # after the data module's setup: a column or references the reward reads and the data lacks fail here
        reward_inputs = getattr(self._trainer.datamodule, "reward_inputs", None) if self._trainer else None
        self.score_predictions = True
        if reward_inputs is not None:
            try:
                check_reward_inputs(self.reward, *reward_inputs(stage))
            except ValueError as err:
                if stage != "predict":
                    raise
                # new prompts without references or columns still get responses, only no score
                self.score_predictions = False
                rank_zero_warn(f"predict: {err}; the predictions are written without a score")

    def _build_policy(self) -> None:
        """The policy (``BuildsPolicy``, built in ``configure_model``); a classifier reward without a dtype of its
        own follows the base dtype. The policy sets eval/train mode itself around each pass (dropout is off unless
        train_dropout)."""
        super()._build_policy()
        follow = getattr(self.reward, "follow_dtype", None)
        if follow is not None:  # a classifier reward without its own dtype runs in the base dtype
            follow(self.weight_dtype)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.AdamW(self.policy.trainable_parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)

    # The reward follows the module to its device. Not in setup(): Lightning moves the module to its device
    # after setup, so there self.device is still the CPU.
    def on_validation_start(self) -> None:
        self.reward.to(self.device)

    on_test_start = on_predict_start = on_validation_start

    def on_fit_start(self) -> None:
        check_precision(self.trainer.precision, self.weight_dtype, self.device)
        if self.hparams.fast_rollout and dist.weights_sharded(self.trainer):
            raise ValueError("model.fast_rollout=true samples outside the strategy's wrapped forward, which sharded "
                             "weights (FSDP, DeepSpeed ZeRO-3) do not allow; set model.fast_rollout=false")
        self.reward.to(self.device)
        counts = self.policy.parameter_counts()
        if not self.policy.has_value_head:  # critic-free: the "with value head" counts would repeat the others
            counts = {k: v for k, v in counts.items() if "value head" not in k}
        rank_zero_info(f"Policy {self.hparams.model_name}: " + ", ".join(f"{k}: {v:,.6g}" for k, v in counts.items()))
        if self.logger is not None:
            self.logger.log_hyperparams({f"params/{k}": v for k, v in counts.items()})

    def on_train_start(self) -> None:
        if not self._own_rng_restored:  # a fresh start (or a checkpoint of another number of processes)
            dist.seed_per_rank(self.trainer)
        self._own_rng_restored = False  # a later fit of this module without a checkpoint starts fresh
        if self._done():
            rank_zero_info(f"Resumed at PPO step {self.ppo_step} of model.ppo_steps={self.hparams.ppo_steps}: nothing to do")
            self.trainer.should_stop = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        # already done (e.g. resumed after the last step): skip the rest of the epoch, and start no other (with
        # max_epochs=-1 the trainer would otherwise start empty epochs forever)
        self.trainer.should_stop = self.trainer.should_stop or self._done()
        return -1 if self._done() else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # 1) rollout: generate, score, and the log-probs/values PPO needs (no grad, no dropout)
        rollout = self._rollout(batch)
        if rollout is None:
            return  # skipped as unsafe (counted and logged)

        # 2) advantages: KL-shaped per-token rewards, GAE, whitening over the global batch
        with self.timings("time/ppo/advantages"):
            kl, non_score, raw_advantages, advantages, returns = self._advantages(rollout)

        # 3) update: epochs x mini-batches of clipped policy + value loss
        with self.timings("time/ppo/update"):
            update_stats = self._ppo_update(rollout, advantages, returns)

        # 4) KL controller, fed the global mean KL per response (every rank gets the same beta)
        kl_per_sample = kl.sum(1)  # [B]
        mean_kl, _, n_samples = objectives.masked_moments(kl_per_sample, torch.ones_like(kl_per_sample), self._reduce)
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(float(mean_kl), int(n_samples))

        self.ppo_step += 1
        stats = self._step_stats(rollout, kl_per_sample, non_score, returns, raw_advantages, advantages)
        stats.update(update_stats)
        stats["objective/kl_coef"] = torch.tensor(kl_coef_used)
        self._finish_step(rollout, stats)

    def _rollout(self, batch: dict[str, Any]) -> Rollout | None:
        """Responses, scores, old log-probs/values and reference log-probs; None when the step is skipped."""
        k = self.hparams.samples_per_prompt
        limits = self._response_length_limits(len(batch["input_ids"]) * k)
        fast, critic = self.hparams.fast_rollout, self.policy.has_value_head
        generated = ro.collect(self.policy, self.reward, batch, self.generation, limits, fast=fast,
                               synced_gpus=dist.synced_gpus(self.trainer), timer=self.timings, repeats=k)
        if self._any_rank(generated.reward_error is not None):
            return self._skip_step(f"the reward returned non-finite scores ({generated.reward_error or 'on another process'})")
        rows, sampled = generated.rows, generated.sampled
        groups = self._minibatch_groups(rows.response_mask, by_length=self.ppo.sort_by_length)
        full_kl = self.ppo.kl_estimator == "full"
        # scored in the update's micro-batches: micro_batch_size bounds this pass too, and the first update's
        # forward sees the same rows and padding (its ratio is exactly 1)
        passes = [micro for group in groups for micro in self._micro_batches(group)]
        with self.timings("time/ppo/forward"):
            # fast rollout kept the sampled tokens' log-probs and values: only the reference is scored
            scores = self.policy.score(rows, passes, policy=not fast, values=critic and not fast, full_kl=full_kl)
        logprobs = sampled.logprobs if fast else scores.logprobs
        values = sampled.values if fast else scores.values if critic else torch.zeros_like(logprobs)
        shaped = objectives.shape_scores(generated.scores.to(self.device), self.ppo.score_scale, self.ppo.score_clip)
        rollout = Rollout(rows, shaped, logprobs, values, scores.ref_logprobs, groups, scores.kl, generated.prompts,
                          generated.texts, generated.scores)
        finite = all(torch.isfinite(t).all() for t in (logprobs, values, scores.ref_logprobs))
        if self._any_rank(not finite):
            return self._skip_step("the model produced non-finite log-probabilities or values in the rollout")
        return rollout

    def _response_length_limits(self, batch_size: int) -> Tensor:
        """This process's per-sample maximum response lengths [B] (see ``distributed.draw_length_limits``)."""
        low, high = self.generation.max_new_tokens
        return dist.draw_length_limits(self.length_generator, low, high, batch_size, self.trainer)

    def _advantages(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-token KL, KL penalty, advantages (raw and final) and returns, [B, T] each."""
        mask = rollout.rows.response_mask
        kl = rollout.kl if rollout.kl is not None else \
            objectives.kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.ppo.kl_estimator) * mask
        p = self.ppo
        return kl, *objectives.compute_advantages(
            p.advantage_estimator, rollout.scores, torch.zeros_like(kl) if p.kl_in_loss else kl, rollout.values, mask,
            self.kl_ctl.value, self.hparams.samples_per_prompt, p.gamma, p.lam, p.whiten_advantages,
            p.grpo_scale_rewards, self._reduce)

    def _finish_step(self, rollout: Rollout, stats: dict[str, Tensor]) -> None:
        """Log the step's statistics and samples; stop after the last PPO step."""
        stats.update({"ppo/skipped_steps_total": torch.tensor(float(self.skips.steps)),
                      "ppo/skipped_updates_total": torch.tensor(float(self.skips.updates)),
                      "env/degenerate_streak": torch.tensor(float(self.degenerate.observe(stats, self.ppo_step)))})
        stats.update({k: torch.tensor(v) for k, v in self.timings.items()})
        self._log_stats(stats)
        every = self.hparams.log_samples_every
        if every and (self.ppo_step % every == 0 or self.ppo_step == 1):
            ro.log_samples(self.logger, rollout, self.hparams.num_log_samples, self.ppo_step)
        self._stop_when_done()

    def _done(self) -> bool:
        return self.hparams.ppo_steps is not None and self.ppo_step >= self.hparams.ppo_steps

    def _stop_when_done(self) -> None:
        self.trainer.should_stop = self.trainer.should_stop or self._done()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Reward, KL and response length on held-out prompts (``val/...`` or ``test/...``)."""
        stats = ro.evaluate(self.policy, self.reward, batch, self.generation, self.hparams.seed + batch_idx,
                            self.hparams.micro_batch_size or self.hparams.mini_batch_size, dist.synced_gpus(self.trainer))
        stage = "test" if self.trainer.testing else "val"
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, sync_dist=True, batch_size=len(batch["input_ids"]))

    test_step = validation_step

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Summaries of new prompts (greedy unless ``predict_do_sample``), scored by the reward, as records for
        ``lit_rlhf.callbacks.PredictionWriter``."""
        settings = GenerationSettings(**{**plain(self.generation), "do_sample": self.hparams.predict_do_sample})
        limits = torch.full((len(batch["input_ids"]),), settings.max_new_tokens[1] - 1)  # the longest allowed
        with ro.evaluation_rng(self.hparams.seed + batch_idx, len(limits), settings):
            reward = self.reward if self.score_predictions else None
            generated = ro.collect(self.policy, reward, batch, settings, limits, synced_gpus=dist.synced_gpus(self.trainer))
        return ro.predict_records(generated, batch, self.reward.describe())

    def on_fit_end(self) -> None:
        if not self.hparams.export_adapter:
            return
        # log_dir broadcasts from rank zero, and gathering sharded weights is a collective: every rank takes part
        target = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter"
        dist.export_policy(self.trainer, self.policy, target)
        rank_zero_info(f"Adapter exported to {target}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = dist.trainable_state(self, checkpoint["state_dict"])
        checkpoint["lit_rlhf"] = {
            "ppo_step": self.ppo_step, "length_generator": self.length_generator.get_state(),
            "value_head": self.policy.has_value_head,  # critic-free estimators train and save none
            **{name: part.state_dict() for name, part in self._stateful().items()},
            # generation samples from the global RNGs, each process from its own stream: restoring every
            # process's makes a resumed run continue exactly
            **dist.checkpoint_rng(self._trainer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_rlhf")
        if state is None:
            raise ValueError("This checkpoint was not written by lit_rlhf's PPOModule (no 'lit_rlhf' state)")
        self.ppo_step = int(state["ppo_step"])
        self.length_generator.set_state(state["length_generator"])
        for name, part in self._stateful().items():
            if name in state:
                part.load_state_dict(state[name])
        self._own_rng_restored = dist.restore_checkpoint_rng(self._trainer, state)

    def _stateful(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_ctl, "skipped": self.skips, "degenerate": self.degenerate}

    def _reduce(self, t: Tensor) -> Tensor:
        return dist.all_reduce_sum(self._trainer, t)

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any process: skip decisions must agree, or DDP's all-reduce would hang."""
        return dist.any_rank(self._trainer, flag, self.device)

    def _skip_update(self, reason: str, opt: Any) -> None:
        opt.zero_grad()
        self.skips.skip_update(self.ppo_step, reason)

    def _skip_step(self, reason: str) -> None:
        """Skip a whole PPO step (its prompts are consumed, so the data position stays that of a normal run)."""
        self.ppo_step += 1
        self.skips.skip_step(self.ppo_step, reason)
        self._log_stats({"ppo/skipped_steps_total": torch.tensor(float(self.skips.steps))})
        self._stop_when_done()

    def _minibatch_groups(self, response_mask: Tensor, by_length: bool) -> list[Tensor]:
        return objectives.minibatch_groups(response_mask.sum(1).cpu(), self.hparams.mini_batch_size, by_length)

    def _micro_batches(self, idx: Tensor) -> tuple[Tensor, ...]:
        """The rows of each forward pass over the mini-batch ``idx``: ``model.micro_batch_size`` at a time (all
        at once without it), in the rollout's scoring pass and in the update alike."""
        return idx.split(self.hparams.micro_batch_size or len(idx))

    # ------------------------------------------------------------------ update

    def _ppo_update(self, rollout: Rollout, advantages: Tensor, returns: Tensor) -> dict[str, Tensor]:
        opt = self.optimizers()
        totals: dict[str, list[Tensor]] = {}
        skipped = 0
        for epoch in range(self.ppo.ppo_epochs):
            groups = rollout.groups if epoch == 0 else self._minibatch_groups(rollout.rows.response_mask, False)
            for idx in groups:
                stats = self._minibatch_step(opt, rollout, advantages, returns, idx)
                skipped += stats is None
                for k, v in (stats or {}).items():
                    totals.setdefault(k, []).append(v)
        # the update's diagnostics are per process: log their mean over processes (the maximum for ratio_max)
        out = dist.mean_over_ranks(self.trainer, {k: torch.stack(v).mean() for k, v in totals.items()})
        if "ppo/policy/ratio_max" in totals:
            out["ppo/policy/ratio_max"] = dist.all_reduce_max(self.trainer, torch.stack(totals["ppo/policy/ratio_max"]).max())
        out["ppo/skipped_minibatches"] = torch.tensor(float(skipped))
        return out

    def _minibatch_step(
        self, opt, rollout: Rollout, advantages: Tensor, returns: Tensor, idx: Tensor
    ) -> dict[str, Tensor] | None:
        """One clipped PPO gradient step on the rows ``idx`` (its micro-batches' gradients accumulated); None if
        it was skipped as unsafe. One decision per mini-batch, taken after every micro-batch's backward."""
        loss_finite, stats = self._accumulate_gradients(rollout, advantages, returns, idx)
        # every rank must take the same decision, or DDP's gradient all-reduce would hang
        ratio = float(stats["ppo/policy/ratio_mean"])
        for unsafe, reason in ((not loss_finite, "the PPO loss was not finite"),
                               (ratio > self.ppo.ratio_threshold, f"the mean importance ratio {ratio:.3g} exceeded "
                                                                   f"model.ppo.ratio_threshold={self.ppo.ratio_threshold}")):
            if self._any_rank(unsafe):
                return self._skip_update(reason, opt)
        grad_norm = dist.grad_norm(self.policy.trainable_parameters(), self.device)
        if self._any_rank(not bool(torch.isfinite(grad_norm))):
            return self._skip_update("the gradient was not finite", opt)
        if self.ppo.max_grad_norm is not None:
            dist.clip_grad_norm(self, opt, self.ppo.max_grad_norm)  # as the strategy allows (FSDP, DeepSpeed)
        opt.step()
        opt.zero_grad()
        self.skips.passed()
        return {"ppo/grad_norm": grad_norm, **stats}

    def _accumulate_gradients(
        self, rollout: Rollout, advantages: Tensor, returns: Tensor, idx: Tensor
    ) -> tuple[bool, dict[str, Tensor]]:
        """Forward and backward of the mini-batch ``idx``, ``model.micro_batch_size`` rows at a time. Every
        micro-batch's loss divides by the whole mini-batch's denominators (global over processes), so the
        accumulated gradient is the gradient of the mini-batch's loss. Returns whether every micro-batch's loss
        was finite, and the mini-batch's statistics (``ppo/...``)."""
        p, critic = self.ppo, self.policy.has_value_head
        counts = objectives.loss_counts(rollout.rows.response_mask[idx.to(rollout.rows.response_mask.device)],
                                      p.loss_aggregation, critic)
        parts, finite = [], True
        micro_batches = self._micro_batches(idx)
        for i, micro in enumerate(micro_batches):
            out, rows, micro = self.policy.forward_rows(rollout.rows, micro, dropout=self.hparams.train_dropout,
                                                        with_values=critic, with_entropy=True)
            t, rm = rows.response_ids.shape[1], rows.response_mask
            old_logprobs, ref = rollout.logprobs[micro, :t], rollout.ref_logprobs[micro, :t] if p.kl_in_loss else None
            loss, stats = objectives.ppo_objective(
                out.logprobs, old_logprobs, out.values, rollout.values[micro, :t], advantages[micro, :t],
                returns[micro, :t], rm, p.cliprange, p.cliprange_value, p.vf_coef, p.loss_aggregation,
                self.generation.max_new_tokens[1] - 1, ref, self.kl_ctl.value if p.kl_in_loss else 0.0,
                reduce_fn=self._reduce, counts=counts)  # the mini-batch's global denominators
            stats["policy/entropy"] = objectives.masked_mean(out.entropy, rm)
            finite = finite and bool(torch.isfinite(loss))
            # DDP all-reduces the last micro-batch's backward only, which carries the sum of them all
            with dist.gradient_sync(self._trainer, sync=i == len(micro_batches) - 1):
                self.manual_backward(loss)  # a non-finite loss's gradient is discarded with the skipped update
            parts.append((stats, int(rm.sum())))
        return finite, {f"ppo/{k}": v for k, v in objectives.combine_micro_batches(parts).items()}

    @torch.no_grad()
    def _step_stats(self, rollout: Rollout, kl_per_sample: Tensor, non_score: Tensor,
                    returns: Tensor, raw_advantages: Tensor, advantages: Tensor) -> dict[str, Tensor]:
        """The step's statistics over the global batch (every process), with one all-reduce."""
        parts = {name: part.to(self.device) for name, part in self.reward.last_components.items()}
        scores = rollout.raw_scores.to(self.device)
        stats = objectives.rollout_statistics(scores, kl_per_sample, non_score, rollout.logprobs, rollout.values, returns,
                                            raw_advantages, advantages, rollout.rows.response_mask, parts, self._reduce)
        if not self.policy.has_value_head:  # no critic: its statistics would describe zeros
            stats = {k: v for k, v in stats.items() if not k.startswith("ppo/val/")}
        if self.hparams.samples_per_prompt > 1:
            stats.update(objectives.group_stats(scores, self.hparams.samples_per_prompt, self._reduce))
        return {**stats, "ppo/step": torch.tensor(float(self.ppo_step))}

    def _log_stats(self, stats: dict[str, Tensor]) -> None:
        scalars = {k: float(v) for k, v in stats.items()}
        if self.logger is not None:
            self.logger.log_metrics(scalars, step=self.ppo_step)
        for bar_name, name in (("reward", "env/reward_mean"), ("kl", "objective/kl")):
            if name in scalars:
                self.log(bar_name, scalars[name], prog_bar=True, logger=False, on_step=True)
        self.log("ppo_step", float(self.ppo_step), prog_bar=True, logger=False, on_step=True)
