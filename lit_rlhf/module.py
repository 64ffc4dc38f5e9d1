"""PPOModule: one PPO step per Lightning ``training_step``, with manual optimization.

    rollout      generate responses (eval mode, KV cache) -> reward -> log-probs and values of the
                 response tokens under the policy, log-probs under the reference (adapter disabled)
    advantages   per-token rewards r_t = -beta * KL_t (+ score on the last token) -> GAE -> whitening
                 over the global batch
    update       ppo_epochs x mini-batches: clipped policy loss + vf_coef * clipped value loss
    KL control   adaptive or fixed beta, fed the global mean KL

``trainer.global_step`` counts optimizer steps (PPO steps x mini-batches x epochs); the module counts PPO
steps in ``ppo_step``, logs metrics against it and stops the run after ``ppo_steps`` of them.

Where the parts live: generation, decoding and scoring in ``lit_rlhf.rollout`` (shared with evaluation and
the toxicity callback), log-probs of rows in ``Policy.score``, the math in ``lit_rlhf.ppo``, settings in
``lit_rlhf.settings``, cross-process agreement in ``lit_rlhf.distributed``, files and RNG states in
``lit_rlhf.io``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_rlhf import distributed as dist
from lit_rlhf import ppo as ppo_math
from lit_rlhf import rollout as ro
from lit_rlhf.io import rng_state, set_rng_state
from lit_rlhf.policy import Policy
from lit_rlhf.rewards import ProfanityReward, Reward
from lit_rlhf.rollout import Rollout
from lit_rlhf.settings import (
    GenerationSettings, LoraSettings, PPOSettings, as_settings, check, check_precision, plain, run_errors,
)

__all__ = ["PPOModule", "PPOSettings", "Rollout"]


class PPOModule(L.LightningModule):
    """RLHF with PPO on a Hugging Face language model with a LoRA adapter and a value head.

    Args:
        model_name: policy model: hub name, local path, or ``embedded:tiny-t5`` / ``embedded:tiny-gpt2``.
            Also picks the data module's tokenizer (linked in the CLI).
        reward: what scores a response (``lit_rlhf.rewards``); default the offline ``ProfanityReward``.
        lora: the LoRA adapter trained by PPO.
        generation: rollout sampling settings.
        ppo: PPO hyperparameters.
        ppo_steps: number of PPO steps (rollout + update) to run; None: until the trainer stops (max_steps
            counts optimizer steps = ppo_steps x mini-batches per step x ppo_epochs).
        learning_rate: AdamW learning rate over the trainable parameters (adapter + value head).
        weight_decay: AdamW weight decay (0: Adam, as the recipe).
        rollout_batch_size: prompts per PPO step per process (linked from the data module's batch_size).
        mini_batch_size: samples per gradient step; must divide rollout_batch_size.
        train_dropout: use dropout in the PPO update's forward pass. Off by default: the rollout is sampled
            without dropout, so with it off the first mini-batch's importance ratio is exactly 1.
        init_adapter: start from an existing PEFT adapter, merged into the frozen base (see ``Policy``).
        reference_model: a separate frozen reference model instead of the adapter-disabled policy.
        value_head_dropout: dropout before the value head (active only with train_dropout).
        dtype: dtype of the frozen base weights.
        seed: seed of the per-sample response-length draws.
        log_samples_every: write a table of prompt / response / reward samples every N PPO steps (0: never).
        num_log_samples: rows in that table.
        export_adapter: save the adapter with ``save_pretrained`` into ``<log_dir>/adapter`` at the end of fit.
        max_consecutive_skips: stop the run with an explanation after this many updates in a row were skipped
            as unsafe (non-finite reward, log-probability, loss or gradient; ratio above ppo.ratio_threshold).
        fast_rollout: sample with lit_rlhf's cached decode loop (``lit_rlhf.decoding``): finished rows leave the
            batch, and the rollout's log-probs and values are those computed while sampling, which saves the
            policy's scoring forward. The first mini-batch's ratio is then 1 up to float rounding (~1e-6)
            rather than exactly. Not with sharded weights (FSDP, DeepSpeed ZeRO-3).
    """

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
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        seed: int = 0,
        log_samples_every: int = 10,
        num_log_samples: int = 4,
        export_adapter: bool = True,
        max_consecutive_skips: int = 8,
        fast_rollout: bool = False,
    ) -> None:
        super().__init__()
        # Settings groups come back as plain dicts from a checkpoint's hyperparameters.
        lora, generation, ppo = (as_settings(cls, v) for cls, v in
                                 ((LoraSettings, lora), (GenerationSettings, generation), (PPOSettings, ppo)))
        check(lora.errors() + generation.errors() + ppo.errors() + run_errors(
            ppo_steps, learning_rate, rollout_batch_size, mini_batch_size, max_consecutive_skips))
        # Plain dicts keep checkpoints loadable with torch.load(weights_only=True), which resuming uses.
        self.save_hyperparameters(ignore=["reward", "lora", "generation", "ppo"])
        self.hparams.update(lora=plain(lora), generation=plain(generation), ppo=plain(ppo))
        self.automatic_optimization = False
        # Checkpoints hold only the trainable weights; the frozen base comes back from model_name.
        self.strict_loading = False
        self.policy = Policy(
            model_name, lora=lora, init_adapter=init_adapter, reference_model=reference_model,
            value_head_dropout=value_head_dropout, dtype=dtype,
        )
        # The policy sets eval/train mode itself around each pass (dropout is off unless train_dropout);
        # train() here only keeps Lightning from warning about modules left in eval mode by from_pretrained.
        self.policy.train()
        self.reward = reward
        # Load and validate the reward now (unknown label, missing model), before a run directory is written.
        self.reward.setup()
        self.ppo, self.generation = ppo, generation
        self.kl_ctl = make_kl_controller(ppo)
        self.ppo_step = 0
        self.consecutive_skips = self.skipped_updates = self.skipped_steps = 0
        self.length_generator = torch.Generator().manual_seed(seed)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ Lightning hooks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    # The reward follows the module to its device. Not in setup(): Lightning moves the module to its device
    # after setup, so there self.device is still the CPU.
    def on_validation_start(self) -> None:
        self.reward.to(self.device)

    def on_test_start(self) -> None:
        self.reward.to(self.device)

    def on_fit_start(self) -> None:
        check_precision(self.trainer.precision)
        if self.hparams.fast_rollout and dist.weights_sharded(self.trainer):
            raise ValueError(
                "model.fast_rollout=true samples outside the strategy's wrapped forward, which sharded weights "
                "(FSDP, DeepSpeed ZeRO-3) do not allow; set model.fast_rollout=false"
            )
        self.reward.to(self.device)
        counts = self.policy.parameter_counts()
        rank_zero_info(f"Policy {self.hparams.model_name}: " + ", ".join(f"{k}: {v:,.2f}" if isinstance(v, float)
                                                                       else f"{k}: {v:,}" for k, v in counts.items()))
        if self.logger is not None:
            self.logger.log_hyperparams({f"params/{k}": v for k, v in counts.items()})

    def on_train_start(self) -> None:
        if self.trainer.world_size > 1:
            # seed_everything gives every process the same seed, and a resumed run restores rank zero's RNG
            # state on all of them: processes would sample their responses with the same random numbers (on
            # the tiny model, 82% of the tokens of two ranks' responses were equal). Derive a distinct,
            # reproducible stream per process (after any checkpoint restore, hence here).
            torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + self.trainer.global_rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.hparams.ppo_steps is not None and self.ppo_step >= self.hparams.ppo_steps:
            return -1  # already done (e.g. resumed after the last step): skip the rest of the epoch
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # 1) rollout: generate, score, and the log-probs/values PPO needs (no grad, no dropout)
        rollout = self._rollout(batch)
        if rollout is None:
            return  # skipped as unsafe (counted and logged)

        # 2) advantages: KL-shaped per-token rewards, GAE, whitening over the global batch
        with self._timed("time/ppo/advantages"):
            kl, non_score, raw_advantages, advantages, returns = self._advantages(rollout)

        # 3) update: epochs x mini-batches of clipped policy + value loss
        with self._timed("time/ppo/update"):
            update_stats = self._ppo_update(rollout, advantages, returns)

        # 4) KL controller, fed the global mean KL per response (every rank gets the same beta)
        kl_per_sample = kl.sum(1)  # [B]
        mean_kl, _, n_samples = ppo_math.masked_moments(kl_per_sample, torch.ones_like(kl_per_sample), self._reduce)
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(float(mean_kl), int(n_samples))

        self.ppo_step += 1
        stats = self._step_stats(rollout, kl_per_sample, non_score, returns, raw_advantages, advantages)
        stats.update(update_stats)
        stats["objective/kl_coef"] = torch.tensor(kl_coef_used)
        self._finish_step(rollout, stats)

    def _rollout(self, batch: dict[str, Any]) -> Rollout | None:
        """Responses, scores, old log-probs/values and reference log-probs; None when the step is skipped."""
        limits = self._response_length_limits(len(batch["input_ids"]))
        fast = self.hparams.fast_rollout
        generated = ro.collect(self.policy, self.reward, batch, self.generation, limits, fast=fast,
                               synced_gpus=dist.synced_gpus(self.trainer), timer=self._timed)
        if self._any_rank(generated.reward_error is not None):
            return self._skip_step(f"the reward returned non-finite scores ({generated.reward_error or 'on another process'})")
        rows, sampled = generated.rows, generated.sampled
        groups = self._minibatch_groups(rows.response_mask, shuffle_rows=False)
        full_kl = self.ppo.kl_estimator == "full"
        with self._timed("time/ppo/forward"):
            # fast rollout kept the sampled tokens' log-probs and values: only the reference is scored
            scores = self.policy.score(rows, groups, policy=not fast, values=not fast, full_kl=full_kl)
        logprobs = sampled.logprobs if fast else scores.logprobs
        values = sampled.values if fast else scores.values
        rollout = Rollout(rows, self._shape_scores(generated.scores.to(self.device)), logprobs, values,
                          scores.ref_logprobs, groups, scores.kl, generated.prompts, generated.texts, generated.scores)
        finite = all(torch.isfinite(t).all() for t in (logprobs, values, scores.ref_logprobs))
        if self._any_rank(not finite):
            return self._skip_step("the model produced non-finite log-probabilities or values in the rollout")
        return rollout

    def _response_length_limits(self, batch_size: int) -> Tensor:
        """This process's per-sample maximum response lengths [B] (see ``distributed.draw_length_limits``)."""
        low, high = self.generation.max_new_tokens
        return dist.draw_length_limits(self.length_generator, low, high, batch_size, self.trainer)

    def _advantages(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-token KL, KL penalty, GAE advantages (raw and whitened) and returns, [B, T] each."""
        mask = rollout.rows.response_mask
        kl = rollout.kl if rollout.kl is not None else \
            ppo_math.kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.ppo.kl_estimator) * mask
        rewards, non_score = ppo_math.compute_rewards(rollout.scores, kl, mask, self.kl_ctl.value)
        raw_advantages, returns = ppo_math.compute_gae(rewards, rollout.values, mask, self.ppo.gamma, self.ppo.lam)
        advantages = raw_advantages
        if self.ppo.whiten_advantages:
            advantages = ppo_math.masked_whiten(raw_advantages, mask, reduce_fn=self._reduce)
        return kl, non_score, raw_advantages, advantages, returns

    def _finish_step(self, rollout: Rollout, stats: dict[str, Tensor]) -> None:
        """Log the step's statistics and samples; stop after the last PPO step."""
        stats["ppo/skipped_steps_total"] = torch.tensor(float(self.skipped_steps))
        stats["ppo/skipped_updates_total"] = torch.tensor(float(self.skipped_updates))
        stats.update({k: torch.tensor(v) for k, v in self.timings.items()})
        self._log_stats(stats)
        every = self.hparams.log_samples_every
        if every and (self.ppo_step % every == 0 or self.ppo_step == 1):
            self._log_samples(rollout)
        self._stop_when_done()

    def _stop_when_done(self) -> None:
        if self.hparams.ppo_steps is not None and self.ppo_step >= self.hparams.ppo_steps:
            self.trainer.should_stop = True

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx, "test")

    @torch.no_grad()
    def _evaluate_batch(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        """Reward, KL to the reference and response length of sampled responses on held-out prompts, sampled
        with a seeded random stream isolated from training's (a validation pass leaves a resume exact)."""
        with ro.evaluation_rng(self.hparams.seed + batch_idx, len(batch["input_ids"]), self.generation) as limits:
            generated = ro.collect(self.policy, self.reward, batch, self.generation, limits,
                                   synced_gpus=dist.synced_gpus(self.trainer))
        if generated.scores is None:
            raise ValueError(f"The reward returned non-finite scores on held-out prompts: {generated.reward_error}")
        rows = generated.rows
        groups = list(torch.arange(len(generated.texts)).split(self.hparams.mini_batch_size))
        scores = self.policy.score(rows, groups, values=False)
        kl = (scores.logprobs - scores.ref_logprobs).sum(1)
        size = len(generated.texts)
        self.log(f"{stage}/reward_mean", generated.scores.float().mean(), sync_dist=True, batch_size=size)
        self.log(f"{stage}/kl", kl.mean(), sync_dist=True, batch_size=size)
        self.log(f"{stage}/response_length", rows.response_mask.sum(1).float().mean(), sync_dist=True, batch_size=size)

    def on_fit_end(self) -> None:
        if not self.hparams.export_adapter:
            return
        # log_dir broadcasts from rank zero, and gathering sharded weights is a collective: every rank takes part
        target = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter"
        with dist.full_weights(self.trainer, self.policy) as state_dict:
            if self.trainer.is_global_zero:
                self.policy.export(target, state_dict)
                rank_zero_info(f"Adapter exported to {target}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # under FSDP, parameter names include the wrappers' segments; checkpoint keys do not
        trainable = {
            name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            for name, p in self.named_parameters() if p.requires_grad
        }
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lit_rlhf"] = {
            "ppo_step": self.ppo_step,
            "kl_controller": self.kl_ctl.state_dict(),
            "length_generator": self.length_generator.get_state(),
            "skipped": [self.skipped_steps, self.skipped_updates, self.consecutive_skips],
            # generation samples from the global RNGs: restoring them makes a resumed run continue exactly
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_rlhf")
        if state is None:
            raise ValueError("This checkpoint was not written by lit_rlhf's PPOModule (no 'lit_rlhf' state)")
        self.ppo_step = int(state["ppo_step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.length_generator.set_state(state["length_generator"])
        self.skipped_steps, self.skipped_updates, self.consecutive_skips = state.get("skipped", [0, 0, 0])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])

    # ------------------------------------------------------------------ guards

    def _reduce(self, t: Tensor) -> Tensor:
        return dist.all_reduce_sum(self._trainer, t)

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any process: skip decisions must agree, or DDP's all-reduce would hang."""
        return dist.any_rank(self._trainer, flag, self.device)

    def _skip_update(self, reason: str) -> None:
        self.skipped_updates += 1
        self._count_skip(reason)

    def _skip_step(self, reason: str) -> None:
        """Skip a whole PPO step (its prompts are consumed, so the data position stays that of a normal run)."""
        self.skipped_steps += 1
        self.ppo_step += 1
        self._count_skip(reason)
        self._log_stats({"ppo/skipped_steps_total": torch.tensor(float(self.skipped_steps))})
        self._stop_when_done()

    def _count_skip(self, reason: str) -> None:
        self.consecutive_skips += 1
        rank_zero_warn(f"PPO step {self.ppo_step}: update skipped because {reason}.")
        if self.consecutive_skips >= self.hparams.max_consecutive_skips:
            raise RuntimeError(
                f"Stopping: {self.consecutive_skips} PPO updates in a row were skipped; the last because {reason}. "
                "Lower model.learning_rate, set model.ppo.max_grad_norm, clip rewards with model.ppo.score_clip, "
                "check the reward model's outputs, or (for ratio skips) raise model.ppo.ratio_threshold. "
                "Resume from the last checkpoint (--ckpt_path) after changing the setting."
            )

    def _shape_scores(self, scores: Tensor) -> Tensor:
        scores = scores.float() * self.ppo.score_scale
        if self.ppo.score_clip is not None:
            scores = scores.clamp(-self.ppo.score_clip, self.ppo.score_clip)
        return scores

    def _minibatch_groups(self, response_mask: Tensor, shuffle_rows: bool) -> list[Tensor]:
        """Row indices of each mini-batch: by response length (less padding) or a random permutation."""
        if self.ppo.sort_by_length and not shuffle_rows:
            order = torch.argsort(response_mask.sum(1), stable=True).cpu()
        else:
            order = torch.randperm(response_mask.shape[0])
        groups = list(order.split(self.hparams.mini_batch_size))
        return [groups[i] for i in torch.randperm(len(groups)).tolist()]

    # ------------------------------------------------------------------ update

    def _ppo_update(self, rollout: Rollout, advantages: Tensor, returns: Tensor) -> dict[str, Tensor]:
        opt = self.optimizers()
        totals: dict[str, list[Tensor]] = {}
        skipped = 0
        for epoch in range(self.ppo.ppo_epochs):
            mask = rollout.rows.response_mask
            groups = rollout.groups if epoch == 0 else self._minibatch_groups(mask, shuffle_rows=True)
            for idx in groups:
                stats = self._minibatch_step(opt, rollout, advantages, returns, idx)
                skipped += stats is None
                for k, v in (stats or {}).items():
                    totals.setdefault(k, []).append(v)
        out = {k: torch.stack(v).mean() for k, v in totals.items()}
        if out and self.trainer.world_size > 1:
            # the update's diagnostics are per process: log their mean over processes (the maximum for ratio_max)
            names = sorted(out)
            means = self._reduce(torch.stack([out[k].float() for k in names])) / self.trainer.world_size
            out = dict(zip(names, means.unbind()))
            out["ppo/policy/ratio_max"] = dist.all_reduce_max(self.trainer, torch.stack(totals["ppo/policy/ratio_max"]).max())
        out["ppo/skipped_minibatches"] = torch.tensor(float(skipped))
        return out

    def _minibatch_step(
        self, opt, rollout: Rollout, advantages: Tensor, returns: Tensor, idx: Tensor
    ) -> dict[str, Tensor] | None:
        """One clipped PPO gradient step on the rows ``idx``; None if it was skipped as unsafe."""
        out, rows, idx = self.policy.forward_rows(rollout.rows, idx, dropout=self.hparams.train_dropout,
                                                  return_logits=True)
        t, rm = rows.response_ids.shape[1], rows.response_mask
        old_logprobs, old_values = rollout.logprobs[idx, :t], rollout.values[idx, :t]
        adv, ret = advantages[idx, :t], returns[idx, :t]
        pg_loss = ppo_math.policy_loss(out.logprobs, old_logprobs, adv, rm, self.ppo.cliprange)
        vf_loss = ppo_math.value_loss(out.values, old_values, ret, rm, self.ppo.cliprange_value)
        loss = pg_loss + self.ppo.vf_coef * vf_loss
        diag = ppo_math.ppo_diagnostics(out.logprobs, old_logprobs, out.values, old_values, rm,
                                        self.ppo.cliprange, self.ppo.cliprange_value)
        # every rank must take the same decision, or DDP's gradient all-reduce would hang
        if self._any_rank(not bool(torch.isfinite(loss))):
            opt.zero_grad()
            return self._skip_update("the PPO loss was not finite")
        if self._any_rank(bool(diag["policy/ratio_mean"] > self.ppo.ratio_threshold)):
            opt.zero_grad()
            return self._skip_update(
                f"the mean importance ratio {float(diag['policy/ratio_mean']):.3g} exceeded "
                f"model.ppo.ratio_threshold={self.ppo.ratio_threshold}"
            )
        self.manual_backward(loss)
        grad_norm = self._grad_norm()
        if self._any_rank(not bool(torch.isfinite(grad_norm))):
            opt.zero_grad()
            return self._skip_update("the gradient was not finite")
        if self.ppo.max_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad()
        self.consecutive_skips = 0
        with torch.no_grad():
            stats = {"ppo/policy/entropy": self.policy.entropy(out.logits), "ppo/val/vpred": out.values,
                     "ppo/val/error": (out.values - ret).square()}
            stats = {k: ppo_math.masked_mean(v, rm) for k, v in stats.items()}
        return {"ppo/loss/policy": pg_loss.detach(), "ppo/loss/value": vf_loss.detach(), "ppo/loss/total": loss.detach(),
                "ppo/grad_norm": grad_norm, **stats, **{f"ppo/{k}": v for k, v in diag.items()}}

    def _grad_norm(self) -> Tensor:
        # gradients are already all-reduced here under DDP, so every rank sees the same norm; under FSDP each
        # rank holds a shard (so the decision is still agreed), and DeepSpeed keeps them in its own buffers
        # (p.grad is None: nothing to check here)
        grads = [p.grad.detach().float().norm() for p in self.policy.trainable_parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ statistics and logging

    @torch.no_grad()
    def _step_stats(self, rollout: Rollout, kl_per_sample: Tensor, non_score: Tensor,
                    returns: Tensor, raw_advantages: Tensor, advantages: Tensor) -> dict[str, Tensor]:
        """The step's statistics over the global batch (every process), with one all-reduce."""
        mask = rollout.rows.response_mask
        ones = torch.ones_like(kl_per_sample)
        per_sample = {
            "env/reward": rollout.raw_scores.float().to(self.device), "objective/kl": kl_per_sample,
            "objective/entropy": -(rollout.logprobs * mask).sum(1), "tokens/responses_len": mask.sum(1).float(),
            "ppo/mean_non_score_reward": non_score.sum(1),
            **{f"env/reward/{name}": part.float().to(self.device) for name, part in self.reward.last_components.items()},
        }
        per_token = {"ppo/returns": returns, "ppo/val": rollout.values, "residual": returns - rollout.values,
                     "ppo/policy/advantages": advantages, "ppo/policy/advantages_raw": raw_advantages}
        names = list(per_sample) + list(per_token)
        pairs = [(v, ones) for v in per_sample.values()] + [(v, mask) for v in per_token.values()]
        mean, var, _ = (dict(zip(names, t.float().unbind())) for t in ppo_math.masked_moments_many(pairs, self._reduce))
        stats = {f"{name}_mean" if name.startswith("env/reward/") else name: mean[name]
                 for name in ("objective/kl", "objective/entropy", "ppo/mean_non_score_reward", *per_sample)
                 if not name.startswith(("env/reward", "tokens/")) or name.startswith("env/reward/")}
        return {
            **stats,
            "env/reward_mean": mean["env/reward"], "env/reward_std": var["env/reward"].sqrt(),
            "ppo/mean_scores": mean["env/reward"], "tokens/responses_len_mean": mean["tokens/responses_len"],
            "ppo/returns/mean": mean["ppo/returns"], "ppo/returns/var": var["ppo/returns"],
            "ppo/val/mean": mean["ppo/val"], "ppo/val/var": var["ppo/val"],
            "ppo/val/var_explained": 1.0 - var["residual"] / var["ppo/returns"].clamp(min=1e-8),
            "ppo/policy/advantages_mean": mean["ppo/policy/advantages"],
            "ppo/policy/advantages_raw_mean": mean["ppo/policy/advantages_raw"],
            "ppo/step": torch.tensor(float(self.ppo_step)),
        }

    def _log_stats(self, stats: dict[str, Tensor]) -> None:
        scalars = {k: float(v) for k, v in stats.items()}
        if self.logger is not None:
            self.logger.log_metrics(scalars, step=self.ppo_step)
        for bar_name, name in (("reward", "env/reward_mean"), ("kl", "objective/kl")):
            if name in scalars:
                self.log(bar_name, scalars[name], prog_bar=True, logger=False, on_step=True)
        self.log("ppo_step", float(self.ppo_step), prog_bar=True, logger=False, on_step=True)

    def _log_samples(self, rollout: Rollout) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        n = min(self.hparams.num_log_samples, len(rollout.responses))
        rows = ["| query | response | reward |", "|---|---|---|"]
        cell = lambda text: text.replace("\n", " ").replace("|", "\\|")  # noqa: E731
        for i in range(n):
            rows.append(f"| {cell(rollout.prompts[i])[-300:]} | {cell(rollout.responses[i])} | {float(rollout.raw_scores[i]):.4f} |")
        experiment.add_text("samples", "\n".join(rows), self.ppo_step)

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start


def make_kl_controller(settings: PPOSettings) -> ppo_math.FixedKLController | ppo_math.AdaptiveKLController:
    if settings.adaptive_kl:
        return ppo_math.AdaptiveKLController(settings.init_kl_coef, settings.kl_target, settings.kl_horizon)
    return ppo_math.FixedKLController(settings.init_kl_coef)
