"""PPOModule: one PPO step per Lightning ``training_step``, with manual optimization.

    rollout      generate responses (eval mode, KV cache) -> reward -> log-probs and values of the
                 response tokens under the policy, log-probs under the reference (adapter disabled)
    advantages   per-token rewards r_t = -beta * KL_t (+ score on the last token) -> GAE -> whitening
                 over the global batch
    update       ppo_epochs x mini-batches: clipped policy loss + vf_coef * clipped value loss
    KL control   adaptive or fixed beta, fed the global mean KL

``trainer.global_step`` counts optimizer steps (PPO steps x mini-batches x epochs); the module counts PPO
steps in ``ppo_step``, logs metrics against it and stops the run after ``ppo_steps`` of them.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import numpy as np
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_rlhf import ppo as ppo_math
from lit_rlhf.checkpoint import current_umask
from lit_rlhf.decoding import SampledRollout
from lit_rlhf.policy import GenerationSettings, LoraSettings, Policy, trim_batch
from lit_rlhf.rewards import NonFiniteRewardError, ProfanityReward, Reward


@dataclass
class PPOSettings:
    """PPO hyperparameters (defaults: the FLAN-T5 detoxification recipe, i.e. TRL 0.11's defaults)."""

    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    init_kl_coef: float = 0.2
    """Initial KL penalty coefficient beta."""
    adaptive_kl: bool = True
    """Adapt beta towards ``kl_target`` (Ziegler et al. 2019); False keeps it fixed at ``init_kl_coef``."""
    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in samples."""
    kl_estimator: Literal["kl", "abs", "mse", "full"] = "kl"
    """Per-token KL estimator in the reward penalty: kl (k1), abs, mse (k2), full (exact over the vocabulary)."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clipping epsilon."""
    cliprange_value: float = 0.2
    """Value clipping epsilon."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    max_grad_norm: float | None = None
    """Clip the gradient norm of the trainable parameters to this value (None: no clipping)."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch whose mean importance ratio exceeds this (guards against policy collapse)."""
    whiten_advantages: bool = True
    """Whiten advantages over the whole (global) rollout batch."""
    score_scale: float = 1.0
    """Multiply rewards from the reward model by this before use."""
    score_clip: float | None = None
    """Clip scaled rewards to [-score_clip, score_clip] (None: no clipping)."""
    sort_by_length: bool = True
    """Group responses of similar length into mini-batches (less padding, faster); the mini-batch order is
    still shuffled."""


@dataclass
class Rollout:
    """One PPO step's experience; tensors are [B, P] (query) or [B, T] (response)."""

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    scores: Tensor  # [B]
    logprobs: Tensor
    values: Tensor
    ref_logprobs: Tensor
    groups: list[Tensor]  # mini-batch row indices of the first epoch (the rollout forward used the same)
    responses: list[str] = field(default_factory=list)  # decoded response texts
    raw_scores: Tensor | None = None  # [B] the reward's scores before scaling/clipping


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
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        generation = GenerationSettings(**generation) if isinstance(generation, dict) else generation
        ppo = PPOSettings(**ppo) if isinstance(ppo, dict) else ppo
        generation.max_new_tokens = tuple(generation.max_new_tokens)
        validate_settings(
            ppo=ppo, generation=generation, ppo_steps=ppo_steps, learning_rate=learning_rate,
            rollout_batch_size=rollout_batch_size, mini_batch_size=mini_batch_size,
            max_consecutive_skips=max_consecutive_skips,
        )
        # Plain dicts keep checkpoints loadable with torch.load(weights_only=True), which resuming uses.
        self.save_hyperparameters(ignore=["reward", "lora", "generation", "ppo"])
        self.hparams.update(lora=asdict(lora), generation=asdict(generation), ppo=asdict(ppo))
        self.automatic_optimization = False
        # Checkpoints hold only the trainable weights; the frozen base comes back from model_name.
        self.strict_loading = False
        self.policy = Policy(
            model_name, lora=lora, init_adapter=init_adapter, reference_model=reference_model,
            value_head_dropout=value_head_dropout, dtype=dtype,
        )
        # The module sets eval/train mode itself around each pass (dropout is off unless train_dropout);
        # train() here only keeps Lightning from warning about modules left in eval mode by from_pretrained.
        self.policy.train()
        self.reward = reward
        # Load and validate the reward now (unknown label, missing model), before a run directory is written.
        self.reward.setup()
        self.ppo = ppo
        self.generation = generation
        self.kl_ctl = make_kl_controller(ppo)
        self.ppo_step = 0
        self.consecutive_skips = 0
        self.skipped_updates = 0
        self.skipped_steps = 0
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
        if self.hparams.fast_rollout and self._weights_sharded():
            raise ValueError(
                "model.fast_rollout=true samples outside the strategy's wrapped forward, which sharded weights "
                "(FSDP, DeepSpeed ZeRO-3) do not allow; set model.fast_rollout=false"
            )
        self.reward.to(self.device)
        counts = self.policy.parameter_counts()
        rank_zero_info(
            "Policy {}: trainable model parameters: {:,}\n all model parameters: {:,}\n percentage of trainable "
            "model parameters: {:.2f}%\n with value head: trainable {:,} / all {:,} ({:.2f}%)".format(
                self.hparams.model_name, counts["trainable model parameters"], counts["all model parameters"],
                counts["percentage of trainable model parameters"], counts["trainable parameters with value head"],
                counts["all parameters with value head"], counts["percentage with value head"],
            )
        )
        if self.logger is not None:
            self.logger.log_hyperparams({f"params/{k}": v for k, v in counts.items()})

    def on_train_start(self) -> None:
        if self.trainer.world_size > 1:
            # seed_everything gives every process the same seed, and a resumed run restores rank zero's RNG
            # state on all of them: processes would sample their responses with the same random numbers (on
            # the tiny model, 82% of the tokens of two ranks' responses were equal). Derive a distinct,
            # reproducible stream per process (after any checkpoint restore, hence here).
            torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + self.trainer.global_rank)
        if self.hparams.ppo_steps is not None and self.ppo_step >= self.hparams.ppo_steps:
            rank_zero_info(f"Resumed at PPO step {self.ppo_step} of model.ppo_steps={self.hparams.ppo_steps}: "
                           "nothing to do")
            self.trainer.should_stop = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.hparams.ppo_steps is not None and self.ppo_step >= self.hparams.ppo_steps:
            # already done (e.g. resumed after the last step): skip the rest of the epoch, and start no other
            # (with max_epochs=-1 the trainer would otherwise start empty epochs forever)
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # 1) rollout: generate, score, and the log-probs/values PPO needs (no grad, no dropout)
        rollout = self._rollout(batch)
        if rollout is None:
            return  # skipped as unsafe (counted and logged)

        # 2) advantages: KL-shaped per-token rewards, GAE, whitening over the global batch
        with self._timed("time/ppo/advantages"):
            if self.ppo.kl_estimator == "full":
                rewards, non_score, kl = self._full_kl_rewards(rollout)
            else:
                rewards, non_score, kl = ppo_math.compute_rewards(
                    rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask,
                    self.kl_ctl.value, self.ppo.kl_estimator,
                )
            raw_advantages, returns = ppo_math.compute_gae(
                rewards, rollout.values, rollout.response_mask, self.ppo.gamma, self.ppo.lam
            )
            advantages = raw_advantages
            if self.ppo.whiten_advantages:
                advantages = ppo_math.masked_whiten(raw_advantages, rollout.response_mask, reduce_fn=self._all_reduce_sum)

        # 3) update: epochs x mini-batches of clipped policy + value loss
        with self._timed("time/ppo/update"):
            update_stats = self._ppo_update(rollout, advantages, returns)

        # 4) KL controller, fed the global mean KL per response (every rank gets the same beta)
        kl_per_sample = kl.sum(1)  # [B]
        mean_kl, _, n_samples = self._global_mean_std(kl_per_sample)
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(float(mean_kl), int(n_samples))

        self.ppo_step += 1
        stats = self._step_stats(rollout, kl_per_sample, non_score, returns, raw_advantages, advantages)
        stats.update(update_stats)
        stats["objective/kl_coef"] = torch.tensor(kl_coef_used)
        self._finish_step(batch, rollout, stats)

    def _rollout(self, batch: dict[str, Any]) -> Rollout | None:
        """Responses, scores, old log-probs/values and reference log-probs; None when the step is skipped."""
        query_ids, query_mask = self.policy.fit_prompts(
            batch["input_ids"], batch["attention_mask"], self.generation.max_new_tokens[1]
        )
        limits = self._response_length_limits(len(query_ids))
        sampled = None
        with self._timed("time/ppo/generate"):
            if self.hparams.fast_rollout:
                sampled = self.policy.sample(query_ids, query_mask, self.generation, limits)
                response_ids, response_mask = sampled.response_ids, sampled.response_mask
            else:
                response_ids, response_mask = self.policy.generate(
                    query_ids, query_mask, self.generation, max_new_tokens=limits, synced_gpus=self._synced_gpus()
                )
        responses = self.policy.decode(response_ids, response_mask)
        with self._timed("time/ppo/reward"):
            raw_scores, reward_error = self._score(batch["query"], responses, batch.get("reference"))
        if self._any_rank(reward_error is not None):
            return self._skip_step(f"the reward returned non-finite scores ({reward_error or 'on another process'})")
        scores = self._shape_scores(raw_scores.to(self.device))
        with self._timed("time/ppo/forward"):
            rollout = self._rollout_forward(query_ids, query_mask, response_ids, response_mask, scores, sampled)
        rollout.responses, rollout.raw_scores = responses, raw_scores
        finite = all(torch.isfinite(t).all() for t in (rollout.logprobs, rollout.values, rollout.ref_logprobs))
        if self._any_rank(not finite):
            return self._skip_step("the model produced non-finite log-probabilities or values in the rollout")
        return rollout

    def _finish_step(self, batch: dict[str, Any], rollout: Rollout, stats: dict[str, Tensor]) -> None:
        """Log the step's statistics and samples; stop after the last PPO step."""
        stats["ppo/skipped_steps_total"] = torch.tensor(float(self.skipped_steps))
        stats["ppo/skipped_updates_total"] = torch.tensor(float(self.skipped_updates))
        stats.update({k: torch.tensor(v) for k, v in self.timings.items()})
        self._log_stats(stats)
        every = self.hparams.log_samples_every
        if every and (self.ppo_step % every == 0 or self.ppo_step == 1):
            self._log_samples(batch, rollout.responses, rollout.raw_scores)
        if self.hparams.ppo_steps is not None and self.ppo_step >= self.hparams.ppo_steps:
            self.trainer.should_stop = True

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, "test")

    def on_fit_end(self) -> None:
        if not self.hparams.export_adapter:
            return
        # log_dir broadcasts from rank zero, and gathering sharded weights is a collective: every rank takes part
        target = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter"
        with self._full_weights() as state_dict:
            if self.trainer.is_global_zero:
                export_atomically(self.policy, target, state_dict)
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
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_rng_state()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_rlhf")
        if state is None:
            raise ValueError("This checkpoint was not written by lit_rlhf's PPOModule (no 'lit_rlhf' state)")
        self.ppo_step = int(state["ppo_step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.length_generator.set_state(state["length_generator"])
        self.skipped_steps, self.skipped_updates, self.consecutive_skips = state.get("skipped", [0, 0, 0])
        rng = state.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            _set_numpy_rng_state(rng["numpy"])

    # ------------------------------------------------------------------ guards

    def _score(self, prompts: list[str], responses: list[str], references: list[str] | None) -> tuple[Tensor | None, str | None]:
        """Scores from the reward, or the reason they are unusable (non-finite). Wrong shapes still raise."""
        try:
            return self.reward(prompts, responses, references=references), None
        except NonFiniteRewardError as err:
            return None, str(err)

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any process: skip decisions must agree, or DDP's all-reduce would hang."""
        return bool(self._all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def _skip_update(self, reason: str) -> None:
        self.skipped_updates += 1
        self._count_skip(reason)
        return None

    def _skip_step(self, reason: str) -> None:
        """Skip a whole PPO step (its prompts are consumed, so the data position stays that of a normal run)."""
        self.skipped_steps += 1
        self.ppo_step += 1
        self._count_skip(reason)
        self._log_stats({"ppo/skipped_steps_total": torch.tensor(float(self.skipped_steps))})
        if self.hparams.ppo_steps is not None and self.ppo_step >= self.hparams.ppo_steps:
            self.trainer.should_stop = True

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

    # ------------------------------------------------------------------ rollout helpers

    def _shape_scores(self, scores: Tensor) -> Tensor:
        scores = scores.float() * self.ppo.score_scale
        if self.ppo.score_clip is not None:
            scores = scores.clamp(-self.ppo.score_clip, self.ppo.score_clip)
        return scores

    def _minibatch_groups(self, response_mask: Tensor, shuffle_rows: bool) -> list[Tensor]:
        """Row indices of each mini-batch: by response length (less padding) or a random permutation."""
        batch = response_mask.shape[0]
        if self.ppo.sort_by_length and not shuffle_rows:
            order = torch.argsort(response_mask.sum(1), stable=True).cpu()
        else:
            order = torch.randperm(batch)
        groups = list(order.split(self.hparams.mini_batch_size))
        return [groups[i] for i in torch.randperm(len(groups)).tolist()]

    @torch.no_grad()
    def _rollout_forward(
        self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor, scores: Tensor,
        sampled: SampledRollout | None = None,
    ) -> Rollout:
        """Old log-probs, values and reference log-probs, computed per mini-batch with the same grouping and
        padding as the first update epoch, so the first mini-batch's ratio is exactly 1. With ``sampled``
        (fast_rollout), the old log-probs and values come from sampling and only the reference is scored."""
        groups = self._minibatch_groups(response_mask, shuffle_rows=False)
        shape = response_ids.shape
        if sampled is not None:
            logprobs, values = sampled.logprobs.to(self.device), sampled.values.to(self.device)
        else:
            logprobs = torch.zeros(shape, device=self.device)
            values = torch.zeros(shape, device=self.device)
        ref_logprobs = torch.zeros(shape, device=self.device)
        with self._eval_mode():
            for idx in groups:
                q, qm, r, rm = self._slice(query_ids, query_mask, response_ids, response_mask, idx)
                t = r.shape[1]
                if sampled is None:
                    out = self.policy(q, qm, r, rm)
                    logprobs[idx, :t] = out.logprobs * rm
                    values[idx, :t] = out.values * rm
                ref_logprobs[idx, :t] = self.policy.reference_forward(q, qm, r, rm).logprobs * rm
        return Rollout(query_ids, query_mask, response_ids, response_mask, scores, logprobs, values, ref_logprobs, groups)

    @torch.no_grad()
    def _full_kl_rewards(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token rewards with the exact KL over the vocabulary (needs full distributions: one more pass)."""
        kl = torch.zeros_like(rollout.logprobs)
        with self._eval_mode():
            for idx in rollout.groups:
                q, qm, r, rm = self._slice(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask, idx)
                cur = torch.log_softmax(self.policy(q, qm, r, rm, with_values=False, return_logits=True).logits.float(), -1)
                ref = torch.log_softmax(self.policy.reference_forward(q, qm, r, rm, return_logits=True).logits.float(), -1)
                kl[idx, : r.shape[1]] = ppo_math.kl_penalty(None, None, "full", cur, ref) * rm
        zeros = torch.zeros_like(rollout.logprobs)
        # compute_rewards with the "kl" estimator on (kl, 0) reproduces the exact per-token KL as the penalty
        return ppo_math.compute_rewards(rollout.scores, kl, zeros, rollout.response_mask, self.kl_ctl.value, "kl")

    def _slice(self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor, idx: Tensor):
        idx = idx.to(query_ids.device)
        return trim_batch(
            query_ids[idx], query_mask[idx], response_ids[idx], response_mask[idx],
            left_padded_query=not self.policy.is_seq2seq,
        )

    # ------------------------------------------------------------------ update

    def _ppo_update(self, rollout: Rollout, advantages: Tensor, returns: Tensor) -> dict[str, Tensor]:
        opt = self.optimizers()
        totals: dict[str, list[Tensor]] = {}
        skipped = 0
        for epoch in range(self.ppo.ppo_epochs):
            groups = rollout.groups if epoch == 0 else self._minibatch_groups(rollout.response_mask, shuffle_rows=True)
            for idx in groups:
                stats = self._minibatch_step(opt, rollout, advantages, returns, idx)
                if stats is None:
                    skipped += 1
                    continue
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v)
        out = {k: torch.stack(v).mean() for k, v in totals.items()}
        if out and self.trainer.world_size > 1:
            # the update's diagnostics are per process: log their mean over processes (the maximum for ratio_max)
            names = sorted(out)
            stacked = torch.stack([out[k].float() for k in names])
            means = self._all_reduce_sum(stacked) / self.trainer.world_size
            out = dict(zip(names, means.unbind()))
            local_max = torch.stack(totals["ppo/policy/ratio_max"]).max()
            out["ppo/policy/ratio_max"] = self.trainer.strategy.reduce(local_max.clone(), reduce_op="max")
        out["ppo/skipped_minibatches"] = torch.tensor(float(skipped))
        return out

    def _minibatch_step(
        self, opt, rollout: Rollout, advantages: Tensor, returns: Tensor, idx: Tensor
    ) -> dict[str, Tensor] | None:
        """One clipped PPO gradient step on the rows ``idx``; None if it was skipped as unsafe."""
        q, qm, r, rm = self._slice(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask, idx)
        t = r.shape[1]
        idx = idx.to(self.device)
        old_logprobs, old_values = rollout.logprobs[idx, :t], rollout.values[idx, :t]
        adv, ret = advantages[idx, :t], returns[idx, :t]
        with self._eval_mode(enabled=not self.hparams.train_dropout):
            out = self.policy(q, qm, r, rm, return_logits=True)
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
        # gradients are already all-reduced here under DDP, so every rank sees the same norm; under FSDP each
        # rank holds a shard (so the decision is still agreed), and DeepSpeed keeps them in its own buffers
        # (p.grad is None: nothing to check here)
        grads = [p.grad.detach().float().norm() for p in self.policy.trainable_parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros((), device=self.device)
        if self._any_rank(not bool(torch.isfinite(grad_norm))):
            opt.zero_grad()
            return self._skip_update("the gradient was not finite")
        if self.ppo.max_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad()
        self.consecutive_skips = 0
        with torch.no_grad():
            entropy = ppo_math.masked_mean(ppo_math.entropy_from_logits(out.logits), rm)
            vpred = ppo_math.masked_mean(out.values, rm)
            val_error = ppo_math.masked_mean((out.values - ret).square(), rm)
        return {
            "ppo/loss/policy": pg_loss.detach(),
            "ppo/loss/value": vf_loss.detach(),
            "ppo/loss/total": loss.detach(),
            "ppo/grad_norm": grad_norm,
            "ppo/policy/entropy": entropy,
            "ppo/val/vpred": vpred,
            "ppo/val/error": val_error,
            **{f"ppo/{k}": v for k, v in diag.items()},
        }

    # ------------------------------------------------------------------ several processes

    def _response_length_limits(self, batch_size: int) -> Tensor:
        """Each sample's maximum number of new tokens [B]. Every process draws the limits of the whole global
        batch (world_size x B) from the same generator and keeps its own slice: processes get different limits,
        the generators stay in step (so rank zero's checkpoint resumes every rank), and a single process
        draws exactly what ``Policy.generate`` would."""
        low, high = self.generation.max_new_tokens
        world, rank = self.trainer.world_size, self.trainer.global_rank
        limits = torch.randint(low, high, (world * batch_size,), generator=self.length_generator)  # [W * B]
        return limits[rank * batch_size : (rank + 1) * batch_size]

    def _weights_sharded(self) -> bool:
        """True under a multi-process strategy that shards the weights (FSDP, DeepSpeed ZeRO-3)."""
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return False
        return isinstance(trainer.strategy, FSDPStrategy) or bool(getattr(trainer.strategy, "zero_stage_3", False))

    def _synced_gpus(self) -> bool | None:
        """``generate``'s synced_gpus: with sharded weights every forward pass is a collective, so each process
        keeps decoding until all are done; otherwise None (transformers decides, as in a single process)."""
        return True if self._weights_sharded() else None

    @contextmanager
    def _full_weights(self) -> Iterator[dict[str, Tensor] | None]:
        """The policy's complete weights for export. A collective under FSDP and DeepSpeed ZeRO-3 (every rank
        must enter). Yields the policy's full state dict (FSDP: on rank zero; empty elsewhere), or None when
        the policy's own parameters are complete (one process, DDP, ZeRO-1/2, ZeRO-3 inside the gather)."""
        strategy = self.trainer.strategy
        if not self._weights_sharded():
            yield None
        elif getattr(strategy, "zero_stage_3", False):
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.policy.trainable_parameters(), modifier_rank=None):
                yield None
        else:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
            with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
                state = strategy.model.state_dict()  # keys as the LightningModule's: "policy.model...."
            yield {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}

    # ------------------------------------------------------------------ statistics and logging

    def _all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.trainer is None or self.trainer.world_size <= 1:
            return t
        # the strategy reduces in place: give it a copy
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum")

    def _global_mean_std(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, std and count of per-sample values over all processes. x: [B]."""
        mean, var, n = ppo_math.masked_moments(x[None].float(), torch.ones_like(x[None], dtype=torch.float32), self._all_reduce_sum)
        return mean, var.sqrt(), n

    @torch.no_grad()
    def _step_stats(self, rollout: Rollout, kl_per_sample: Tensor, non_score: Tensor,
                    returns: Tensor, raw_advantages: Tensor, advantages: Tensor) -> dict[str, Tensor]:
        mask = rollout.response_mask
        reward_mean, reward_std, _ = self._global_mean_std(rollout.raw_scores.float().to(self.device))
        kl_mean, _, _ = self._global_mean_std(kl_per_sample)
        entropy_mean, _, _ = self._global_mean_std(-(rollout.logprobs * mask).sum(1))
        length_mean, _, _ = self._global_mean_std(mask.sum(1).float())
        non_score_mean, _, _ = self._global_mean_std(non_score.sum(1))
        returns_mean, returns_var, _ = ppo_math.masked_moments(returns, mask)
        values_var = ppo_math.masked_var(rollout.values, mask)
        residual_var = ppo_math.masked_var(returns - rollout.values, mask)
        return {
            "env/reward_mean": reward_mean,
            "env/reward_std": reward_std,
            "objective/kl": kl_mean,
            "objective/entropy": entropy_mean,
            "ppo/mean_non_score_reward": non_score_mean,
            "ppo/mean_scores": reward_mean,
            "ppo/returns/mean": returns_mean,
            "ppo/returns/var": returns_var,
            "ppo/val/mean": ppo_math.masked_mean(rollout.values, mask),
            "ppo/val/var": values_var,
            "ppo/val/var_explained": 1.0 - residual_var / returns_var.clamp(min=1e-8),
            "ppo/policy/advantages_mean": ppo_math.masked_mean(advantages, mask),
            "ppo/policy/advantages_raw_mean": ppo_math.masked_mean(raw_advantages, mask),
            "tokens/responses_len_mean": length_mean,
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

    def _log_samples(self, batch: dict[str, Any], responses: list[str], scores: Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        n = min(self.hparams.num_log_samples, len(responses))
        rows = ["| query | response | reward |", "|---|---|---|"]
        for i in range(n):
            q = batch["query"][i].replace("\n", " ").replace("|", "\\|")
            r = responses[i].replace("\n", " ").replace("|", "\\|")
            rows.append(f"| {q[-300:]} | {r} | {float(scores[i]):.4f} |")
        experiment.add_text("samples", "\n".join(rows), self.ppo_step)

    @torch.no_grad()
    def _evaluate_batch(self, batch: dict[str, Any], stage: str) -> None:
        """Reward, KL to the reference and response length of sampled responses on held-out prompts."""
        query_ids, query_mask = self.policy.fit_prompts(
            batch["input_ids"], batch["attention_mask"], self.generation.max_new_tokens[1]
        )
        response_ids, response_mask = self.policy.generate(
            query_ids, query_mask, self.generation, generator=torch.Generator().manual_seed(0),
            synced_gpus=self._synced_gpus(),
        )
        responses = self.policy.decode(response_ids, response_mask)
        scores = self.reward(batch["query"], responses, references=batch.get("reference")).float().to(self.device)
        kl = torch.zeros(len(responses), device=self.device)
        with self._eval_mode():
            for idx in torch.arange(len(responses)).split(self.hparams.mini_batch_size):
                q, qm, r, rm = self._slice(query_ids, query_mask, response_ids, response_mask, idx)
                cur = self.policy(q, qm, r, rm, with_values=False).logprobs
                ref = self.policy.reference_forward(q, qm, r, rm).logprobs
                kl[idx.to(self.device)] = ((cur - ref) * rm).sum(1)
        size = len(responses)
        self.log(f"{stage}/reward_mean", scores.mean(), sync_dist=True, batch_size=size)
        self.log(f"{stage}/kl", kl.mean(), sync_dist=True, batch_size=size)
        self.log(f"{stage}/response_length", response_mask.sum(1).float().mean(), sync_dist=True, batch_size=size)

    # ------------------------------------------------------------------ small utilities

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start

    @contextmanager
    def _eval_mode(self, enabled: bool = True) -> Iterator[None]:
        was_training = self.policy.training
        if enabled:
            self.policy.eval()
        else:
            self.policy.train()
        try:
            yield
        finally:
            self.policy.train(was_training)


def _numpy_rng_state() -> tuple:
    # as plain types and tensors, so the checkpoint still loads with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _set_numpy_rng_state(state: tuple) -> None:
    kind, keys, pos, has_gauss, cached = state
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def make_kl_controller(settings: PPOSettings) -> ppo_math.FixedKLController | ppo_math.AdaptiveKLController:
    if settings.adaptive_kl:
        return ppo_math.AdaptiveKLController(settings.init_kl_coef, settings.kl_target, settings.kl_horizon)
    return ppo_math.FixedKLController(settings.init_kl_coef)


def export_atomically(policy: Policy, target: Path, state_dict: dict[str, Tensor] | None = None) -> None:
    """Write the adapter into a temporary sibling folder, then swap it in: a crash never leaves half a folder.
    ``state_dict``: the policy's full weights where this process holds only a shard (see ``Policy.save_adapter``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=target.parent))
    try:
        if state_dict is None:
            policy.save_adapter(tmp)
        else:
            policy.save_adapter(tmp, state_dict=state_dict)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; give it the usual permissions
        if target.exists():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def validate_settings(
    ppo: PPOSettings, generation: GenerationSettings, ppo_steps: int | None, learning_rate: float,
    rollout_batch_size: int, mini_batch_size: int, max_consecutive_skips: int = 8,
) -> None:
    """Check user settings once, before anything is loaded or written; errors name the argument."""
    errors = []
    if mini_batch_size <= 0 or rollout_batch_size <= 0:
        errors.append(f"model.mini_batch_size ({mini_batch_size}) and data.batch_size ({rollout_batch_size}) must be > 0")
    elif rollout_batch_size % mini_batch_size:
        errors.append(
            f"model.mini_batch_size={mini_batch_size} must divide the rollout batch data.batch_size={rollout_batch_size}"
        )
    if ppo_steps is not None and ppo_steps <= 0:
        errors.append(f"model.ppo_steps must be > 0 (or null), got {ppo_steps}")
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        errors.append(f"model.learning_rate must be a positive number, got {learning_rate}")
    if ppo.ppo_epochs <= 0:
        errors.append(f"model.ppo.ppo_epochs must be > 0, got {ppo.ppo_epochs}")
    if ppo.kl_estimator not in ppo_math.KL_ESTIMATORS:
        errors.append(f"model.ppo.kl_estimator must be one of {ppo_math.KL_ESTIMATORS}, got {ppo.kl_estimator!r}")
    if not (0.0 <= ppo.gamma <= 1.0) or not (0.0 <= ppo.lam <= 1.0):
        errors.append(f"model.ppo.gamma and model.ppo.lam must lie in [0, 1], got {ppo.gamma}, {ppo.lam}")
    if ppo.cliprange <= 0 or ppo.cliprange_value <= 0:
        errors.append("model.ppo.cliprange and model.ppo.cliprange_value must be > 0")
    if ppo.adaptive_kl and (ppo.kl_target <= 0 or ppo.kl_horizon <= 0):
        errors.append("model.ppo.kl_target and model.ppo.kl_horizon must be > 0 with adaptive_kl")
    low, high = generation.max_new_tokens
    if not (0 < low < high):
        errors.append(
            f"model.generation.max_new_tokens must be [low, high) with 0 < low < high, got {list(generation.max_new_tokens)}"
        )
    if max_consecutive_skips < 1:
        errors.append(f"model.max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
    if generation.min_new_tokens < 0:
        errors.append(f"model.generation.min_new_tokens must be >= 0, got {generation.min_new_tokens}")
    if errors:
        raise ValueError("Invalid settings:\n  - " + "\n  - ".join(errors))

