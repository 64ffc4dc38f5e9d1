"""Reward modelling: a one-output sequence classifier trained on preference pairs, exported for PPO.

    bradley_terry_loss    r_chosen, r_rejected [B] -> -log σ(r_c - r_r - margin) + center_coef (r_c + r_r)², mean
    preference_stats      r_chosen, r_rejected [B] -> accuracy (chosen ranked above rejected), mean margin
    RewardModelModule     the classifier (LoRA or full), the loss over ``PreferenceDataModule`` batches, the export

The classifier reads ``chosen_input_ids``/``rejected_input_ids`` of the preference batch (the data module's
``classifier_inputs``, which ``lit-rlhf-rm`` sets): the query + newline +
response (or the response alone, the data module's ``classifier_text``) encoded by
``rewards.classifier_input_ids`` (the response whole, the query cut from its start to the data module's
``classifier_max_length``), which is what ``ClassifierReward(text=..., max_length=...)`` feeds it in PPO.
At the end of fit the model (LoRA merged in) and its tokenizer are saved to ``<log_dir>/reward_model`` with
``id2label = {0: label}``, so ``ClassifierReward(model_name=<folder>, label=<label>, output="logit", text=<the same
classifier_text>)`` loads it as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lit_rlhf.models import ensure_pad_token, finetune_errors, lora_wrapping, model_source_errors, resolve_model_path
from lit_rlhf.modules.base import RLHFModule
from lit_rlhf.runtime import NumThreads, atomic_directory, num_threads_errors
from lit_rlhf.runtime import distributed as dist
from lit_rlhf.objectives import bradley_terry_loss, preference_stats
from lit_rlhf.settings import LoraSettings, WeightDtype, check, dtype_errors, lora_settings, resolve_base_dtype


class RewardModelModule(RLHFModule):
    """A reward model: a sequence classifier with one output, trained with the Bradley-Terry loss on
    ``PreferenceDataModule`` batches (give the data module the same ``model_name``: its tokenizer encodes the
    classifier's inputs). Logs ``train/loss``, ``train/accuracy``; ``val/loss``, ``val/accuracy`` (chosen
    ranked above rejected), ``val/margin`` (mean r_c - r_r); the same under ``test/``.

    Args:
        model_name: hub name, local folder or embedded model: a decoder-only model (GPT-2, Llama, Qwen...: the
            reward is read at the last token) or an encoder (BERT, RoBERTa...). A new one-output head
            (``score``/``classifier``) replaces any existing one.
        finetune: ``lora``: a LoRA adapter (``lora``) on the frozen model, the head trained in full (peft's
            ``modules_to_save``); ``full``: every weight.
        lora: the adapter's shape (with ``finetune=lora``; ``target_modules`` None: peft's default).
        learning_rate: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        center_coef: weight of the centering term (r_c + r_r)² (0: none).
        label: the name of the one output in the exported config (``id2label``), the ``label`` to give
            ``ClassifierReward``.
        export_dir: where the model goes at the end of fit; None: ``<log_dir>/reward_model``.
        num_threads: torch's intra-op CPU threads; auto: 1 for a small model, else torch's default.
        dtype: dtype of the frozen base weights with ``finetune=lora`` (the adapter and the trained head stay
            float32); a full fine-tune needs float32 (use ``trainer.precision=bf16-mixed``). auto: bfloat16 for a
            LoRA run on a CUDA device with bfloat16, float32 otherwise; the run logs its choice. The export is
            float32 (the adapter merged into the base in float32).
    """

    export_name = "reward_model"
    keeps_rng = True
    """Checkpoints keep the RNG states: the adapter's dropout draws from them."""

    def __init__(
        self,
        model_name: str = "embedded:tiny-gpt2",
        finetune: Literal["lora", "full"] = "lora",
        lora: LoraSettings | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        center_coef: float = 0.0,
        label: str = "reward",
        export_dir: str | None = None,
        num_threads: NumThreads = "auto",
        dtype: WeightDtype = "auto",
    ) -> None:
        super().__init__()
        lora = lora_settings(lora)  # also a plain dict (a checkpoint's hyperparameters); checked there
        errors = model_source_errors({"model.model_name": model_name}) + finetune_errors(finetune)
        if learning_rate <= 0 or weight_decay < 0 or center_coef < 0:
            errors.append(f"model.learning_rate must be > 0 and model.weight_decay, model.center_coef >= 0, got "
                          f"{learning_rate}, {weight_decay}, {center_coef}")
        if not label:
            errors.append("model.label must name the reward output, e.g. reward")
        check(errors + num_threads_errors(num_threads) + dtype_errors(dtype, finetune, lora.bias))
        self.save_settings(lora=lora)
        self.lora = lora
        self.strict_loading = finetune == "full"  # a LoRA run's checkpoints hold only its trainable weights
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ the classifier

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self._trainer, "datamodule", None)
        if stage != "predict" and getattr(data, "classifier_inputs", True) is False:
            raise ValueError("a reward model reads the classifier's inputs of each pair: set data.classifier_inputs="
                             "true (PreferenceDataModule(classifier_inputs=True); lit-rlhf-rm sets it by default)")

    def configure_model(self) -> None:
        """Build the classifier (once) and set torch's CPU threads for its size (``num_threads``), in every
        process."""
        from lit_rlhf.runtime import use_num_threads

        self._build()
        use_num_threads(self.hparams.get("num_threads", "auto"), self.model, self._trainer)

    def _build(self) -> None:
        if self.model is None:
            hp = self.hparams
            device = getattr(getattr(self._trainer, "strategy", None), "root_device", None)  # None: no trainer yet
            self.weight_dtype = resolve_base_dtype(hp.get("dtype", "auto"), device, hp.finetune, self.lora.bias,
                                                   "Reward model base weights")
            self.tokenizer, self.model = build_reward_classifier(
                hp.model_name, hp.label, hp.finetune, self.lora, getattr(torch, self.weight_dtype))

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The scalar reward of each sequence: the classifier's one logit, float32 [B]."""
        self._build()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()

    def pair_rewards(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(r_chosen, r_rejected), each [B], from a preference batch's classifier inputs."""
        if "chosen_input_ids" not in batch:
            raise ValueError("The batch has no classifier inputs ('chosen_input_ids'): a reward model trains on "
                             "lit_rlhf.data.PreferenceDataModule batches with classifier_inputs=True")
        return (self.rewards(batch["chosen_input_ids"], batch["chosen_attention_mask"]),
                self.rewards(batch["rejected_input_ids"], batch["rejected_attention_mask"]))

    def loss_and_stats(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.pair_rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.hparams.center_coef)
        return loss, preference_stats(chosen, rejected)

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, stats = self.loss_and_stats(batch)
        n = len(batch["id"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/accuracy", stats["accuracy"], batch_size=n, sync_dist=True)
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        loss, stats = self.loss_and_stats(batch)
        n = len(batch["id"])
        self.log(f"{stage}/loss", loss, batch_size=n, sync_dist=True)
        self.log(f"{stage}/accuracy", stats["accuracy"], batch_size=n, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/margin", stats["margin"], batch_size=n, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """``lit-rlhf-rm predict``: each row's reward, as records (``id``, ``prompt``, ``response``, ``score``) for
        ``lit_rlhf.callbacks.PredictionWriter``."""
        scores = self.rewards(batch["input_ids"], batch["attention_mask"]).tolist()
        return [{"id": i, "prompt": p, "response": r, "score": s}
                for i, p, r, s in zip(batch["id"], batch["prompt"], batch["response"], scores)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ checkpoints and export

    def write_export(self, target: Path) -> None:
        """Save the classifier (``export``), gathered from every rank."""
        dist.export_weights(self.trainer, self.model, lambda state_dict: self.export(target, state_dict), "model.",
                            trainable_only=False)  # merging the adapter needs the base weights too

    def export_message(self, target: Path) -> str:
        # the text the classifier was trained on (the data module's classifier_text) is the one to score
        data = self.trainer.datamodule
        text = getattr(data, "classifier_text", "prompt+response")
        limit = data.classifier_limit() if hasattr(data, "classifier_limit") else None
        reads = "" if limit is None else f", max_length={limit}"  # the tokens it read of each pair's side
        return (f"Reward model exported to {target} (PPO: --model.reward lit_rlhf.rewards.ClassifierReward "
                f"with model_name={target}, label={self.hparams.label}, text={text}{reads})")

    def export(self, target: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the classifier (the adapter merged in) and its tokenizer into ``target`` (``export_reward_model``).

        The merge happens in a float32 copy built on the CPU from ``model_name`` and loaded with the trained
        weights (``state_dict``, keyed as ``self.model.state_dict()``, when this process holds only a shard):
        the training model stays as it is, and the accelerator holds no second copy."""
        hp = self.hparams
        _, copy = build_reward_classifier(hp.model_name, hp.label, hp.finetune, self.lora)
        copy.load_state_dict(self.model.state_dict() if state_dict is None else state_dict)
        export_reward_model(copy, self.tokenizer, target)


def build_reward_classifier(
    model_name: str, label: str, finetune: str, lora: LoraSettings, dtype: torch.dtype = torch.float32,
) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, classifier with one output named ``label``): LoRA-wrapped (head trained in full) or whole, on
    the CPU, its base weights in ``dtype``; trained weights are float32 (with a float32 head, which reads the
    base's hidden states cast to float32).

    A tokenizer without a pad token pads with eos, and the config's ``pad_token_id`` says so too: decoder-only
    classifiers find each sequence's last token through it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer, f"model.model_name={model_name!r}")
    # a classifier with another number of labels gets a new head (ignore_mismatched_sizes)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, id2label={0: label}, label2id={label: 0}, ignore_mismatched_sizes=True,
        pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    # dropout off (as TRL's RewardConfig.disable_dropout): both rewards of a pair come from one function, and
    # the train mode Lightning sets changes nothing else (the adapter's own lora.dropout still applies)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    if finetune == "full":
        return tokenizer, model
    from peft import LoraConfig, get_peft_model

    # SEQ_CLS: peft trains the classification head (score/classifier) in full, as modules_to_save
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias=lora.bias, task_type="SEQ_CLS")
    with lora_wrapping(model, config):  # GPT-2's Conv1D layers need fan_in_fan_out
        model = get_peft_model(model, config)
    if dtype != torch.float32:
        float32_trained_head(model)
    return tokenizer, model


def float32_trained_head(model: torch.nn.Module) -> None:
    """Keep the trained weights of a LoRA classifier on a half-precision base in float32: the adapter (peft
    already upcasts it) and the head peft trains in full (``modules_to_save``), which then reads its input cast
    to float32. AdamW updating half-precision weights would lose updates below their rounding."""
    from peft.utils import ModulesToSaveWrapper

    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    for wrapper in model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            wrapper.register_forward_pre_hook(
                lambda _, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))


def export_reward_model(model: torch.nn.Module, tokenizer: Any, target: str | Path) -> None:
    """Save the classifier (a LoRA adapter merged into ``model``, which is changed: pass a copy, as
    ``RewardModelModule.export`` does) and its tokenizer with ``save_pretrained`` into ``target``, atomically:
    the folder ``ClassifierReward`` loads."""
    from peft import PeftModel

    plain = model.merge_and_unload() if isinstance(model, PeftModel) else model

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_directory(target, write)
