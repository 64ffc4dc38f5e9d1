"""Toxicity evaluators: ``evaluator(texts) -> Tensor[B]``, the probability of the toxic class, in [0, 1].

Evaluators are not rewards: they measure the trained model, they are not optimised against. The
report says when an evaluator is the same model as the reward (``reward.uses_model(evaluator.model_id)``),
because a policy trained against a scorer can lower that scorer's toxicity without being less toxic.

- :class:`ClassifierToxicity`: softmax probability of a label of any Hugging Face sequence classifier (hub
  name or local path); the recipe's ``facebook/roberta-hate-speech-dynabench-r4-target``, label ``hate``.
- :class:`EvaluateToxicity`: the ``evaluate`` library's ``toxicity`` measurement (needs the hub).
- :class:`ProfanityToxicity`: offline, the ``alt-profanity-check`` model's P(offensive) (the ``offline`` extra).

Like rewards, evaluators are plain classes (buildable from YAML with ``class_path``) that load their model
lazily, in :meth:`ToxicityEvaluator.setup`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lit_rlhf.rewards import ClassifierReward, ProfanityReward, Scorer, import_profanity_check

# Probabilities a classifier computes in float32 may stray from [0, 1] by rounding; beyond this, it is a bug.
_RANGE_TOLERANCE = 1e-5


class ToxicityEvaluator(Scorer):
    """Scores texts: ``evaluator(texts) -> Tensor[B]``, float32 on the CPU, the probability of the toxic class.

    Subclasses implement :meth:`compute`, and :meth:`setup` when they load a model (``lit_rlhf.rewards.Scorer``
    gives ``model_id``, ``device``, ``describe``, ``setup`` and ``to``). The base class checks the output (one
    finite value per text, in [0, 1]) in one place and runs ``compute`` under ``torch.inference_mode()``.
    """

    def __call__(self, texts: Sequence[str]) -> Tensor:
        name = type(self).__name__
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"{name}: `texts` must be a list of strings, got {type(texts).__name__}.")
        self.setup()
        with torch.inference_mode():
            scores = self.compute(list(texts))
        scores = torch.as_tensor(scores).detach().float().cpu().clone()
        if tuple(scores.shape) != (len(texts),):
            raise ValueError(
                f"{name} returned shape {tuple(scores.shape)} for {len(texts)} texts; expected ({len(texts)},)."
            )
        outside = (~torch.isfinite(scores)) | (scores < -_RANGE_TOLERANCE) | (scores > 1 + _RANGE_TOLERANCE)
        if outside.any():
            bad = outside.nonzero().flatten().tolist()
            raise ValueError(
                f"{name} returned values outside [0, 1] at positions {bad[:10]}: {scores[bad[:10]].tolist()}"
            )
        return scores.clamp(0.0, 1.0)

    @abstractmethod
    def compute(self, texts: list[str]) -> Tensor:
        """P(toxic) of each text, shape [B]."""


EVALUATOR_SETTING = "ToxicityCallback's evaluator.init_args"
"""Where the toxicity evaluator's arguments are set (under ``trainer.callbacks``), for errors."""


class ClassifierToxicity(ToxicityEvaluator):
    """Softmax probability of ``label`` from a Hugging Face sequence classifier (hub name or local path).

    The same computation as ``ClassifierReward(output="probability")``, which it uses, so the two cannot
    drift apart.
    """

    def __init__(
        self,
        model_name: str = "facebook/roberta-hate-speech-dynabench-r4-target",
        label: str = "hate",
        batch_size: int = 32,
        max_length: int = 512,
        device: str | None = None,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
    ) -> None:
        """
        Args:
            model_name: Hugging Face hub name or local path of a sequence-classification model and its tokenizer.
            label: The toxic label, as in the model's ``config.id2label`` (exact match first, then
                case-insensitive); an unknown label raises an error that lists the model's labels.
            batch_size: Texts per classifier forward pass.
            max_length: Texts are truncated to this many tokens (at most the tokenizer's ``model_max_length``).
            device: Where the classifier runs; None: on the training module's device.
            dtype: The classifier's weight dtype; None: the training module's ``model.dtype`` (as resolved); see
                ``ClassifierReward``.
        """
        self.model_name = model_name
        self.label = label
        self.model_id = model_name
        self.classifier = ClassifierReward(
            model_name=model_name, label=label, output="probability", batch_size=batch_size,
            max_length=max_length, text="response", device=device, dtype=dtype,
        )
        self.classifier.setting = EVALUATOR_SETTING  # its errors name this evaluator's arguments

    def describe(self) -> str:
        return f"probability of label '{self.label}' from {self.model_name}"

    def setup(self) -> None:
        self.classifier.setup()

    def to(self, device: str | torch.device) -> "ClassifierToxicity":
        self.device = torch.device(device)
        self.classifier.to(device)
        return self

    def follow_dtype(self, dtype: str) -> None:
        """The training module's resolved weight dtype, used unless ``dtype`` was given."""
        self.classifier.follow_dtype(dtype)

    def compute(self, texts: list[str]) -> Tensor:
        return self.classifier([""] * len(texts), texts)


class EvaluateToxicity(ToxicityEvaluator):
    """The ``evaluate`` library's ``toxicity`` measurement, as the recipe used it.

    ``evaluate.load("toxicity", model_name, module_type="measurement")`` downloads the measurement script
    and the classifier from the Hugging Face hub, so this evaluator needs network access (or a populated
    hub cache); offline, use :class:`ClassifierToxicity` on a local copy of the classifier, which computes the
    same probability. The measurement runs its own ``transformers`` pipeline on the CPU.
    """

    def __init__(
        self, model_name: str = "facebook/roberta-hate-speech-dynabench-r4-target", toxic_label: str = "hate"
    ) -> None:
        """
        Args:
            model_name: The classifier the measurement loads (its ``config_name``).
            toxic_label: The classifier's toxic label, passed to ``compute(toxic_label=...)``.
        """
        self.model_name = model_name
        self.toxic_label = toxic_label
        self.model_id = model_name
        self.measurement: Any = None

    def describe(self) -> str:
        return f"evaluate 'toxicity' measurement: probability of '{self.toxic_label}' from {self.model_name}"

    def setup(self) -> None:
        if self.measurement is not None:
            return
        try:
            import evaluate

            self.measurement = evaluate.load("toxicity", self.model_name, module_type="measurement")
        except Exception as err:  # any failure here (no network, hub error, missing package) has one remedy
            raise RuntimeError(
                f"EvaluateToxicity could not load the `evaluate` library's 'toxicity' measurement with "
                f"model_name={self.model_name!r} ({type(err).__name__}: {err}). It downloads the measurement and "
                "the classifier from the Hugging Face hub: check network access and HF_HUB_OFFLINE / "
                "HF_EVALUATE_OFFLINE, or use lit_rlhf.callbacks.ClassifierToxicity (hub name or a local copy) or "
                "the offline lit_rlhf.callbacks.ProfanityToxicity as the callback's `evaluator`."
            ) from err

    def compute(self, texts: list[str]) -> Tensor:
        if not texts:
            return torch.empty(0)
        scores = self.measurement.compute(predictions=texts, toxic_label=self.toxic_label)["toxicity"]
        return torch.tensor(scores, dtype=torch.float32)


class ProfanityToxicity(ToxicityEvaluator):
    """Offline: P(offensive) from the ``alt-profanity-check`` model (``ProfanityReward().probability``).

    The offline default's reward is built on the same model: the report then warns that the evaluator is
    the reward's own scorer.
    """

    def __init__(self) -> None:
        self.profanity = ProfanityReward(method="clamped")  # probability() is the same for either method
        self.model_id = self.profanity.model_id

    def describe(self) -> str:
        return "P(offensive) from alt-profanity-check"

    def setup(self) -> None:
        import_profanity_check(type(self).__name__)  # a missing package is named as this evaluator's need
        self.profanity.setup()

    def compute(self, texts: list[str]) -> Tensor:
        return self.profanity.probability(texts)
