"""Offline toxicity reward from the ``alt-profanity-check`` scikit-learn model (the ``offline`` extra:
``pip install 'lit-rlhf[offline]'``)."""

from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lit_rlhf.rewards.base import Reward, TextField, check_choice, select_text


class ProfanityReward(Reward):
    """Offline toxicity reward: the logit of "not offensive" from the ``alt-profanity-check`` model.

    The package ships a scikit-learn model (TF-IDF features, then ``CalibratedClassifierCV`` with sigmoid
    calibration over five linear SVMs) and exposes only ``predict_prob(texts) -> P(offensive)``. The reward is
    ``log((1 - p) / p)``, on the same scale as a classifier's logit.
    """

    def __init__(
        self,
        text: TextField = "response",
        method: Literal["exact", "clamped"] = "exact",
        eps: float = 1e-4,
    ) -> None:
        """
        Args:
            text: What is scored: the ``response`` alone, or ``prompt+response`` joined by a newline.
            method: ``exact``: the logit computed in log space from the model's calibrated linear scores, finite
                and still ordered where P(offensive) rounds to 0 or 1 (clearly offensive texts still differ);
                relies on the layout of the package's scikit-learn model, checked when it loads. ``clamped``:
                ``log((1 - p) / p)`` of the package's ``predict_prob`` with p clamped to [eps, 1 - eps], flat
                beyond that range.
            eps: Clamp of P(offensive) for ``method='clamped'``: rewards lie in ±log((1 - eps) / eps).
        """
        super().__init__()
        check_choice(text, self.flag("text"), ("response", "prompt+response"))
        check_choice(method, self.flag("method"), ("exact", "clamped"))
        if not 0.0 < eps < 0.5:
            raise ValueError(f"{self.flag('eps')} must be in (0, 0.5), got {eps}.")
        self.text = text
        self.method = method
        self.eps = eps
        self.model_id = "alt-profanity-check"
        self._vectorizer: Any = None
        self._model: Any = None
        self._members: list[tuple[Any, float, float]] | None = None

    @property
    def name(self) -> str:
        return "profanity"

    def describe(self) -> str:
        package = _package_version("alt-profanity-check")
        return f"logit of 'not offensive' from {package} ({self.method}, reads the {self.text})"

    def setup(self) -> None:
        if self._model is not None:
            return
        # The package loads its model when imported (about a second), so import only when used.
        package = import_profanity_check(type(self).__name__)
        self._vectorizer, self._model = package.vectorizer, package.model
        if self.method == "exact":
            self._members = sigmoid_calibrated_members(self._model)
            self._check_exact_matches_package()

    def probability(self, texts: Sequence[str]) -> torch.Tensor:
        """P(offensive) of each text, float32 [B], as the package's ``predict_prob`` gives it."""
        self.setup()
        if len(texts) == 0:
            return torch.empty(0)
        from profanity_check import predict_prob  # imported by setup()

        return torch.from_numpy(predict_prob(list(texts))).float()

    def compute(self, prompts: list[str], responses: list[str], references: list[str] | None) -> torch.Tensor:
        texts = select_text(self.text, prompts, responses)
        if not texts:
            return torch.empty(0)
        if self.method == "clamped":
            from profanity_check import predict_prob  # imported by setup()

            # float64 as the package gives it: in float32, 1 - p loses its digits near p = 1.
            p = torch.from_numpy(predict_prob(texts)).clamp(self.eps, 1 - self.eps)
            return torch.log1p(-p) - torch.log(p)
        return self._exact_logit(texts).float()

    def _exact_logit(self, texts: list[str]) -> torch.Tensor:
        features = self._vectorizer.transform(texts)
        # z_k: member k's calibrated logit of "offensive", sigmoid calibration σ(-(a·d + b)) of the SVM score d.
        z = torch.stack(
            [torch.from_numpy(-(a * svm.decision_function(features) + b)) for svm, a, b in self._members]
        )  # [K, B], float64
        # The package averages probabilities, p = (1/K) Σ_k σ(z_k), so
        # log((1-p)/p) = logsumexp_k log σ(-z_k) - logsumexp_k log σ(z_k) (the 1/K cancels);
        # in log space this stays finite where p itself rounds to 1.
        return torch.logsumexp(F.logsigmoid(-z), dim=0) - torch.logsumexp(F.logsigmoid(z), dim=0)

    def _check_exact_matches_package(self) -> None:
        probe = ["have a nice day", "you are a stupid idiot", "the meeting moved to tuesday", "damn it"]
        p = torch.sigmoid(-self._exact_logit(probe))
        expected = torch.from_numpy(self._model.predict_proba(self._vectorizer.transform(probe))[:, 1])
        if not torch.allclose(p, expected, rtol=0, atol=1e-9):
            raise ValueError(
                f"ProfanityReward's {self.flag('method')} exact does not reproduce alt-profanity-check's "
                f"probabilities with this version of the package or scikit-learn; use {self.flag('method')} clamped."
            )


OFFLINE_EXTRA = "pip install 'lit-rlhf[offline]'"
"""How to install the offline profanity scorer: an extra, because ``alt-profanity-check`` pins scikit-learn
and joblib to exact versions, which a core dependency would force on every environment lit_rlhf goes into."""


def import_profanity_check(scorer: str) -> ModuleType:
    """The ``profanity_check`` module of ``alt-profanity-check`` (its model loaded), or a ValueError that names
    ``scorer`` (the class that needs it) and the extra that installs it."""
    try:
        from profanity_check import profanity_check
    except ImportError as err:  # not installed, or its pinned scikit-learn/joblib missing underneath
        raise ValueError(
            f"{scorer} needs the alt-profanity-check package: {OFFLINE_EXTRA} (importing it failed: {err})"
        ) from err
    return profanity_check


def sigmoid_calibrated_members(model: Any) -> list[tuple[Any, float, float]]:
    """(linear model, a, b) of each member of a binary sigmoid-calibrated ``CalibratedClassifierCV``.

    Member k gives P(class 1) = σ(-(a·d + b)) with d its ``decision_function`` (scikit-learn's
    ``_SigmoidCalibration``); the ensemble's probability is the mean over members.
    """
    unsupported = ValueError(
        f"ProfanityReward(method='exact') needs a sigmoid-calibrated binary scikit-learn model; the installed "
        f"alt-profanity-check ships {type(model).__name__}. Use `method='clamped'`."
    )
    members = getattr(model, "calibrated_classifiers_", None)
    if getattr(model, "method", None) != "sigmoid" or not members or list(getattr(model, "classes_", [])) != [0, 1]:
        raise unsupported
    out = []
    for member in members:
        calibrators = getattr(member, "calibrators", [])
        if len(calibrators) != 1 or not hasattr(member.estimator, "decision_function"):
            raise unsupported
        a, b = getattr(calibrators[0], "a_", None), getattr(calibrators[0], "b_", None)
        if a is None or b is None:
            raise unsupported
        out.append((member.estimator, float(a), float(b)))
    return out


def _package_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{distribution} {version(distribution)}"
    except PackageNotFoundError:
        return distribution
