"""Rewards from a Hugging Face sequence classifier: :class:`ClassifierReward`, and the one encoding of what a
classifier reads of each (prompt, response) (:func:`classifier_input_ids`), shared with reward-model training."""

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch

from lit_rlhf.rewards.base import PROMPT_RESPONSE_SEPARATOR, Reward, TextField, check_choice


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
        check_choice(dtype, self.flag("dtype"), (None, "auto", "float32", "bfloat16", "float16"))
        check_choice(output, self.flag("output"), ("logit", "probability"))
        check_choice(text, self.flag("text"), ("response", "prompt+response"))
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

        from lit_rlhf.models import ensure_pad_token, position_limit

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
