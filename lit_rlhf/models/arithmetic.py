"""The embedded arithmetic model's shape: a character tokenizer and a small GPT-2 with random weights.

``embedded:arithmetic-untrained`` is where ``configs/sft_arithmetic.yaml`` starts; ``embedded:arithmetic`` is that
recipe's result, shipped in ``lit_rlhf/assets/arithmetic`` (see its PROVENANCE.md). The tool model's likewise:
``embedded:arithmetic-tools-untrained``, ``configs/sft_arithmetic_tools.yaml``, ``embedded:arithmetic-tools`` in
``lit_rlhf/assets/arithmetic_tools``: the same scheme with role and tool-call tokens and a chat template.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lit_rlhf.models.tiny import BUILD_VERSION, build_atomically, save_gpt2

ARITHMETIC_EOS = "<|endoftext|>"
ARITHMETIC_CHARACTERS = "0123456789+-= "
"""The tokenizer's vocabulary after eos (id 0): one token per character; any other character reads as eos."""

ARITHMETIC_ARCHITECTURE: dict[str, Any] = {"n_embd": 128, "n_layer": 3, "n_head": 4, "n_positions": 32}
"""The embedded arithmetic GPT-2 (about 0.6M parameters)."""


def build_arithmetic_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of :data:`ARITHMETIC_CHARACTERS`; eos (``<|endoftext|>``, id 0) is also bos, unk
    and pad, and padding is on the left, as for GPT-2. Decoding joins the characters back without spaces."""
    return character_tokenizer(ARITHMETIC_CHARACTERS, ARITHMETIC_EOS, ARITHMETIC_ARCHITECTURE["n_positions"])


def character_tokenizer(
    characters: str, unk: str, max_length: int, special: tuple[str, ...] = (), words: tuple[str, ...] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """eos (``<|endoftext|>``, id 0, also bos and pad), one token per character of ``characters``, then ``unk``
    (when it is not eos), the ``special`` tokens and the whole ``words``; any other character reads as ``unk``.
    Padding on the left, as for GPT-2; decoding joins the characters back without spaces."""
    vocab = {ARITHMETIC_EOS: 0, **{c: i + 1 for i, c in enumerate(characters)}}
    for token in ((unk,) if unk != ARITHMETIC_EOS else ()) + special + words:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    if special or words:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (ARITHMETIC_EOS, *special)])
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in words])
    extra = {} if chat_template is None else {"chat_template": chat_template}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=max_length, padding_side="left",
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"],
        bos_token=ARITHMETIC_EOS, eos_token=ARITHMETIC_EOS, unk_token=unk, pad_token=ARITHMETIC_EOS, **extra,
    )


def build_arithmetic_untrained(path: str, seed: int = 0) -> str:
    """The embedded arithmetic model's GPT-2 (:data:`ARITHMETIC_ARCHITECTURE`) and tokenizer with random weights
    into ``path``; deterministic and atomic, as the other embedded builds."""
    return build_untrained(path, "build_arithmetic_untrained", build_arithmetic_tokenizer, ARITHMETIC_ARCHITECTURE,
                           seed)


def build_untrained(path: str, builder: str, tokenizer: Callable[[], PreTrainedTokenizerFast],
                    architecture: dict[str, Any], seed: int) -> str:
    """A GPT-2 of ``architecture`` with random weights (``seed``) and ``tokenizer()`` into ``path``, built once per
    ``builder`` name, version and settings (``build_atomically``)."""
    build = {"builder": builder, "version": BUILD_VERSION, "seed": seed, **architecture}

    def write(folder: str) -> None:
        save_gpt2(folder, tokenizer(), seed, **architecture)

    return build_atomically(path, build, write)


# ---------------------------------------------------------------------------------------------- the tool model

TOOL_CHARACTERS = "0123456789+-=() "
"""The tool model's characters (one token each): the arithmetic ones and the parentheses of a call."""
TOOL_UNK = "<unk>"
TOOL_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
"""One special token per chat role (the template writes ``<|role|>`` before each message)."""
TOOL_WORDS = ("<tool>", "</tool>", "calc")
"""Whole tokens of a tool call ``<tool>calc(12+345)</tool>`` (plain tokens: a decoded turn keeps them)."""
TOOL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""``<|user|>12+345=<|assistant|><tool>calc(12+345)</tool><|endoftext|><|tool|>357<|assistant|>357<|endoftext|>``:
each message after its role token, an assistant turn closed by eos (the token the model ends its turn with)."""
TOOL_ARCHITECTURE: dict[str, Any] = {**ARITHMETIC_ARCHITECTURE, "n_positions": 64}
"""The embedded tool model's GPT-2 (the arithmetic shape with a context of 64 tokens; about 0.6M parameters)."""


def build_tool_tokenizer() -> PreTrainedTokenizerFast:
    """The arithmetic tokenizer's scheme for tool conversations: eos (id 0, also bos and pad), one token per
    character of :data:`TOOL_CHARACTERS`, ``<unk>`` for any other character, then :data:`TOOL_ROLES` (special)
    and :data:`TOOL_WORDS` (whole tokens), and the chat template :data:`TOOL_CHAT_TEMPLATE`."""
    return character_tokenizer(TOOL_CHARACTERS, TOOL_UNK, TOOL_ARCHITECTURE["n_positions"], TOOL_ROLES, TOOL_WORDS,
                               TOOL_CHAT_TEMPLATE)


def build_tool_untrained(path: str, seed: int = 0) -> str:
    """The embedded tool model's GPT-2 (:data:`TOOL_ARCHITECTURE`) and tokenizer with random weights into
    ``path`` (``embedded:arithmetic-tools-untrained``, where ``configs/sft_arithmetic_tools.yaml`` starts)."""
    return build_untrained(path, "build_tool_untrained", build_tool_tokenizer, TOOL_ARCHITECTURE, seed)
