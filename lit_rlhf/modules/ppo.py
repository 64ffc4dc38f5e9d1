"""PPOModule: one PPO step per Lightning ``training_step``, with manual optimization.

    rollout      generate (``lit_rlhf.rollout``) -> reward -> log-probs, values, reference log-probs (``Policy.score``)
    advantages   KL-shaped rewards -> GAE (or a critic-free estimator) -> whitening over the global batch
    update       ppo_epochs x mini-batches of the clipped policy loss (+ vf_coef x clipped value loss)
    KL control   adaptive or fixed beta, fed the global mean KL

``trainer.global_step`` counts optimizer steps (PPO steps x mini-batches x epochs); the module counts PPO
steps in ``ppo_step``, logs metrics against it and stops the run after ``ppo_steps`` of them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_rlhf import objectives
from lit_rlhf import rollout as ro
from lit_rlhf.models import Policy
from lit_rlhf.modules.base import BuildsPolicy, policy_errors
from lit_rlhf.modules.ppo_filters import episode_stats, filter_rollout
from lit_rlhf.modules.ppo_passes import (
    check_environment_strategy, environment_errors, environment_notice, old_logprobs_from_update, reference_source,
)
from lit_rlhf.modules.ppo_update import PPOUpdate
from lit_rlhf.rewards import Environment, ProfanityReward, Reward, check_reward_inputs
from lit_rlhf.rollout import Rollout
from lit_rlhf.runtime import DegenerateWatch, NumThreads, SkipGuard, num_threads_errors
from lit_rlhf.runtime import distributed as dist
from lit_rlhf.settings import (
    GenerationSettings, LoraSettings, PPOSettings, WeightDtype, as_settings, check, lora_settings, memory_errors,
    plain, run_errors,
)

__all__ = ["PPOModule", "PPOSettings", "Rollout"]


class PPOModule(PPOUpdate, BuildsPolicy):
    """RLHF with PPO on a Hugging Face language model with a LoRA adapter (or every weight) and a value head.

    Args:
        model_name: policy: hub name, local path or ``embedded:...``; also picks the data's tokenizer (linked).
        reward: what scores a response (``lit_rlhf.rewards``); default the offline ``ProfanityReward``.
        lora: the LoRA adapter trained by PPO (with ``finetune=lora``).
        finetune: ``lora``: train a LoRA adapter on the frozen base. ``full``: train every weight (float32; the
            export is the whole model, in ``<log_dir>/model``); a KL term then needs ``reference_model``.
        generation: rollout sampling settings.
        ppo: PPO hyperparameters.
        ppo_steps: PPO steps (rollout + update) to run; None: until the trainer stops (max_steps counts optimizer steps).
        learning_rate: AdamW learning rate of the trainable parameters (adapter or every weight, + value head).
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
        export_adapter: save the adapter (``save_pretrained``) into ``<log_dir>/adapter`` (or ``model``) at the end.
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
        logprob_chunk_size: 0: each forward builds its [rows, tokens, vocab] logits. N > 0: the LM head runs over N
            positions (rows x tokens) at a time, keeping only their log-probs (and entropies), and the update's
            backward recomputes each chunk's logits: the peak holds one chunk's [N, vocab] float32 logits, for a
            second LM-head matmul in the update. (The exact KL, kl_estimator=full, still builds the logits.)
        environment: multi-turn episodes (``lit_rlhf.rewards.Environment``, e.g. ``ToolEnvironment``; a decoder-only
            chat model): the environment gives the first messages, answers each model turn (tool results) and
            scores the episode (``model.reward`` is not used). Its tokens are in the sequence but out of the loss
            and the KL. null: single-turn responses scored by ``model.reward``.
    """

    policy: Policy  # built in configure_model

    def __init__(
        self,
        model_name: str = "embedded:tiny-t5",
        reward: Reward = lazy_instance(ProfanityReward),
        lora: LoraSettings = LoraSettings(),
        finetune: Literal["lora", "full"] = "lora",
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
        logprob_chunk_size: int = 0,
        environment: Environment | None = None,
    ) -> None:
        super().__init__()
        lora = lora_settings(lora)  # (settings groups come back as plain dicts from a checkpoint's hyperparameters)
        generation, ppo = as_settings(GenerationSettings, generation), as_settings(PPOSettings, ppo)
        check(generation.errors() + ppo.errors() + run_errors(
            ppo_steps, learning_rate, rollout_batch_size, mini_batch_size, max_consecutive_skips, samples_per_prompt,
            ppo.advantage_estimator) + num_threads_errors(num_threads) + memory_errors(
            generation.batch_size, samples_per_prompt, mini_batch_size, micro_batch_size, logprob_chunk_size
        ) + environment_errors(environment, ppo, model_name))
        self.save_settings(ignore=("reward", "environment"), lora=lora, generation=generation, ppo=ppo)
        self.automatic_optimization = False
        # The policy (with a separate reference; none at init_kl_coef 0) is built in configure_model, where a
        # strategy places or shards it; what can fail cheaply is checked now, before a run folder is written.
        ref = reference_source(ppo, reference_model, finetune)
        check(policy_errors(dtype, lora, finetune, model_name=model_name, init_adapter=init_adapter, reference_model=ref))
        self.policy_kwargs = dict(
            model_name=model_name, lora=lora, finetune=finetune, init_adapter=init_adapter, reference_model=ref,
            value_head_dropout=value_head_dropout, value_head=not ppo.critic_free, logprob_chunk_size=logprob_chunk_size,
            gradient_checkpointing=gradient_checkpointing, attn_implementation=attn_implementation)
        # score_predictions: False in predict when the data lacks what the reward reads (setup)
        self.reward, self.environment, self.score_predictions = reward, environment, True
        if environment is None:  # (an environment scores its episodes itself)
            self.reward.setup()  # loaded and validated now (unknown label, missing model), before a run folder is written
        self.ppo, self.generation, self.kl_ctl, self.ppo_step = ppo, generation, ppo.kl_controller(), 0
        self._own_rng_restored = False  # on_load_checkpoint gave this process its own RNG states back
        self.skips, self.degenerate = SkipGuard(max_consecutive_skips), DegenerateWatch()
        self.length_generator = torch.Generator().manual_seed(seed)
        self.timings = ro.PhaseTimer()  # seconds per phase of the last step

    def setup(self, stage: str) -> None:
        # (not RLHFModule's check: manual optimization clips in the update itself)
        # before the model loads: gradient clipping the strategy cannot do is refused now, not at the first update
        dist.configure_grad_clipping(self._trainer, self.ppo.max_grad_norm)
        # after the data module's setup: a column or references the reward reads and the data lacks fail here
        reward_inputs = getattr(self._trainer.datamodule, "reward_inputs", None) if self._trainer else None
        self.score_predictions = True
        scorer, flag = (self.reward, "model.reward") if self.environment is None else (self.environment, "model.environment")
        if reward_inputs is not None:
            try:
                check_reward_inputs(scorer, *reward_inputs(stage), flag=flag)
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
        g = self.generation  # log-probs of the distribution the rollout samples from (model.ppo.logprobs_at_temperature)
        self.policy.logprob_temperature = g.temperature if self.ppo.logprobs_at_temperature and g.do_sample else 1.0
        follow = getattr(self.reward, "follow_dtype", None)
        if follow is not None:  # a classifier reward without its own dtype runs in the base dtype
            follow(self.weight_dtype)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.AdamW(self.policy.trainable_parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)

    # The reward follows the module to its device. Not in setup(): Lightning moves the module to its device
    # after setup, so there self.device is still the CPU.
    def on_validation_start(self) -> None:
        check_environment_strategy(self.environment, self.trainer)
        self.reward.to(self.device)

    on_test_start = on_predict_start = on_validation_start

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the precision (no gradient scaler: manual optimization)
        check_environment_strategy(self.environment, self.trainer)  # (and in validate, test and predict)
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
        if rollout.old_from_update:  # the update's forward gave the old log-probs: their KL is known only now
            kl = self._kl(rollout)
        if self.ppo.entropy_after_update:  # one more forward, without gradients
            update_stats.update(self._entropy_after_update(rollout))

        # 4) KL controller, fed the global mean KL per response (every rank gets the same beta)
        kl_per_sample = kl.sum(1)  # [B]
        mean_kl, _, n_samples = objectives.masked_moments(kl_per_sample, torch.ones_like(kl_per_sample), self._reduce)
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(float(mean_kl), int(n_samples))

        self.ppo_step += 1
        stats = self._step_stats(rollout, kl_per_sample, non_score, returns, raw_advantages, advantages)
        stats.update({**rollout.filter_stats, **update_stats})
        stats["objective/kl_coef"] = torch.tensor(kl_coef_used)
        if rollout.ref_logprobs is None:  # no reference: no KL to log (its terms are 0, its coefficient too)
            del stats["objective/kl"]
        self._finish_step(rollout, stats)

    def _rollout(self, batch: dict[str, Any]) -> Rollout | None:
        """Responses, scores, old log-probs/values and reference log-probs; None when the step is skipped."""
        k = self.hparams.samples_per_prompt
        limits = self.response_length_limits(len(batch["input_ids"]) * k)
        fast, critic = self.hparams.fast_rollout and self.environment is None, self.policy.has_value_head
        if self.environment is not None and self.policy.first_notice("environment"):
            rank_zero_info(environment_notice(self.hparams.fast_rollout))
        generated = ro.collect(self.policy, self.reward, batch, self.generation, limits, fast=fast,
                               synced_gpus=dist.synced_gpus(self.trainer), timer=self.timings, repeats=k,
                               environment=self.environment)
        if self._any_rank(generated.reward_error is not None):
            return self._skip_step(f"the reward returned non-finite scores ({generated.reward_error or 'on another process'})")
        rows, sampled = generated.rows, generated.sampled
        groups = self._minibatch_groups(rows.response_mask, by_length=self.ppo.sort_by_length)
        reference = self.ppo.uses_reference
        full_kl = reference and self.ppo.kl_estimator == "full"
        # (ppo_passes) on-policy: the update's own forward gives the old log-probs, detached
        from_update = old_logprobs_from_update(self.ppo, len(groups), fast, critic, self.hparams.train_dropout)
        # scored in the update's micro-batches: micro_batch_size bounds this pass too, and the first update's
        # forward sees the same rows and padding (its ratio is exactly 1)
        passes = [micro for group in groups for micro in self._micro_batches(group)]
        with self.timings("time/ppo/forward"):
            # fast rollout kept the sampled tokens' log-probs and values: only the reference is scored
            scores = self.policy.score(rows, passes, policy=not (fast or from_update), values=critic and not fast,
                                       reference=reference, full_kl=full_kl)
        logprobs = sampled.logprobs if fast else torch.zeros_like(rows.response_mask, dtype=torch.float) \
            if from_update else scores.logprobs  # (filled by the update's forward)
        values = sampled.values if fast else scores.values if critic else torch.zeros_like(logprobs)
        shaped = objectives.shape_scores(generated.scores.to(self.device), self.ppo.score_scale, self.ppo.score_clip)
        # (ppo_filters) the overlong penalty, and the rows the policy loss is over
        shaped, loss_rows, filtered = filter_rollout(self.ppo, shaped, rows, limits, self.policy.special_tokens, k,
                                                     self._reduce)
        rollout = Rollout(rows, shaped, logprobs, values, scores.ref_logprobs, groups, scores.kl, generated.prompts,
                          generated.texts, generated.scores, old_from_update=from_update, loss_rows=loss_rows,
                          filter_stats={**filtered, **episode_stats(generated.episodes, rows.response_mask, self._reduce)},
                          action_mask=generated.action_mask)
        finite = all(torch.isfinite(t).all() for t in (logprobs, values, scores.ref_logprobs) if t is not None)
        if self._any_rank(not finite):
            return self._skip_step("the model produced non-finite log-probabilities or values in the rollout")
        return rollout

    def response_length_limits(self, batch_size: int) -> Tensor:
        """This process's per-sample maximum response lengths [B] (see ``distributed.draw_length_limits``)."""
        low, high = self.generation.max_new_tokens
        return dist.draw_length_limits(self.length_generator, low, high, batch_size, self.trainer)

    def _advantages(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-token KL, KL penalty, advantages (raw and final) and returns, [B, T] each."""
        mask, kl = rollout.loss_mask, self._kl(rollout)
        p = self.ppo
        return kl, *objectives.compute_advantages(
            p.advantage_estimator, rollout.scores, torch.zeros_like(kl) if p.kl_in_loss else kl, rollout.values, mask,
            self.kl_ctl.value, self.hparams.samples_per_prompt, p.gamma, p.lam, p.whiten_advantages,
            p.grpo_scale_rewards, self._reduce)

    def _kl(self, rollout: Rollout) -> Tensor:
        """Per-token KL to the reference [B, T] (0 without one)."""
        mask = rollout.loss_mask
        if rollout.ref_logprobs is None:
            return torch.zeros_like(rollout.logprobs)
        if rollout.kl is not None:  # (0 outside the response mask; the environment's tokens left out too)
            return rollout.kl if rollout.action_mask is None else rollout.kl * mask
        return objectives.kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.ppo.kl_estimator) * mask

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
                            self.hparams.micro_batch_size or self.hparams.mini_batch_size, dist.synced_gpus(self.trainer),
                            reference=self.ppo.uses_reference, environment=self.environment)
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
            generated = ro.collect(self.policy, self.reward, batch, settings, limits, synced_gpus=dist.synced_gpus(
                self.trainer), environment=self.environment, score=self.score_predictions)
        scorer = self.environment if self.environment is not None else self.reward
        return ro.predict_records(generated, batch, scorer.describe())

    def on_fit_end(self) -> None:
        if self.hparams.export_adapter:  # into <log_dir>/adapter (or model)
            super().on_fit_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # only the trainable weights
        checkpoint["lit_rlhf"] = {
            "ppo_step": self.ppo_step, "length_generator": self.length_generator.get_state(),
            "value_head": self.policy.has_value_head,  # critic-free estimators train and save none
            **{name: part.state_dict() for name, part in self._stateful().items()},
            # generation samples from the global RNGs, each process from its own stream: restoring every
            # process's makes a resumed run continue exactly
            **dist.checkpoint_rng(self._trainer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # (the weights are of this run's kind, LoRA or full)
        state = checkpoint.get("lit_rlhf")
        if state is None:
            raise ValueError("This checkpoint was not written by lit_rlhf's PPOModule (no 'lit_rlhf' state)")
        self.ppo_step = int(state["ppo_step"])
        self.length_generator.set_state(state["length_generator"])
        for name, part in self._stateful().items():
            if name in state:
                part.load_state_dict(state[name])
        self._own_rng_restored = dist.restore_checkpoint_rng(self._trainer, state)
        if not self.ppo.uses_reference and self.kl_ctl.value != 0:
            raise ValueError(f"This checkpoint's KL coefficient is {self.kl_ctl.value:.4g}: it needs a reference, which "
                             "model.ppo.init_kl_coef=0 does not build; resume with the run's own init_kl_coef")

    def _stateful(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_ctl, "skipped": self.skips, "degenerate": self.degenerate}

    def _skip_step(self, reason: str) -> None:
        """Skip a whole PPO step (its prompts are consumed, so the data position stays that of a normal run)."""
        self.ppo_step += 1
        self.skips.skip_step(self.ppo_step, reason)
        self._log_stats({"ppo/skipped_steps_total": torch.tensor(float(self.skips.steps))})
        self._stop_when_done()
