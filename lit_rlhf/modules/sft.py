"""Supervised fine-tuning (SFT): teach a model to write the reference summary of a prompt, before PPO.

Teacher forcing on (prompt, reference summary) pairs from ``DialogSumDataModule(with_labels=True)``. The
loss is the mean negative log-likelihood of the summary tokens, computed by the same ``Policy.forward`` that
scores PPO responses, so the seq2seq/causal difference stays in ``lit_rlhf.models.policy``: for a decoder-only model
only the summary tokens (the "response") are scored, never the prompt.

Trains a LoRA adapter (``finetune="lora"``, the FLAN-T5 recipe's SFT stage) or every weight
(``finetune="full"``, e.g. a model trained from scratch). At the end of fit the result is exported atomically
to what PPO's ``model.init_adapter`` takes: a peft adapter folder or a whole ``save_pretrained`` model, each
with the tokenizer.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics.text.rouge import ROUGEScore
from transformers.optimization import Adafactor

from lit_rlhf import objectives
from lit_rlhf import rollout as ro
from lit_rlhf.models import Policy
from lit_rlhf.modules.base import BuildsPolicy, policy_errors
from lit_rlhf.runtime import NumThreads, num_threads_errors
from lit_rlhf.runtime import distributed as dist
from lit_rlhf.settings import GenerationSettings, LoraSettings, WeightDtype, check, lora_settings

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def lr_factor(step: int, warmup_steps: int, decay_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warmup from 0 over ``warmup_steps``, then
    constant, or a linear or cosine decay reaching ``min_ratio`` at ``decay_steps`` (and staying there)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


class SFTModule(BuildsPolicy):
    """Supervised fine-tuning of a seq2seq or decoder-only model on (prompt, reference summary) pairs.

    Batches come from ``DialogSumDataModule(with_labels=True)``: ``input_ids``/``attention_mask`` [B, P] (the
    prompt, padded as the model kind needs), ``summary_ids``/``summary_mask`` [B, S] (the reference summary
    with eos, right-padded) and ``reference`` (B strings). Validation and test log the loss and ROUGE-1/2/L
    of greedy summaries against ``reference``.

    Args:
        model_name: hub name, local folder or embedded model (``embedded:summarizer-untrained`` is the
            embedded summarizer's architecture with random weights).
        finetune: ``"lora"``: train a LoRA adapter (``lora``) on the frozen model; ``"full"``: train every weight.
        lora: the LoRA adapter's shape (with ``finetune="lora"``).
        init_adapter: start from this peft adapter (merged in) or whole ``save_pretrained`` model folder.
        init_from_scratch: random weights from ``model_name``'s config (needs ``finetune="full"``).
        dtype: dtype of the frozen base weights with ``finetune="lora"`` (the adapter stays float32); a
            full fine-tune needs float32 weights (use ``trainer.precision=bf16-mixed`` for bf16 speed). auto:
            bfloat16 for a LoRA run on a CUDA device with bfloat16, float32 otherwise; the run logs its choice.
        optimizer: ``adamw``, or ``adafactor``: transformers' Adafactor with updates relative to each weight's
            scale (``scale_parameter``), T5's own optimizer; T5 initialises its attention queries about 8x
            smaller than its other weights, and AdamW's equal-sized steps swamp them, so a T5 trained from
            scratch learns far faster with it (learning_rate 1e-2 is T5's pretraining step).
        learning_rate: the optimizer's peak learning rate.
        weight_decay: decoupled weight decay.
        warmup_steps: optimizer steps of linear warmup from 0.
        lr_schedule: after warmup: ``constant``, or ``linear``/``cosine`` decay to ``min_lr_ratio`` x peak.
        decay_steps: optimizer step at which the decay ends; None: the trainer's estimate of the run's
            total (needs ``trainer.max_steps`` or ``trainer.max_epochs``).
        min_lr_ratio: the decay's end point as a fraction of ``learning_rate``.
        max_new_tokens: longest generated summary in validation, test and predict (greedy decoding).
        no_repeat_ngram_size: greedy decoding never repeats an n-gram of this size (0: no constraint).
        export_dir: where the result goes at the end of fit; None: ``<log_dir>/adapter`` (LoRA) or
            ``<log_dir>/model`` (full).
        num_threads: torch's intra-op CPU threads; auto: 1 for a small model, else torch's default
            (``lit_rlhf.runtime.threads``); None leaves torch's setting.
        gradient_checkpointing: recompute each transformer block's activations in the backward pass instead of
            keeping them (less activation memory, about one more forward per step).
        attn_implementation: the attention kernel ``from_pretrained`` builds (sdpa, eager, flash_attention_2, ...);
            null: transformers' own choice.
    """

    policy: Policy  # built in configure_model
    export_note = "SFT result exported to {target} (give it to PPO as --model.init_adapter {target})"
    keeps_rng = True  # the model's and the adapter's dropout draw from the global RNGs

    def __init__(
        self,
        model_name: str = "embedded:tiny-t5",
        finetune: Literal["lora", "full"] = "lora",
        lora: LoraSettings | None = None,
        init_adapter: str | None = None,
        init_from_scratch: bool = False,
        dtype: WeightDtype = "auto",
        optimizer: Literal["adamw", "adafactor"] = "adamw",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "linear", "cosine"] = "constant",
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        max_new_tokens: int = 64,
        no_repeat_ngram_size: int = 0,
        export_dir: str | None = None,
        num_threads: NumThreads = "auto",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        lora = lora_settings(lora)  # also a plain dict (a checkpoint's hyperparameters, a Python caller)
        check_sft_settings(learning_rate, weight_decay, warmup_steps, lr_schedule, decay_steps, min_lr_ratio,
                           max_new_tokens, num_threads, no_repeat_ngram_size, optimizer)
        self.save_settings(lora=lora)
        # the policy is built in configure_model (where a strategy places or shards it); cheap checks now
        check(policy_errors(dtype, lora, finetune, init_from_scratch, model_name=model_name, init_adapter=init_adapter))
        self.policy_kwargs = dict(
            model_name=model_name, lora=lora, init_adapter=init_adapter, value_head=False, finetune=finetune,
            init_from_scratch=init_from_scratch, gradient_checkpointing=gradient_checkpointing,
            attn_implementation=attn_implementation,
        )
        self.rouge = ROUGEScore(rouge_keys=ROUGE_KEYS)

    # ------------------------------------------------------------------ training

    def sft_loss(self, batch: dict[str, Any], reduce_fn: objectives.ReduceFn | None = None) -> Tensor:
        """Mean negative log-likelihood of the reference summary tokens (teacher forcing). Scalar.

        ``reduce_fn`` (a sum over processes, as training passes): the mean is over every process's summary
        tokens (``objectives.aggregate``), so that DDP's averaged gradient is that of the global batch; without it,
        the mean over this process's tokens."""
        if "summary_ids" not in batch:
            raise ValueError(
                "The batch has no reference summaries ('summary_ids'): SFT needs data.with_labels=true"
            )
        out = self.policy(
            batch["input_ids"], batch["attention_mask"], batch["summary_ids"], batch["summary_mask"],
            with_values=False,
        )
        if reduce_fn is None:
            return -objectives.masked_mean(out.logprobs, batch["summary_mask"])
        return objectives.aggregate(-out.logprobs, batch["summary_mask"], "token_mean", reduce_fn=reduce_fn)

    def prompt_gap(self, batch: dict[str, Any], own_loss: Tensor | None = None) -> Tensor:
        """How much the model reads its prompt: the summary loss with each row's prompt replaced by the next
        row's (the batch rolled by one) minus the loss with its own (``own_loss``, when already computed).
        About 0 for a model that only learned the summaries' language; NaN for a batch of one row. Scalar
        (nats per summary token)."""
        if len(batch["input_ids"]) < 2:
            return torch.tensor(float("nan"))
        rolled = {**batch, "input_ids": batch["input_ids"].roll(1, 0),
                  "attention_mask": batch["attention_mask"].roll(1, 0)}
        return self.sft_loss(rolled) - (self.sft_loss(batch) if own_loss is None else own_loss)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.sft_loss(batch, reduce_fn=partial(dist.all_reduce_sum, self._trainer))
        # each process's loss is its share of the global mean (local sum x P / global count): their mean is it
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=len(batch["input_ids"]))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        parameters = self.policy.trainable_parameters()
        if hp.optimizer == "adafactor":
            # update = learning_rate x RMS(weight) x normalised gradient; the schedule below scales learning_rate
            optimizer = Adafactor(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay,
                                  scale_parameter=True, relative_step=False, warmup_init=False)
        else:
            optimizer = torch.optim.AdamW(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        decay_steps = hp.decay_steps
        if decay_steps is None and hp.lr_schedule != "constant":
            estimate = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimate):
                raise ValueError(
                    f"model.lr_schedule={hp.lr_schedule!r} needs the run's length: set model.decay_steps, "
                    "trainer.max_steps or trainer.max_epochs"
                )
            decay_steps = int(estimate)
        factor = partial(lr_factor, warmup_steps=hp.warmup_steps, decay_steps=decay_steps or 0,
                         schedule=hp.lr_schedule, min_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation

    def generate_summaries(self, batch: dict[str, Any]) -> list[str]:
        """Greedy summaries of the batch's prompts (at most ``max_new_tokens`` tokens each): B strings."""
        return [text.strip() for text in self._generate(batch).texts]

    def _generate(self, batch: dict[str, Any]) -> ro.Generated:
        # The one place SFT generates text (validation, test and predict), through the shared rollout path.
        n = self.hparams.max_new_tokens
        settings = GenerationSettings(min_new_tokens=1, max_new_tokens=(n, n + 1), do_sample=False,
                                      no_repeat_ngram_size=self.hparams.no_repeat_ngram_size)
        limits = torch.full((len(batch["input_ids"]),), n, dtype=torch.long)
        return ro.generate_responses(self.policy, batch, settings, limits, synced_gpus=dist.synced_gpus(self._trainer))

    def _evaluate_batch(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        batch_size = len(batch["input_ids"])
        if "summary_ids" in batch:
            loss = self.sft_loss(batch)
            self.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True)
            if batch_size > 1:
                self.log(f"{stage}/prompt_gap", self.prompt_gap(batch, loss), batch_size=batch_size,
                         sync_dist=True)
        summaries = self.generate_summaries(batch)
        self.rouge.update(summaries, batch["reference"])
        if batch_idx == 0:
            self._log_sample(stage, batch["reference"][0], summaries[0])

    def _log_rouge(self, stage: str) -> None:
        scores = self.rouge.compute()
        self.rouge.reset()
        self.log_dict({f"{stage}/{key}": scores[f"{key}_fmeasure"] for key in ROUGE_KEYS}, prog_bar=stage == "val")

    def _log_sample(self, stage: str, reference: str, summary: str) -> None:
        text = f"reference: {reference}\n\ngenerated: {summary}"
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_text"):
            experiment.add_text(f"{stage}/sample", text, self.global_step)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_rouge("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_rouge("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One record per prompt: ``id``, ``dialogue`` (when the batch has it) and the greedy ``summary``."""
        return ro.predict_records(self._generate(batch), batch, scorer_name=None)


def check_sft_settings(
    learning_rate: float, weight_decay: float, warmup_steps: int, lr_schedule: str, decay_steps: int | None,
    min_lr_ratio: float, max_new_tokens: int, num_threads: NumThreads, no_repeat_ngram_size: int = 0,
    optimizer: str = "adamw",
) -> None:
    """Check SFTModule's settings before anything is loaded; errors name the flag."""
    errors = []
    if not learning_rate > 0:
        errors.append(f"model.learning_rate must be > 0, got {learning_rate}")
    if optimizer not in ("adamw", "adafactor"):
        errors.append(f"model.optimizer must be adamw or adafactor, got {optimizer!r}")
    if weight_decay < 0:
        errors.append(f"model.weight_decay must be >= 0, got {weight_decay}")
    if warmup_steps < 0:
        errors.append(f"model.warmup_steps must be >= 0, got {warmup_steps}")
    if lr_schedule not in ("constant", "linear", "cosine"):
        errors.append(f"model.lr_schedule must be constant, linear or cosine, got {lr_schedule!r}")
    if decay_steps is not None and decay_steps <= warmup_steps:
        errors.append(f"model.decay_steps ({decay_steps}) must be larger than model.warmup_steps ({warmup_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        errors.append(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if no_repeat_ngram_size < 0:
        errors.append(f"model.no_repeat_ngram_size must be >= 0 (0: off), got {no_repeat_ngram_size}")
    if max_new_tokens < 1:
        errors.append(f"model.max_new_tokens must be >= 1, got {max_new_tokens}")
    errors += num_threads_errors(num_threads)
    if errors:
        raise ValueError("; ".join(errors))


# ---------------------------------------------------------------------------------------- evaluation helpers

def utterances(dialogue: str) -> list[str]:
    """A DialogSum dialogue's utterances: its non-empty lines ("#Person1#: ..."), in order."""
    return [line.strip() for line in dialogue.split("\n") if line.strip()]


def lead_summary(dialogue: str, k: int = 2) -> str:
    """Lead-k baseline: the dialogue's first ``k`` utterances."""
    return " ".join(utterances(dialogue)[:k])


def longest_summary(dialogue: str, k: int = 3) -> str:
    """Longest-k baseline: the dialogue's ``k`` longest utterances (in characters), kept in dialogue order."""
    lines = utterances(dialogue)
    keep = sorted(sorted(range(len(lines)), key=lambda i: -len(lines[i]))[:k])
    return " ".join(lines[i] for i in keep)


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures of ``predictions`` against ``references`` (torchmetrics ``ROUGEScore``,
    the metric SFT validation logs): ``{"rouge1": ..., "rouge2": ..., "rougeL": ...}``."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (> 0), got {len(predictions)} and {len(references)}")
    scores = ROUGEScore(rouge_keys=ROUGE_KEYS)(predictions, references)
    return {key: float(scores[f"{key}_fmeasure"]) for key in ROUGE_KEYS}
