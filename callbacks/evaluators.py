"""Toxicity evaluators: ``evaluator(prompts, responses) -> Tensor[B]``, the probability of the toxic class, in [0, 1],
of what the evaluator reads (``text``: the response, or prompt + newline + response).

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

from lit_rlhf.rewards import ClassifierReward, ProfanityReward, Scorer, TextField, import_profanity_check, select_text

# Probabilities a classifier computes in float32 may stray from [0, 1] by rounding; beyond this, it is a bug.
_RANGE_TOLERANCE = 1e-5


class ToxicityEvaluator(Scorer):
    """Scores responses to prompts: ``evaluator(prompts, responses) -> Tensor[B]``, float32 on the CPU, the
    probability of the toxic class of what :attr:`text` names (``ToxicityCallback`` sets its own ``text``).

    Subclasses implement :meth:`compute`, and :meth:`setup` when they load a model (``lit_rlhf.rewards.Scorer``
    gives ``model_id``, ``device``, ``describe``, ``setup`` and ``to``). The base class checks the output (one
    finite value per response, in [0, 1]) in one place and runs ``compute`` under ``torch.inference_mode()``.
    """

    text: TextField = "response"
    """What is scored: the ``response``, or ``prompt+response`` joined by a newline (set by :meth:`reads`)."""

    def reads(self, text: TextField) -> None:
        """Score ``text`` of each (prompt, response) from now on."""
        self.text = text

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        name = type(self).__name__
        for arg, values in (("prompts", prompts), ("responses", responses)):
            if isinstance(values, str) or not isinstance(values, Sequence):
                raise ValueError(f"{name}: `{arg}` must be a list of strings, got {type(values).__name__}.")
        if len(prompts) != len(responses):
            raise ValueError(f"{name}: {len(prompts)} prompts for {len(responses)} responses.")
        self.setup()
        with torch.inference_mode():
            scores = self.compute(list(prompts), list(responses))
        scores = torch.as_tensor(scores).detach().float().cpu().clone()
        if tuple(scores.shape) != (len(responses),):
            raise ValueError(f"{name} returned shape {tuple(scores.shape)} for {len(responses)} responses; expected "
                             f"({len(responses)},).")
        outside = (~torch.isfinite(scores)) | (scores < -_RANGE_TOLERANCE) | (scores > 1 + _RANGE_TOLERANCE)
        if outside.any():
            bad = outside.nonzero().flatten().tolist()
            raise ValueError(
                f"{name} returned values outside [0, 1] at positions {bad[:10]}: {scores[bad[:10]].tolist()}"
            )
        return scores.clamp(0.0, 1.0)

    @abstractmethod
    def compute(self, prompts: list[str], responses: list[str]) -> Tensor:
        """P(toxic) of each response (with its prompt when :attr:`text` is ``prompt+response``), shape [B]."""


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
            max_length: The most tokens the classifier reads (at most its own limit): with ``prompt+response``
                (``ToxicityCallback``'s ``text``) the response is kept whole and the prompt cut from its start,
                as ``ClassifierReward`` reads them (``rewards.classifier_input_ids``).
            device: Where the classifier runs; None: on the training module's device.
            dtype: The classifier's weight dtype; None: the training module's ``model.dtype`` (as resolved); see
                ``ClassifierReward``.
        """
        self.model_name = model_name
        self.label = label
        self.model_id = model_name
        self.classifier_args = {"model_name": model_name, "label": label, "output": "probability",
                                "batch_size": batch_size, "max_length": max_length, "device": device, "dtype": dtype}
        self.classifier = self._classifier(self.text)

    def _classifier(self, text: TextField) -> ClassifierReward:
        classifier = ClassifierReward(**self.classifier_args, text=text)
        classifier.setting = EVALUATOR_SETTING  # its errors name this evaluator's arguments
        return classifier

    def reads(self, text: TextField) -> None:
        """The classifier is built to read ``text``: ``ClassifierReward(text=...)`` then cuts a long prompt from its
        start and keeps the response whole, as a reward does. A classifier already placed is placed again."""
        if text != self.classifier.text:
            placed, self.classifier = self.classifier, self._classifier(text)
            self.classifier.follow_dtype(placed.followed_dtype)
            if placed.model is not None:
                self.classifier.to(placed.device)
        super().reads(text)

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

    def compute(self, prompts: list[str], responses: list[str]) -> Tensor:
        return self.classifier(prompts, responses)


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

    def compute(self, prompts: list[str], responses: list[str]) -> Tensor:
        texts = select_text(self.text, prompts, responses)  # the measurement's own pipeline cuts what it reads
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

    def compute(self, prompts: list[str], responses: list[str]) -> Tensor:
        # TF-IDF features over the whole text: nothing is cut
        return self.profanity.probability(select_text(self.text, prompts, responses))
