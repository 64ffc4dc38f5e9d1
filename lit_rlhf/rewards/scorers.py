"""Rewards: one score per (prompt, response) pair, used by the PPO step.

Every reward is a subclass of :class:`Reward`, and every toxicity evaluator (``lit_rlhf.callbacks``) of
:class:`Scorer`, their shared base: a plain (non-``nn.Module``) class so that LightningCLI can build it from YAML
(``class_path: lit_rlhf.rewards.ClassifierReward`` + ``init_args``) and so that a reward model held by the
``LightningModule`` is not registered as a submodule: its weights stay out of the optimizer, out of the
checkpoint and out of DDP's gradient sync.

Contract: ``reward(prompts, responses, references=None, columns=None) -> Tensor[B]``, float32, finite, on the
device given to :meth:`Reward.to` (CPU by default). ``columns`` holds the batch's source columns by name (one
value per response) for rewards that read them (``FunctionReward``); the others ignore it. Subclasses implement :meth:`Reward.compute`; the base class
checks inputs and output in one place and runs ``compute`` under ``torch.inference_mode()``.

Implementations:

- :class:`ClassifierReward`: logit or probability of a named label from any Hugging Face sequence classifier
  (the seed recipe: ``facebook/roberta-hate-speech-dynabench-r4-target``, label ``nothate``).
- :class:`ProfanityReward`: offline toxicity reward from the ``alt-profanity-check`` scikit-learn model (the
  ``offline`` extra: ``pip install 'lit-rlhf[offline]'``).
- :class:`ReferenceSimilarityReward`: ROUGE of the response against the reference summary.
- :class:`CompositeReward`: weighted sum of rewards, keeping each part for logging.
- :class:`FunctionReward`: a plain Python function given by its import path, as TRL's ``reward_funcs``.
"""

import importlib
import importlib.util
import inspect
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

TextField = Literal["response", "prompt+response"]

# Joins prompt and response when a reward scores both (text="prompt+response"). A newline rather than a
# tokenizer's sentence-pair encoding: hate-speech classifiers are trained on single texts.
PROMPT_RESPONSE_SEPARATOR = "\n"


def select_text(text: TextField, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
    """The strings a reward scores: the responses, or each prompt and response joined by a newline."""
    if text == "response":
        return list(responses)
    return [p + PROMPT_RESPONSE_SEPARATOR + r for p, r in zip(prompts, responses)]


class ClassifierInputs(NamedTuple):
    """A classifier's token ids of each (prompt, response), and whether each response had to be cut."""

    input_ids: list[list[int]]
    response_cut: list[bool]


def classifier_input_ids(
    tokenizer: Any, text: TextField, prompts: Sequence[str], responses: Sequence[str], max_length: int | None,
) -> ClassifierInputs:
    """What a sequence classifier reads of each (prompt, response), at most ``max_length`` tokens with its special
    tokens: the one encoding of reward-model training, ``lit-rlhf-rm predict`` and ``ClassifierReward`` in PPO.

    ``text="prompt+response"``: prompt + newline + response, tokenized as one text, so that a classifier reads
    the tokens it would read of the joined string (``tokenizer(prompt + "\\n" + response)`` when nothing is cut).
    The response's tokens are kept whole and the prompt's cut from their start, so that the tokens the classifier
    reads always include what is being judged (cutting the joined text on the right scores every response after
    a long prompt the same). A response longer than the limit on its own is cut from its end, the prompt then
    dropped. ``text="response"``: the response alone, cut from its end.

    A prompt that already begins with the special tokens the tokenizer puts first (a rollout's query decoded with
    its ``<s>``) does not get them twice.
    """
    first, last = special_tokens_around(tokenizer)
    room = None if max_length is None else max(max_length - len(first) - len(last), 0)
    if text == "prompt+response":
        tokens, starts = joined_tokens(tokenizer, prompts, responses)
        n = len(first)  # the leading special tokens a decoded query may already hold
        doubled = [bool(first) and row[:n] == first for row in tokens]
        tokens = [row[n:] if twice else row for row, twice in zip(tokens, doubled)]
        starts = [start - n if twice else start for start, twice in zip(starts, doubled)]
    else:
        # verbose=False: the long texts are cut below, so the tokenizer's warning about its limit does not apply
        tokens = tokenizer(list(responses), add_special_tokens=False, verbose=False).input_ids
        starts = [0] * len(tokens)
    ids, cut = [], []
    for row, start in zip(tokens, starts):
        c, r = row[:start], row[start:]
        if room is not None and len(c) + len(r) > room:
            c = c[len(c) + len(r) - room:] if len(r) < room else []  # the prompt's start goes first
            cut.append(len(r) > room)
            r = r[:room]
        else:
            cut.append(False)
        ids.append(first + c + r + last)
    return ClassifierInputs(ids, cut)


def joined_tokens(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
) -> tuple[list[list[int]], list[int]]:
    """Each prompt + newline + response tokenized as one text (no special tokens added), and the index of its
    response's first token.

    One text, not two: tokenized alone, a response may become other tokens (SentencePiece tokenizers, as T5's,
    Llama's or DeBERTa-v3's, start a text with ``▁``: ``▁kind`` where the joined text has ``k``, ``ind``), which a
    classifier trained on joined texts never read. A fast tokenizer's character offsets tell where the response
    starts: its first token is the first one holding a character of the response (a token across the newline
    belongs to the response, which is kept whole). A slow (Python) tokenizer has no offsets: the response then
    starts at the first token where the joined text's tokens and the prompt + newline's own differ.
    """
    contexts = [p + PROMPT_RESPONSE_SEPARATOR for p in prompts]
    texts = [c + r for c, r in zip(contexts, responses)]
    # verbose=False: long texts are cut by the caller, so the tokenizer's warning about its limit does not apply
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        starts = [next((i for i, (start, end) in enumerate(offsets) if end > len(ctx) or start >= len(ctx)),
                       len(offsets))
                  for ctx, offsets in zip(contexts, encoded["offset_mapping"])]
        return encoded["input_ids"], starts
    joined = tokenizer(texts, add_special_tokens=False, verbose=False).input_ids
    alone = tokenizer(contexts, add_special_tokens=False, verbose=False).input_ids
    starts = [next((i for i, (a, b) in enumerate(zip(both, own)) if a != b), min(len(both), len(own)))
              for both, own in zip(joined, alone)]
    return joined, starts


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids the tokenizer puts before a text, ids it puts after): ``([<s>], [</s>])`` for RoBERTa, ``([], [</s>])``
    for T5, ``([<s>], [])`` for Llama, ``([], [])`` for GPT-2. Read off one encoded probe word, since transformers'
    tokenizers no longer share one method that adds them to given ids."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
    if not plain or at is None:
        raise ValueError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens ({full} for 'a', "
                         f"{plain} without them)")
    return full[:at], full[at + len(plain):]


def _check_choice(value: Any, flag: str, choices: Sequence[Any]) -> None:
    # Literal annotations are enforced by LightningCLI, not when a reward is built in Python.
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


class ClassifierReward(Reward):
    """Logit or probability of one label of a Hugging Face sequence classifier.

    The seed recipe rewards the ``nothate`` logit of Facebook's RoBERTa hate-speech classifier. The classifier
    is loaded on first use (or by ``setup()`` / ``to()``), in eval mode, with gradients off.
    """

    def __init__(
        self,
        model_name: str = "facebook/roberta-hate-speech-dynabench-r4-target",
        label: str = "nothate",
        output: Literal["logit", "probability"] = "logit",
        batch_size: int = 32,
        max_length: int = 512,
        text: TextField = "response",
        device: str | None = None,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
    ) -> None:
        """
        Args:
            model_name: Hugging Face hub name or local path of a sequence-classification model and its tokenizer.
            label: Name of the label whose score is the reward, as in the model's ``config.id2label``
                (exact match first, then case-insensitive).
            output: ``logit``: the raw logit of ``label`` (unbounded, the seed recipe); ``probability``: its
                softmax probability in [0, 1].
            batch_size: Texts per classifier forward pass.
            max_length: The most tokens the classifier reads (at most its own limit). With ``prompt+response`` the
                response is kept whole and the prompt cut from its start; a response longer than this alone is cut
                from its end (``classifier_input_ids``).
            text: What the classifier reads: the ``response`` alone, or ``prompt+response`` joined by a newline.
            device: Where the classifier runs. None: on the device the reward is moved to (the training
                module's). Set e.g. ``cpu`` to keep a large classifier off the accelerator; scores are still
                returned on the module's device.
            dtype: The classifier's weight dtype once placed on its device. None: the training module's
                ``model.dtype`` (as resolved: bfloat16 on a CUDA device with bfloat16 under ``auto``, float32 on a
                CPU); ``auto``: that rule on the classifier's own device; or a dtype. Scores are float32 either way.
        """
        super().__init__()
        _check_choice(dtype, self.flag("dtype"), (None, "auto", "float32", "bfloat16", "float16"))
        _check_choice(output, self.flag("output"), ("logit", "probability"))
        _check_choice(text, self.flag("text"), ("response", "prompt+response"))
        if batch_size < 1:
            raise ValueError(f"{self.flag('batch_size')} must be at least 1, got {batch_size}.")
        if max_length < 1:
            raise ValueError(f"{self.flag('max_length')} must be at least 1, got {max_length}.")
        self.model_name = model_name
        self.label = label
        self.output = output
        self.batch_size = batch_size
        self.max_length = max_length
        self.text = text
        self.pinned_device = None if device is None else torch.device(device)
        self.model_id = model_name
        self.dtype, self.followed_dtype = dtype, "float32"
        self.label_index: int | None = None
        self.tokenizer: Any = None
        self.model: Any = None

    @property
    def name(self) -> str:
        return f"classifier_{self.label}"

    def describe(self) -> str:
        return f"{self.output} of label '{self.label}' from {self.model_name} (reads the {self.text})"

    @property
    def model_device(self) -> torch.device:
        """Where the classifier runs: the ``device`` argument if given, else the reward's device."""
        return self.pinned_device if self.pinned_device is not None else self.device

    def setup(self) -> None:
        if self.model is not None:
            return
        # Imported here: transformers is slow to import and not every run uses a classifier.
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lit_rlhf.models import ensure_pad_token
        from lit_rlhf.models import position_limit

        tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        model = AutoModelForSequenceClassification.from_pretrained(self.model_name)
        self.label_index = find_label(model.config.id2label, self.label, self.flag("label"))
        if self.output == "probability" and model.config.num_labels < 2:
            raise ValueError(
                f"{self.flag('output')} probability needs a classifier with at least two labels; {self.model_name} "
                f"has {model.config.num_labels}. Use {self.flag('output')} logit."
            )
        limit = position_limit(model.config, tokenizer)
        if limit is not None and self.max_length > limit:
            raise ValueError(
                f"{self.flag('max_length')} is {self.max_length} but {self.model_name} reads at most {limit} tokens; "
                f"set {self.flag('max_length')} to {limit} or less."
            )
        if tokenizer.pad_token is None:
            # Decoder-style classifiers (GPT-2...) have no pad token; they find each text's last token through
            # config.pad_token_id, so it must be set along with the tokenizer's.
            ensure_pad_token(tokenizer, f"{self.flag('model_name')}={self.model_name!r}")
            model.config.pad_token_id = tokenizer.pad_token_id
        model.eval()  # no dropout: the same text always gets the same reward
        model.requires_grad_(False)
        self.tokenizer, self.model = tokenizer, model.to(self.model_device)

    def to(self, device: str | torch.device) -> "ClassifierReward":
        super().to(device)
        self.model.to(self.model_device, dtype=getattr(torch, self.weight_dtype()))
        return self

    def follow_dtype(self, dtype: str) -> None:
        """The training module's resolved weight dtype, used when ``dtype`` is None (from the next :meth:`to`)."""
        self.followed_dtype = dtype

    def weight_dtype(self) -> str:
        """The classifier's weight dtype on its device (``dtype``, resolved; None: the followed one)."""
        from lit_rlhf.settings import resolve_dtype

        if self.dtype is None:
            return self.followed_dtype
        return resolve_dtype(self.dtype, self.model_device, flag=self.flag("dtype"))[0]

    def compute(self, prompts: list[str], responses: list[str], references: list[str] | None) -> torch.Tensor:
        step = self.batch_size
        scores = [self._score_batch(prompts[i : i + step], responses[i : i + step])
                  for i in range(0, len(responses), step)]
        return torch.cat(scores) if scores else torch.empty(0)

    def _score_batch(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        ids = classifier_input_ids(self.tokenizer, self.text, prompts, responses, self.max_length).input_ids
        encoded = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.model_device)
        logits = self.model(**encoded).logits.float()  # [B, num_labels]
        if self.output == "probability":
            return logits.softmax(dim=-1)[:, self.label_index]
        return logits[:, self.label_index]


def find_label(id2label: dict[Any, str], label: str, flag: str = "label") -> int:
    """Index of ``label`` in a config's ``id2label``: exact match first, then a unique case-insensitive one
    (``flag``: how the user set it, for the error)."""
    exact = [int(i) for i, name in id2label.items() if name == label]
    folded = [int(i) for i, name in id2label.items() if name.lower() == label.lower()]
    if exact:
        return exact[0]
    if len(folded) == 1:
        return folded[0]
    labels = [id2label[i] for i in sorted(id2label, key=int)]
    raise ValueError(f"{flag} {label!r} is not a label of this classifier; its labels are {labels}.")


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
        _check_choice(text, self.flag("text"), ("response", "prompt+response"))
        _check_choice(method, self.flag("method"), ("exact", "clamped"))
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


class ReferenceSimilarityReward(Reward):
    """ROUGE of each response against its reference (e.g. the reference summary), in [0, 1].

    Added to a toxicity reward, it keeps the policy from trading summary quality for a higher toxicity score.
    Needs ``references`` in each call. Tokenisation is torchmetrics' default (lowercased alphanumeric words),
    without stemming, so it needs neither nltk nor network.
    """

    def __init__(
        self,
        rouge_key: Literal["rouge1", "rouge2", "rougeL"] = "rouge1",
        measure: Literal["fmeasure", "precision", "recall"] = "fmeasure",
    ) -> None:
        """
        Args:
            rouge_key: ``rouge1``: unigram overlap; ``rouge2``: bigram overlap; ``rougeL``: longest common
                subsequence.
            measure: ``fmeasure`` (F1), ``precision`` (share of the response found in the reference) or
                ``recall`` (share of the reference found in the response).
        """
        super().__init__()
        _check_choice(rouge_key, self.flag("rouge_key"), ("rouge1", "rouge2", "rougeL"))
        _check_choice(measure, self.flag("measure"), ("fmeasure", "precision", "recall"))
        self.rouge_key = rouge_key
        self.measure = measure

    @property
    def name(self) -> str:
        return f"{self.rouge_key}_{self.measure}"

    def needs_references(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self.rouge_key} {self.measure} of the response against the reference"

    def compute(self, prompts: list[str], responses: list[str], references: list[str] | None) -> torch.Tensor:
        if references is None or any(r is None for r in references):
            raise ValueError(
                f"{type(self).__name__} compares responses with references, and these prompts have none: set "
                "data.reference_column (or call it with `references=`)."
            )
        from torchmetrics.functional.text.rouge import rouge_score

        key = f"{self.rouge_key}_{self.measure}"
        # rouge_score averages over a batch, so each pair is scored on its own.
        scores = [rouge_score(r, ref, rouge_keys=self.rouge_key)[key] for r, ref in zip(responses, references)]
        return torch.stack(scores).float() if scores else torch.empty(0)


class CompositeReward(Reward):
    """Weighted sum of rewards: ``Σ_i w_i · reward_i``. ``last_components`` keeps each part of the last call."""

    def __init__(self, rewards: list[Reward], weights: list[float] | None = None) -> None:
        """
        Args:
            rewards: The rewards to add up (each given as ``class_path`` + ``init_args`` in YAML).
            weights: One weight per reward; None: all 1.
        """
        super().__init__()
        if not rewards:
            raise ValueError(f"{self.flag('rewards')} must hold at least one reward.")
        if weights is None:
            weights = [1.0] * len(rewards)
        if len(weights) != len(rewards):
            raise ValueError(f"{self.flag('weights')} has {len(weights)} values for {len(rewards)} rewards "
                             f"({self.flag('rewards')}); give one per reward.")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"{self.flag('weights')} must be finite, got {weights}.")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]
        self.names = _unique_names([r.name for r in self.rewards])
        self.setting = self.setting  # tells each part where it is set
        self.last_components: dict[str, torch.Tensor] = {}
        """Unweighted scores of each part in the last call, by part name (for logging)."""

    @property
    def name(self) -> str:
        return "composite"

    @property
    def setting(self) -> str:
        return self.__dict__.get("_setting", Reward.setting)

    @setting.setter
    def setting(self, value: str) -> None:
        # each part's arguments are set under this one's: --model.reward.rewards[1].max_length
        self._setting = value
        for i, reward in enumerate(self.rewards):
            reward.setting = f"{value}.rewards[{i}]"

    def describe(self) -> str:
        return " + ".join(f"{w:g} × [{r.describe()}]" for w, r in zip(self.weights, self.rewards))

    takes_columns = True

    def uses_model(self, model_id: str | None) -> bool:
        return any(r.uses_model(model_id) for r in self.rewards)

    def required_columns(self) -> list[str]:
        return list(dict.fromkeys(c for r in self.rewards for c in r.required_columns()))

    def needs_references(self) -> bool:
        return any(r.needs_references() for r in self.rewards)

    def setup(self) -> None:
        for reward in self.rewards:
            reward.setup()

    def to(self, device: str | torch.device) -> "CompositeReward":
        for reward in self.rewards:
            reward.to(device)
        return super().to(device)

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> torch.Tensor:
        total = super().__call__(prompts, responses, references, columns)
        # The parts were made inside inference mode; plain copies can be used freely by loggers.
        self.last_components = {name: part.clone() for name, part in self.last_components.items()}
        return total

    def compute(
        self, prompts: list[str], responses: list[str], references: list[str] | None,
        columns: dict[str, list[Any]] | None = None,
    ) -> torch.Tensor:
        # Each part goes through its own __call__, so its output is checked (and blamed) on its own.
        parts = [reward(prompts, responses, references=references, columns=columns).to(self.device)
                 for reward in self.rewards]
        self.last_components = dict(zip(self.names, parts))
        return sum(w * part for w, part in zip(self.weights, parts))


def _unique_names(names: list[str]) -> list[str]:
    """Suffix repeated names with their position (``classifier_nothate``, ``classifier_nothate_1``)."""
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(names):
        out.append(name if name not in seen else f"{name}_{i}")
        seen[name] = i
    return out


def check_reward_inputs(reward: Reward, columns: Sequence[str], has_references: bool,
                        first_null: Callable[[str], str | None] | None = None) -> None:
    """Raise a ValueError, naming the reward and what is missing, when the data lacks a column the reward reads
    or references the reward compares with, or (``first_null``: a column -> the id of its first row without a
    value) when some rows have no value in such a column: the reward would be handed None."""
    missing = [c for c in reward.required_columns() if c not in columns]
    if missing:
        raise ValueError(
            f"model.reward {reward.describe()} reads the column(s) {missing}, which the data lacks (its columns: "
            f"{list(columns)}); add them to the data (data.dataset, data.predict_path) or change the reward"
        )
    for column in reward.required_columns() if first_null is not None else []:
        row = first_null(column)
        if row is not None:
            raise ValueError(
                f"model.reward {reward.describe()} reads the column {column!r}, which row {row!r} of the data has no "
                "value in (null or absent); give every row one (data.dataset, data.predict_path) or drop those rows"
            )
    if reward.needs_references() and not has_references:
        raise ValueError(
            f"model.reward {reward.describe()} compares responses with references, and the data has none: set "
            f"data.reference_column to one of the data's columns {list(columns)}, or change the reward"
        )


def import_function(path: str, setting: str = "function") -> Callable[..., Any]:
    """The function named by ``module:function`` (a module on the Python path or in the current directory) or
    ``path/to/file.py:function``; errors name ``setting`` and what is wrong, in one line."""
    module_name, _, attribute = path.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"{setting}={path!r} must be 'module:function' (as my_rewards:exact_answer) or "
                         "'path/to/file.py:function'")
    try:
        module = _import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{setting}={path!r}: no module named {err.name!r} on the Python path or in the current "
                         f"directory {os.getcwd()} (or give 'path/to/file.py:function')") from err
    except FileNotFoundError as err:
        raise ValueError(f"{setting}={path!r}: no such file {module_name!r}") from err
    except Exception as err:  # the user's module failed while importing
        raise ValueError(f"{setting}={path!r}: importing {module_name!r} failed: {type(err).__name__}: {err}") from err
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        what = "has no attribute" if function is None else "has a non-callable"
        raise ValueError(f"{setting}={path!r}: module {module_name!r} {what} {attribute!r}")
    return function


def _import_module(name: str) -> Any:
    if name.endswith(".py"):
        file = os.path.abspath(os.path.expanduser(name))
        if not os.path.isfile(file):
            raise FileNotFoundError(file)
        module_name = f"lit_rlhf_user_rewards.{os.path.splitext(os.path.basename(file))[0]}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so that its functions pickle by reference
        spec.loader.exec_module(module)
        return module
    # A console script's path does not hold the current directory (python -m does): add it, last, so that a
    # user's my_rewards.py beside the config imports and never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return importlib.import_module(name)


class RewardFunctionError(ValueError):
    """A user's reward function raised: one line naming the reward, the exception and where it was raised
    (``FunctionReward(my_rewards:parse_int) raised ValueError: ... (my_rewards.py:22)``). The original exception is
    its ``__cause__``, so ``LIT_RLHF_DEBUG=1`` shows the whole traceback. A ValueError, whatever the user's code
    raised, so that the commands print it as one line as they do every user error."""

    def __init__(self, reward: str, error: BaseException, function: Callable[..., Any]) -> None:
        message = " ".join(str(error).split()) or "(no message)"
        super().__init__(f"{reward} raised {type(error).__name__}: {message} ({raised_at(error, function)})")


def raised_at(error: BaseException, function: Callable[..., Any]) -> str:
    """``file.py:line`` of the innermost frame of ``error``'s traceback in the file that defines ``function`` (the
    user's own line, not the library call inside it that raised), else of its innermost frame."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    home = getattr(getattr(function, "__code__", None), "co_filename", None)
    own = [f for f in frames if f.filename == home]
    frame = (own or frames or [None])[-1]
    return "unknown location" if frame is None else f"{os.path.basename(frame.filename)}:{frame.lineno}"


class FunctionReward(Reward):
    """A plain Python function as the reward, as TRL's ``reward_funcs``:
    ``fn(prompts, responses, **columns) -> list[float]``, one float per response.

    ``columns`` are the batch's source columns by name (one value per response: e.g. ``answer``); a function with
    ``**kwargs`` gets them all, one without gets those it names. A rule-based reward in a few lines::

        def exact_answer(prompts, responses, answer, **kwargs):
            return [1.0 if r.strip().startswith(str(a)) else 0.0 for r, a in zip(responses, answer)]

    used as ``reward: {class_path: lit_rlhf.rewards.FunctionReward, init_args: {function: my_rewards:exact_answer}}``,
    alone or inside ``CompositeReward``.
    """

    takes_columns = True

    def __init__(self, function: str, columns: list[str] | None = None, name: str | None = None) -> None:
        """
        Args:
            function: Import path of the function: ``module:function`` (a module on the Python path or in the
                current directory, e.g. ``my_rewards:exact_answer``) or ``path/to/file.py:function``.
            columns: The data columns the function needs, checked against the data before the first step.
                None: the keyword parameters it declares without a default (after ``prompts, responses``).
            name: The reward's name in metrics (``env/reward/<name>_mean`` inside a ``CompositeReward``); None:
                the function's name.
        """
        super().__init__()
        self.function = function
        self.fn = import_function(function, self.flag("function"))
        self._signature = _function_parameters(self.fn, function, self.flag("function"))
        self.columns = list(columns) if columns is not None else self._signature[1]
        self._name = name

    def __getstate__(self) -> dict[str, Any]:
        # the function travels by its import path (a file-loaded module is not importable by name elsewhere)
        return {k: v for k, v in self.__dict__.items() if k != "fn"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fn = import_function(self.function, self.flag("function"))

    @property
    def name(self) -> str:
        return self._name or getattr(self.fn, "__name__", "function")

    def describe(self) -> str:
        return f"FunctionReward({self.function})"

    def required_columns(self) -> list[str]:
        return list(self.columns)

    def compute(
        self, prompts: list[str], responses: list[str], references: list[str] | None,
        columns: dict[str, list[Any]] | None = None,
    ) -> torch.Tensor:
        columns = columns or {}
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise ValueError(f"{self.describe()} reads the column(s) {missing}, which the batch lacks (its columns: "
                             f"{sorted(columns)}); add them to the data or change the reward")
        takes_all, named = self._signature[0], self._signature[2]
        kwargs = columns if takes_all else {k: v for k, v in columns.items() if k in named}
        try:
            out = self.fn(prompts, responses, **kwargs)
        except Exception as err:  # any type: the user's code failed; say whose code and where, in one line
            raise RewardFunctionError(self.describe(), err, self.fn) from err
        return self._as_scores(out, len(responses))

    def _as_scores(self, out: Any, n: int) -> torch.Tensor:
        """The function's return value as float64 [n]; a clear error otherwise."""
        if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__"):
            raise TypeError(f"{self.describe()} returned {type(out).__name__}; return a list of floats, one per response")
        if len(out) != n:
            raise ValueError(f"{self.describe()} returned {len(out)} scores for {n} responses; return one per response")
        try:
            scores = torch.as_tensor([float(x) for x in out], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{self.describe()} returned a value that is not a number ({err})") from err
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteRewardError(f"{self.describe()} returned non-finite scores at positions {bad}: "
                                       f"{[float(scores[i]) for i in bad[:10]]}")
        return scores


def _function_parameters(fn: Callable[..., Any], path: str, flag: str) -> tuple[bool, list[str], set[str]]:
    """(takes ``**kwargs``, the columns it needs (keyword parameters without default), every parameter name)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True, [], set()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise ValueError(f"{flag}={path!r} must take (prompts, responses, **columns); its "
                         f"signature is {inspect.signature(fn)}")
    rest = [p for p in parameters[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_all = any(p.kind == p.VAR_KEYWORD for p in parameters)
    needed = [p.name for p in rest if p.default is p.empty]
    return takes_all, needed, {p.name for p in rest}
