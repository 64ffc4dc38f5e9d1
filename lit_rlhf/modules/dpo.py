"""Direct preference optimization (DPO) of a seq2seq or decoder-only model on (prompt, chosen, rejected) pairs.

Legend: ``B`` pairs in a batch, ``P`` prompt tokens, ``T`` response tokens.

The losses are pure functions of per-row sequence log-probabilities (torch only, no loops over rows):

* ``sigmoid``: DPO, Rafailov et al. 2023 (arXiv:2305.18290, eq. 7), with the conservative label smoothing
  of cDPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf, eq. 3);
* ``ipo``: IPO, Azar et al. 2023 (arXiv:2310.12036, eq. 17).

``DPOModule`` trains a LoRA adapter of a ``lit_rlhf.models.policy.Policy`` (no value head) on batches of the preference
contract (``prompt_input_ids``/``prompt_attention_mask`` [B, P], ``chosen_ids``/``chosen_mask`` [B, Tc],
``rejected_ids``/``rejected_mask`` [B, Tr]) and scores every response through the Policy's one scoring path:
``Policy.forward_rows`` for the trained pass, ``Policy.score`` (adapter disabled, or ``reference_model``) for the
reference. At the end of fit the adapter is exported to ``<log_dir>/adapter``, which PPO's ``model.init_adapter``
and plain peft load.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_rlhf.models import Policy, ResponseBatch
from lit_rlhf.modules.base import BuildsPolicy, policy_errors
from lit_rlhf.objectives import DPOLossType, check_margin, dpo_loss, preference_metrics, sequence_logps
from lit_rlhf.runtime import NumThreads, num_threads_errors
from lit_rlhf.settings import LoraSettings, WeightDtype, check, lora_settings

LogpReduction = Literal["auto", "sum", "mean"]
PAIR_KEYS = ("prompt_input_ids", "prompt_attention_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


def paired_responses(batch: dict[str, Any], pad_token_id: int) -> ResponseBatch:
    """One ResponseBatch of 2B rows from a preference batch: rows [0, B) are (prompt, chosen), rows [B, 2B)
    (prompt, rejected), the responses right-padded to the longer of the two (mask 0 there), so that one
    forward pass scores both."""
    missing = [key for key in PAIR_KEYS if key not in batch]
    if missing:
        raise ValueError(f"The batch has no preference pairs ({', '.join(missing)} missing): DPO trains on a "
                         "preference data module's batches (data.class_path)")
    chosen, rejected = batch["chosen_ids"], batch["rejected_ids"]
    t = max(chosen.shape[1], rejected.shape[1])

    def right_pad(x: Tensor, value: int) -> Tensor:  # [B, t'] -> [B, t]
        return F.pad(x, (0, t - x.shape[1]), value=value)

    return ResponseBatch(
        query_ids=batch["prompt_input_ids"].repeat(2, 1),
        query_mask=batch["prompt_attention_mask"].repeat(2, 1),
        response_ids=torch.cat([right_pad(chosen, pad_token_id), right_pad(rejected, pad_token_id)]),
        response_mask=torch.cat([right_pad(batch["chosen_mask"], 0), right_pad(batch["rejected_mask"], 0)]),
    )


# ---------------------------------------------------------------------------------------------- the module

class DPOModule(BuildsPolicy):
    """DPO or IPO training of a LoRA adapter on preference pairs, for seq2seq and decoder-only models.

    Batches follow the preference contract (see the module docstring). Training and validation log, under
    ``train/`` and ``val/``, TRL's DPOTrainer metrics: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.

    Args:
        model_name: hub name, local folder or embedded model (``embedded:tiny-t5``, ``embedded:tiny-gpt2``).
        lora: the LoRA adapter's shape.
        init_adapter: start from this peft adapter (merged in) or whole ``save_pretrained`` model folder, e.g.
            an SFT result; it is then also the reference.
        reference_model: a separate frozen reference model; None: the policy with its adapter disabled.
        dtype: dtype of the frozen base weights (the adapter stays float32); auto: bfloat16 on a CUDA device
            with bfloat16, float32 otherwise.
        beta: DPO's inverse temperature (the KL weight), or IPO's tau.
        loss_type: ``sigmoid`` (DPO, with ``label_smoothing``: cDPO) or ``ipo``.
        label_smoothing: cDPO's probability that a pair's preference label is flipped, in [0, 0.5); sigmoid only.
        logp_reduction: a response's log-probability: ``sum`` of its tokens' log-probs (DPO's definition),
            ``mean`` over its tokens, or ``auto``: sum for sigmoid, mean for ipo (as TRL's DPOTrainer).
        learning_rate: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        export_dir: where the adapter goes at the end of fit; None: ``<log_dir>/adapter``.
        num_threads: torch's intra-op CPU threads; auto: 1 for a small model, else torch's default.
        gradient_checkpointing: recompute each block's activations in the backward pass instead of keeping them.
        attn_implementation: the attention kernel ``from_pretrained`` builds; null: transformers' own choice.
    """

    policy: Policy  # built in configure_model
    export_note = "DPO adapter exported to {target} (give it to PPO as --model.init_adapter {target})"

    def __init__(
        self,
        model_name: str = "embedded:tiny-t5",
        lora: LoraSettings | None = None,
        init_adapter: str | None = None,
        reference_model: str | None = None,
        dtype: WeightDtype = "auto",
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        logp_reduction: LogpReduction = "auto",
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        export_dir: str | None = None,
        num_threads: NumThreads = "auto",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        lora = lora_settings(lora)  # also a plain dict (a checkpoint's hyperparameters, a Python caller)
        check(dpo_settings_errors(beta, loss_type, label_smoothing, logp_reduction, learning_rate, weight_decay)
              + num_threads_errors(num_threads) + policy_errors(dtype, lora, model_name=model_name,
                                                                init_adapter=init_adapter,
                                                                reference_model=reference_model))
        self.save_settings(lora=lora)
        self.policy_kwargs = dict(
            model_name=model_name, lora=lora, init_adapter=init_adapter, reference_model=reference_model,
            value_head=False, finetune="lora", gradient_checkpointing=gradient_checkpointing,
            attn_implementation=attn_implementation,
        )

    # ------------------------------------------------------------------ building the policy

    def setup(self, stage: str) -> None:
        # before the model loads: a margin column the loss cannot use is refused now, not at the first batch
        columns = getattr(getattr(self._trainer, "datamodule", None), "columns", None)
        check_margin(self.hparams.loss_type, getattr(columns, "margin", None) is not None)
        super().setup(stage)

    # ------------------------------------------------------------------ the loss

    def average_logps(self) -> bool:
        """Whether a response's log-probability is its tokens' mean (``logp_reduction``), else their sum."""
        reduction = self.hparams.logp_reduction
        return reduction == "mean" or (reduction == "auto" and self.hparams.loss_type == "ipo")

    def pair_logps(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Log-probabilities of the chosen and rejected responses under the policy (with gradients) and the
        reference (none): (policy_chosen, policy_rejected, ref_chosen, ref_rejected), [B] each."""
        pairs = paired_responses(batch, self.policy.pad_token_id)
        rows = torch.arange(len(pairs.query_ids))
        # one pass over chosen and rejected together; dropout off, as the reference pass (TRL's default)
        out, trimmed, _ = self.policy.forward_rows(pairs, rows, dropout=False, with_values=False)
        policy_logps = sequence_logps(out.logprobs, trimmed.response_mask, self.average_logps())
        ref = self.policy.score(pairs, [rows], policy=False, values=False, reference=True).ref_logprobs
        ref_logps = sequence_logps(ref, pairs.response_mask, self.average_logps())
        b = len(batch["chosen_ids"])
        return policy_logps[:b], policy_logps[b:], ref_logps[:b], ref_logps[b:]

    def dpo_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The batch's mean loss (``loss``, with gradients) and TRL's metrics (``preference_metrics``)."""
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = self.pair_logps(batch)
        hp = self.hparams
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, hp.beta, hp.loss_type, hp.label_smoothing,
            batch.get("margin"))
        metrics = preference_metrics(loss, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        return {**metrics, "loss": loss.mean()}

    def _log_metrics(self, metrics: dict[str, Tensor], stage: str, batch_size: int) -> None:
        self.log_dict({f"{stage}/{k}": v.detach() for k, v in metrics.items()}, batch_size=batch_size,
                      sync_dist=True, prog_bar=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        metrics = self.dpo_step(batch)
        self._log_metrics(metrics, "train", len(batch["chosen_ids"]))
        return metrics["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_metrics(self.dpo_step(batch), "val", len(batch["chosen_ids"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.policy.trainable_parameters(), lr=self.hparams.learning_rate,
                                 weight_decay=self.hparams.weight_decay)


def dpo_settings_errors(
    beta: float, loss_type: str, label_smoothing: float, logp_reduction: str, learning_rate: float,
    weight_decay: float,
) -> list[str]:
    """DPOModule's settings checked before anything is loaded; each error names the flag."""
    errors = []
    if not (beta > 0 and math.isfinite(beta)):
        errors.append(f"model.beta must be > 0, got {beta}")
    if loss_type not in ("sigmoid", "ipo"):
        errors.append(f"model.loss_type must be sigmoid or ipo, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        errors.append(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    elif label_smoothing > 0 and loss_type == "ipo":
        errors.append("model.label_smoothing applies to loss_type=sigmoid (cDPO) only: set it to 0 for ipo")
    if logp_reduction not in ("auto", "sum", "mean"):
        errors.append(f"model.logp_reduction must be auto, sum or mean, got {logp_reduction!r}")
    if not learning_rate > 0:
        errors.append(f"model.learning_rate must be > 0, got {learning_rate}")
    if weight_decay < 0:
        errors.append(f"model.weight_decay must be >= 0, got {weight_decay}")
    return errors
