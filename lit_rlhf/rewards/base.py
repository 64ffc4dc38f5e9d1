"""The reward base and its checks: :class:`Scorer` and :class:`Reward`, the checks of a reward's inputs and
scores, and the check of a reward against the data's columns.

Every reward is a subclass of :class:`Reward`, and every toxicity evaluator (``lit_rlhf.callbacks``) of
:class:`Scorer`, their shared base: a plain (non-``nn.Module``) class so that LightningCLI can build it from YAML
(``class_path: lit_rlhf.rewards.ClassifierReward`` + ``init_args``) and so that a reward model held by the
``LightningModule`` is not registered as a submodule: its weights stay out of the optimizer, out of the
checkpoint and out of DDP's gradient sync.

Contract: ``reward(prompts, responses, references=None, columns=None) -> Tensor[B]``, float32, finite, on the
device given to :meth:`Reward.to` (CPU by default). ``columns`` holds the batch's source columns by name (one
value per response) for rewards that read them (``FunctionReward``); the others ignore it. Subclasses implement
:meth:`Reward.compute`; the base class checks inputs and output in one place and runs ``compute`` under
``torch.inference_mode()``.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

TextField = Literal["response", "prompt+response"]

# Joins prompt and response when a reward scores both (text="prompt+response"). A newline rather than a
# tokenizer's sentence-pair encoding: hate-speech classifiers are trained on single texts.
PROMPT_RESPONSE_SEPARATOR = "\n"


def select_text(text: TextField, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
    """The strings a reward scores: the responses, or each prompt and response joined by a newline."""
    if text == "response":
        return list(responses)
    return [p + PROMPT_RESPONSE_SEPARATOR + r for p, r in zip(prompts, responses)]


def check_choice(value: Any, flag: str, choices: Sequence[Any]) -> None:
    """Raise a ValueError naming ``flag`` unless ``value`` is one of ``choices``.

    Literal annotations are enforced by LightningCLI, not when a reward is built in Python."""
    if value not in choices:
        raise ValueError(f"{flag} must be one of {list(choices)}, got {value!r}.")


def check_inputs(
    reward: "Reward", prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None,
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> None:
    """Raise a ValueError unless prompts, responses (and references and each column, when given) are equally
    long lists."""
    name = type(reward).__name__
    for column, values in (columns or {}).items():
        if len(values) != len(responses):
            raise ValueError(f"{name}: column {column!r} has {len(values)} values for {len(responses)} responses.")
    for argument, values in (("prompts", prompts), ("responses", responses), ("references", references)):
        if values is not None and (isinstance(values, str) or not isinstance(values, Sequence)):
            raise ValueError(f"{name}: `{argument}` must be a list of strings, got {type(values).__name__}.")
    if len(prompts) != len(responses):
        raise ValueError(f"{name}: got {len(prompts)} prompts but {len(responses)} responses; they must pair up.")
    if references is not None and len(references) != len(responses):
        raise ValueError(f"{name}: got {len(references)} references for {len(responses)} responses.")


class NonFiniteRewardError(ValueError):
    """A reward returned NaN or infinite scores. The PPO module skips such a step (and stops after too many in a
    row); shape and type errors are plain ValueError/TypeError: they are bugs that no retry fixes."""


def check_scores(reward: "Reward", scores: Any, batch_size: int) -> torch.Tensor:
    """Return ``scores`` as a float32 tensor of shape [batch_size]; raise if it is not one, or not finite."""
    name = type(reward).__name__
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name}.compute returned {type(scores).__name__}, expected a torch.Tensor.")
    if tuple(scores.shape) != (batch_size,):
        raise ValueError(
            f"{name}.compute returned shape {tuple(scores.shape)}, expected ({batch_size},): one score per response."
        )
    if not scores.is_floating_point():
        raise ValueError(f"{name}.compute returned dtype {scores.dtype}, expected a floating point tensor.")
    # Cast before the finiteness check: a float64 score beyond float32's range becomes inf here.
    scores = scores.float()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"{i}: {scores[i].item()}" for i in bad[:10])
        raise NonFiniteRewardError(f"{name} returned non-finite scores at positions {bad} ({shown}).")
    return scores


class Scorer(ABC):
    """What rewards and toxicity evaluators share: a model loaded on demand, a device, a description.

    Plain classes (not ``nn.Module``), so LightningCLI builds them from YAML (``class_path`` + ``init_args``)
    and a scoring model held by the LightningModule stays out of its optimizer, checkpoint and DDP sync.
    """

    model_id: str | None = None
    """The model behind the scores (hub name, path or package), so an evaluator can tell whether it is the same
    model as the reward; None when there is no model."""

    device: torch.device = torch.device("cpu")
    """Where scores are returned; set by :meth:`to`. A class default, so subclasses need not call ``__init__``."""

    def describe(self) -> str:
        """One line for reports: what is scored and by what."""
        return type(self).__name__

    def setup(self) -> None:
        """Load what the scorer needs (called by :meth:`to` and before the first call, so a run can load and
        validate it before training starts). Idempotent; nothing to do by default."""

    def to(self, device: str | torch.device) -> "Scorer":
        """Score on ``device`` from now on (and compute there, for scorers that run a torch model)."""
        self.device = torch.device(device)
        self.setup()
        return self


class Reward(Scorer):
    """Scores responses to prompts: ``reward(prompts, responses, references=None) -> Tensor[B]`` (float32).

    Subclasses implement :meth:`compute`, and :meth:`setup` when they load something (a model).
    """

    setting: str = "--model.reward"
    """Where this reward's arguments are set, for errors: ``--model.reward`` (an argument ``x`` is then
    ``--model.reward.x``); a part of a CompositeReward or a toxicity evaluator's classifier is told its own."""

    takes_columns: bool = False
    """Whether :meth:`compute` takes the batch's columns (``columns=``, a dict of lists by column name)."""

    last_components: dict[str, torch.Tensor] = {}
    """The parts of the last call's scores by name, for a reward made of several (``CompositeReward``); the
    PPO module logs each part's mean as ``env/reward/<name>_mean``. Empty for a single reward."""

    @property
    def name(self) -> str:
        """Short identifier used in metric names and reports (e.g. ``env/reward/<name>``)."""
        return type(self).__name__

    def describe(self) -> str:
        return self.name

    def flag(self, argument: str) -> str:
        """How a user sets ``argument`` of this reward: ``--model.reward.max_length``."""
        return f"{self.setting}.{argument}"

    def uses_model(self, model_id: str | None) -> bool:
        """Whether ``model_id`` is (one of) the model(s) behind this reward."""
        return model_id is not None and model_id == self.model_id

    def required_columns(self) -> list[str]:
        """Data columns this reward reads (checked against the data before the first step)."""
        return []

    def needs_references(self) -> bool:
        """Whether this reward compares responses with references (the data must have a reference column)."""
        return False

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> torch.Tensor:
        """One score per response: float32 tensor of shape [len(responses)] on ``self.device``.

        ``references`` (e.g. the reference summaries) is passed on to rewards that compare against it, and
        ``columns`` (the batch's source columns by name) to rewards that read them; the others ignore them.
        """
        check_inputs(self, prompts, responses, references, columns)
        self.setup()
        refs = None if references is None else list(references)
        extra = {"columns": {k: list(v) for k, v in (columns or {}).items()}} if self.takes_columns else {}
        with torch.inference_mode():
            scores = self.compute(list(prompts), list(responses), refs, **extra)
        scores = check_scores(self, scores, len(responses)).to(self.device)
        # Clone outside inference mode: inference tensors cannot be modified in place or saved for backward
        # later, which the PPO step may do with the scores.
        return scores.clone()

    @abstractmethod
    def compute(self, prompts: list[str], responses: list[str], references: list[str] | None) -> torch.Tensor:
        """Scores, shape [B]. Called under ``torch.inference_mode()`` with checked, equally long lists."""


def check_reward_inputs(reward: Reward, columns: Sequence[str], has_references: bool,
                        first_null: Callable[[str], str | None] | None = None, flag: str = "model.reward") -> None:
    """Raise a ValueError, naming the reward and what is missing, when the data lacks a column the reward reads
    or references the reward compares with, or (``first_null``: a column -> the id of its first row without a
    value) when some rows have no value in such a column: the reward would be handed None. ``flag``: the setting
    that names it (``model.environment`` for an environment's reward)."""
    missing = [c for c in reward.required_columns() if c not in columns]
    if missing:
        raise ValueError(
            f"{flag} {reward.describe()} reads the column(s) {missing}, which the data lacks (its columns: "
            f"{list(columns)}); add them to the data (data.dataset, data.predict_path) or change the reward"
        )
    for column in reward.required_columns() if first_null is not None else []:
        row = first_null(column)
        if row is not None:
            raise ValueError(
                f"{flag} {reward.describe()} reads the column {column!r}, which row {row!r} of the data has no "
                "value in (null or absent); give every row one (data.dataset, data.predict_path) or drop those rows"
            )
    if reward.needs_references() and not has_references:
        raise ValueError(
            f"{flag} {reward.describe()} compares responses with references, and the data has none: set "
            f"data.reference_column to one of the data's columns {list(columns)}, or change the reward"
        )
