"""PPOModule's update (``PPOUpdate``): ``ppo_epochs`` x mini-batches of clipped PPO gradient steps, each
``model.micro_batch_size`` rows per forward/backward, with the skip decisions every process takes together, and
the step's statistics over the global batch and their logging."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_rlhf import objectives
from lit_rlhf.rollout import Rollout
from lit_rlhf.runtime import distributed as dist


class PPOUpdate:
    """PPOModule's update, statistics and the reductions over processes they use. The host is the
    ``PPOModule``: it has ``policy``, ``reward``, ``ppo``, ``generation``, ``kl_ctl``, ``skips`` and ``ppo_step``."""

    def _reduce(self, t: Tensor) -> Tensor:
        return dist.all_reduce_sum(self._trainer, t)

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any process: skip decisions must agree, or DDP's all-reduce would hang."""
        return dist.any_rank(self._trainer, flag, self.device)

    def _skip_update(self, reason: str, opt: Any) -> None:
        opt.zero_grad()
        self.skips.skip_update(self.ppo_step, reason)

    def _minibatch_groups(self, response_mask: Tensor, by_length: bool) -> list[Tensor]:
        return objectives.minibatch_groups(response_mask.sum(1).cpu(), self.hparams.mini_batch_size, by_length)

    def _micro_batches(self, idx: Tensor) -> tuple[Tensor, ...]:
        """The rows of each forward pass over the mini-batch ``idx``: ``model.micro_batch_size`` at a time (all
        at once without it), in the rollout's scoring pass and in the update alike."""
        return idx.split(self.hparams.micro_batch_size or len(idx))

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
        if self._nothing_to_learn(rollout, idx):  # every row left out (model.ppo.drop_zero_std_groups, overlong=mask)
            opt.zero_grad()  # no step: AdamW's momentum and weight decay would still move the weights
            return stats
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

    def _nothing_to_learn(self, rollout: Rollout, idx: Tensor) -> bool:
        """True where the policy loss leaves out every row of the mini-batch ``idx`` on every process and no value
        loss remains: its optimizer step would only apply momentum and weight decay (one decision for every process)."""
        if rollout.loss_rows is None or self.policy.has_value_head:
            return False
        return not self._any_rank(bool(rollout.loss_rows[idx.to(rollout.loss_rows.device)].any()))

    @torch.no_grad()
    def _entropy_after_update(self, rollout: Rollout) -> dict[str, Tensor]:
        """``ppo/policy/entropy_after``: the policy's mean token entropy over the rollout's response tokens (every
        process's), after the step's optimizer steps, in the rollout's micro-batches (model.ppo.entropy_after_update:
        one forward without gradients and without dropout)."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for micro in (micro for group in rollout.groups for micro in self._micro_batches(group)):
            rows, idx = self.policy.rows(rollout.rows, micro)
            with self.policy.mode(dropout=False):
                entropy = self.policy(*rows.tensors(), with_values=False, with_entropy=True).entropy
            mask = rollout.loss_mask[idx, :entropy.shape[1]].to(entropy.dtype)
            sums += torch.stack([(entropy * mask).sum(), mask.sum()]).double()
        total, count = self._reduce(sums).unbind()
        return {"ppo/policy/entropy_after": (total / count.clamp(min=1.0)).float()}

    def _accumulate_gradients(
        self, rollout: Rollout, advantages: Tensor, returns: Tensor, idx: Tensor
    ) -> tuple[bool, dict[str, Tensor]]:
        """Forward and backward of the mini-batch ``idx``, ``model.micro_batch_size`` rows at a time. Every
        micro-batch's loss divides by the whole mini-batch's denominators (global over processes), so the
        accumulated gradient is the gradient of the mini-batch's loss. Returns whether every micro-batch's loss
        was finite, and the mini-batch's statistics (``ppo/...``)."""
        p, critic = self.ppo, self.policy.has_value_head
        device, keep = rollout.rows.response_mask.device, rollout.loss_rows  # keep: the rows the policy loss is over
        counts = objectives.loss_counts(rollout.loss_mask[idx.to(device)], p.loss_aggregation, critic,
                                        None if keep is None else keep[idx.to(device)])
        parts, finite = [], True
        micro_batches = self._micro_batches(idx)
        for i, micro in enumerate(micro_batches):
            out, rows, micro = self.policy.forward_rows(rollout.rows, micro, dropout=self.hparams.train_dropout,
                                                        with_values=critic, with_entropy=True,
                                                        entropy_grad=p.entropy_coef != 0.0)
            t, rm = rows.response_ids.shape[1], rows.response_mask
            if rollout.action_mask is not None:  # model.environment: only the model's own tokens are trained
                rm = rollout.action_mask[micro, :t]
            if rollout.old_from_update:  # on-policy: what the scoring pass would have given (ratio exactly 1)
                rollout.logprobs[micro, :t] = out.logprobs.detach() * rm
            with_ref = p.kl_in_loss and rollout.ref_logprobs is not None
            old_logprobs, ref = rollout.logprobs[micro, :t], rollout.ref_logprobs[micro, :t] if with_ref else None
            loss, stats = objectives.ppo_objective(
                out.logprobs, old_logprobs, out.values, rollout.values[micro, :t], advantages[micro, :t],
                returns[micro, :t], rm, p.cliprange, p.cliprange_value, p.vf_coef, p.loss_aggregation,
                self.generation.max_new_tokens[1] - 1, ref, self.kl_ctl.value if p.kl_in_loss else 0.0,
                reduce_fn=self._reduce, counts=counts,  # the mini-batch's global denominators
                variant=p.policy_variant(), entropy=out.entropy, loss_rows=None if keep is None else keep[micro])
            stats["policy/entropy"] = objectives.masked_mean(out.entropy.detach(), rm)
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
                                            raw_advantages, advantages, rollout.loss_mask, parts, self._reduce)
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
