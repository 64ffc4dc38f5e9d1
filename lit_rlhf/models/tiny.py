"""Embedded offline models: a tiny T5 and a tiny GPT-2 with tokenizers trained on the bundled DialogSum.

They are saved with ``save_pretrained`` and loaded with ``from_pretrained``, exactly like a hub model, so
the embedded default exercises the code path a hub model takes, with no network and in seconds on a CPU.
``resolve_model_path("embedded:tiny-t5")`` builds one once into a cache folder and returns its path; any
other name is returned unchanged for ``from_pretrained`` to load.

The tiny models are random (untrained): they generate fluent-looking token soup, which is all the training
loop, the tests and the benchmarks need from them. ``SHIPPED`` models are trained ones inside the package
(``embedded:summarizer``, a T5, ``embedded:arithmetic`` and ``-tools``, GPT-2s; by ``lit-rlhf-sft``, see PROVENANCE.md).
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from lit_rlhf.runtime import atomic_directory

EMBEDDED_PREFIX = "embedded:"
"""Model names starting with this prefix name an embedded model, built locally rather than downloaded."""

SPEAKER_TAGS: tuple[str, ...] = tuple(f"#Person{i}#" for i in range(1, 10))
"""DialogSum's speaker tags, kept whole as single tokens (the data uses #Person1# to #Person7#)."""

MARKER_FILE = "lit_rlhf_build.json"
"""Written last into a built model folder: a folder without it was never finished."""

BUILD_VERSION = "1"
"""Bump when the build changes (tokenizer, architecture, initialisation) so cached copies are rebuilt."""

CACHE_ENV = "LIT_RLHF_CACHE"
"""Environment variable naming the cache root for embedded models (default ``~/.cache/lit_rlhf``)."""

# Real T5 reserves these three ids; transformers' T5 code relies on pad = decoder start = 0 and eos = 1.
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
_GPT2_EOS = "<|endoftext|>"
# SentencePiece's byte-fallback pieces: any character missing from the vocabulary is spelled in UTF-8 bytes,
# so every text encodes without <unk> and decodes back to itself.
_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
_SPEAKER_TAG_PATTERN = re.compile(r"#Person\d#")


def _dialogsum_train_texts() -> list[str]:
    """Dialogues and summaries of the bundled DialogSum train split, in file order."""
    source = resources.files("lit_rlhf.assets.dialogsum").joinpath("dialogsum.train.jsonl.gz")
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines]
    # The speaker tags become added tokens after training; removed here so that the trainer does not spend
    # merges on pieces such as "#Person" that the finished tokenizer never produces.
    return [_SPEAKER_TAG_PATTERN.sub("", row[key]) for row in rows for key in ("dialogue", "summary")]


def _train_t5_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """SentencePiece-like BPE: Metaspace word boundaries, byte fallback, ``</s>`` appended to every text."""
    trained_size = vocab_size - len(_BYTE_TOKENS) - len(SPEAKER_TAGS)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # "first": only the start of the text gets the "▁" word marker, not each piece after an added token,
    # so "#Person1#: Hi" keeps ":" glued to the tag as written (as transformers' non-legacy T5/Llama do).
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=trained_size, special_tokens=list(_T5_SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)

    # The byte pieces are plain vocabulary entries (not special tokens, which decoding with
    # skip_special_tokens would drop), appended after the trained ones; the trainer has no option for them.
    state = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    for piece in _BYTE_TOKENS:
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    # T5 ends every encoder input with </s>, as the hub T5 tokenizers do.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tokenizer


def _train_gpt2_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """GPT-2's byte-level BPE: every byte is in the alphabet, so any text encodes and round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPEAKER_TAGS),
        special_tokens=[_GPT2_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def build_tokenizer(vocab_size: int = 2000, kind: Literal["t5", "gpt2"] = "t5") -> PreTrainedTokenizerFast:
    """Train a tokenizer on the bundled DialogSum train split (dialogues and summaries), deterministically.

    Args:
        vocab_size: Size of the whole vocabulary, special tokens, byte pieces and speaker tags included, so
            ``len(tokenizer) == vocab_size``.
        kind: ``"t5"``: SentencePiece-like BPE with T5's special ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2),
            byte fallback for unseen characters and ``</s>`` appended to every encoded text, right padding.
            ``"gpt2"``: GPT-2's byte-level BPE with ``<|endoftext|>`` as bos, eos and unk; as GPT-2 has no pad
            token, the pad token is set to eos, and padding is on the left, as batched generation with a
            decoder-only model needs.

    The speaker tags ``#Person1#`` .. ``#Person9#`` are added (not special) tokens: each is one token and
    decoding keeps it. Training takes about a second on the full split; the result is the same every time.
    """
    if kind not in ("t5", "gpt2"):
        raise ValueError(f"kind must be 't5' or 'gpt2', got {kind!r}")
    minimum = len(_BYTE_TOKENS) + len(_T5_SPECIAL_TOKENS) + len(SPEAKER_TAGS) + 100
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least {minimum} (256 byte pieces, special "
            "tokens and speaker tags, plus 100 learned pieces)"
        )
    texts = _dialogsum_train_texts()
    if kind == "t5":
        tokenizer = _train_t5_tokenizer(texts, vocab_size)
        special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        padding_side = "right"
    else:
        tokenizer = _train_gpt2_tokenizer(texts, vocab_size)
        special = {"bos_token": _GPT2_EOS, "eos_token": _GPT2_EOS, "unk_token": _GPT2_EOS, "pad_token": _GPT2_EOS}
        padding_side = "left"
    # Added after training, in a fixed order, so their ids are the last ones and the same on every build.
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in SPEAKER_TAGS])
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size}: the training text only supports {tokenizer.get_vocab_size()} tokens; "
            "choose a smaller vocab_size"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=1024,
        padding_side=padding_side,
        # transformers' clean-up would turn DialogSum's "I ' m" into "I'm": decoding must give the text back.
        clean_up_tokenization_spaces=False,
        # what the models take (older transformers' default also returns token_type_ids, which generate refuses)
        model_input_names=["input_ids", "attention_mask"],
        **special,
    )


def _read_marker(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, MARKER_FILE), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def build_atomically(path: str, build: dict[str, Any], write: Callable[[str], None]) -> str:
    """Run ``write(folder)`` into a temporary sibling of ``path``, add the marker, then rename it into place.

    Two processes (e.g. DDP ranks) may build the same ``path`` at once: both write private copies, the
    first rename wins and the other process discards its copy. ``build`` describes what is built; a
    complete folder with the same description is reused, one with another description is an error.
    """
    path = os.path.abspath(os.fspath(path))
    build = json.loads(json.dumps(build))  # the form it takes once read back from the marker
    existing = _read_marker(path)
    if existing is not None:
        if existing.get("build") != build:
            raise FileExistsError(
                f"{path} already holds another build ({existing.get('build')}); remove it or choose another path"
            )
        return path
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{path} exists and is not a finished build (no {MARKER_FILE}); remove it")
    def write_with_marker(folder: Path) -> None:
        write(str(folder))
        marker = {"build": build, "libraries": {"transformers": transformers.__version__,
                                                "tokenizers": tokenizers.__version__, "torch": torch.__version__}}
        (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2), encoding="utf-8")

    if not atomic_directory(path, write_with_marker, replace=False):
        # another process finished the same build first: it must be this build
        winner = _read_marker(path)
        if winner is None or winner.get("build") != build:
            raise FileExistsError(f"{path} was built by another process with another description ({winner})")
    return path


def _tiny_t5_model(
    tokenizer: PreTrainedTokenizerFast, d_model: int, d_ff: int, num_layers: int, decoder_layers: int,
    num_heads: int, d_kv: int, seed: int, tie_embeddings: bool,
) -> T5ForConditionalGeneration:
    """The random T5 of :func:`build_tiny_t5`, its weights fixed by ``seed`` alone."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=num_layers,
        num_decoder_layers=decoder_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        # FLAN-T5's configs say False; transformers 5 reads it as "do not scale decoder outputs".
        tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: the seed fixes these weights without changing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
        if not tie_embeddings:
            # A T5 built from a config ties lm_head to the embedding; FLAN-T5 has its own. std d_model^-0.5
            # keeps the untrained logits of unit scale, so sampling is not close to greedy from the start.
            model.lm_head.weight = torch.nn.Parameter(torch.randn(len(tokenizer), d_model) * d_model**-0.5)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model


def build_tiny_t5(
    path: str,
    vocab_size: int = 2000,
    d_model: int = 64,
    d_ff: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    d_kv: int = 16,
    seed: int = 0,
    num_decoder_layers: int | None = None,
    tie_embeddings: bool = False,
) -> str:
    """Build a tiny FLAN-T5-like ``T5ForConditionalGeneration`` and its tokenizer into ``path``; return it.

    Same architecture family as FLAN-T5 (gated-GELU feed-forward, relative attention, untied ``lm_head`` by
    default), with ``num_layers`` encoder and ``num_decoder_layers`` (default: ``num_layers``) decoder blocks.
    ``tie_embeddings=True`` makes ``lm_head`` the shared embedding (T5's original tying, decoder output scaled
    by ``d_model ** -0.5``): a model trained from scratch then gets copying from the dialogue for free, since
    an attended input token's embedding is also its output direction. ``decoder_start_token_id`` = pad = 0,
    eos = 1. The build is deterministic and atomic: if ``path`` already holds the same finished build, it is
    returned as is.
    Loading it prints transformers' note that ``shared`` and ``lm_head`` are both stored and not tied;
    FLAN-T5 checkpoints load the same way.
    """
    build = {"builder": "build_tiny_t5", "version": BUILD_VERSION, "vocab_size": vocab_size,
             "d_model": d_model, "d_ff": d_ff, "num_layers": num_layers, "num_heads": num_heads,
             "d_kv": d_kv, "seed": seed}
    if num_decoder_layers is not None or tie_embeddings:  # older builds keep their folder names' meaning
        build.update(num_decoder_layers=num_decoder_layers, tie_embeddings=tie_embeddings)
    decoder_layers = num_layers if num_decoder_layers is None else num_decoder_layers

    def write(folder: str) -> None:
        tokenizer = build_tokenizer(vocab_size, kind="t5")
        model = _tiny_t5_model(tokenizer, d_model, d_ff, num_layers, decoder_layers, num_heads, d_kv, seed,
                               tie_embeddings)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_atomically(path, build, write)


def build_tiny_gpt2(
    path: str,
    vocab_size: int = 2000,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 1024,
    seed: int = 0,
) -> str:
    """Build a tiny ``GPT2LMHeadModel`` and its byte-level tokenizer into ``path``; return it.

    ``n_positions`` = 1024 leaves room for a DialogSum prompt (~300 tokens) plus a 400-token response. The
    tokenizer's pad token is its eos token (GPT-2 has none) and it pads on the left. The build is
    deterministic and atomic: if ``path`` already holds the same finished build, it is returned as is.
    """
    build = {"builder": "build_tiny_gpt2", "version": BUILD_VERSION, "vocab_size": vocab_size,
             "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "n_positions": n_positions, "seed": seed}

    def write(folder: str) -> None:
        save_gpt2(folder, build_tokenizer(vocab_size, kind="gpt2"), seed, n_positions=n_positions, n_embd=n_embd,
                  n_layer=n_layer, n_head=n_head)

    return build_atomically(path, build, write)


def save_gpt2(folder: str, tokenizer: Any, seed: int, **architecture: Any) -> None:
    """A ``GPT2LMHeadModel`` of ``architecture`` with weights drawn from ``seed`` (the global RNG untouched) and
    ``tokenizer`` (eos = bos = pad), saved into ``folder`` with ``save_pretrained``."""
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    # pad = eos as in the tokenizer, so generate() does not warn that it had to pick a pad id itself.
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


SUMMARIZER_ARCHITECTURE: dict[str, Any] = {"vocab_size": 4000, "d_model": 256, "d_ff": 768, "num_layers": 2,
                                           "num_heads": 4, "d_kv": 64, "tie_embeddings": True}
"""The embedded summarizer's T5 shape (about 5M parameters, 20 MB in float32), lm_head tied to the embedding."""


def build_summarizer_untrained(path: str) -> str:
    """The embedded summarizer's architecture and tokenizer with random weights: the start of its training
    (``configs/sft_embedded.yaml``)."""
    return build_tiny_t5(path, **SUMMARIZER_ARCHITECTURE)


EMBEDDED: dict[str, Callable[[str], str]] = {
    "embedded:tiny-t5": build_tiny_t5,
    "embedded:tiny-gpt2": build_tiny_gpt2,
    "embedded:summarizer-untrained": build_summarizer_untrained,
    "embedded:arithmetic-untrained": lambda path: importlib.import_module(
        "lit_rlhf.models.arithmetic").build_arithmetic_untrained(path),
    "embedded:arithmetic-tools-untrained": lambda path: importlib.import_module(
        "lit_rlhf.models.arithmetic").build_tool_untrained(path),
}
"""Embedded model names and the builders that write them into a given folder (the arithmetic model's lives in
lit_rlhf.models.arithmetic, which builds on this file's helpers)."""


SHIPPED: dict[str, tuple[str, str]] = {
    "embedded:summarizer": ("summarizer", "configs/sft_embedded.yaml"),
    "embedded:arithmetic": ("arithmetic", "configs/sft_arithmetic.yaml"),
    "embedded:arithmetic-tools": ("arithmetic_tools", "configs/sft_arithmetic_tools.yaml"),
}
"""Trained models shipped in the package: name -> (folder in lit_rlhf/assets (see its PROVENANCE.md), its config)."""


def shipped_model_path(name: str = "embedded:summarizer") -> str:
    """Folder of a shipped model (a ``save_pretrained`` model and its tokenizer) inside the package."""
    folder, config = SHIPPED[name]
    path = os.fspath(resources.files("lit_rlhf.assets").joinpath(folder))
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{name} is not in this installation ({path} has no model.safetensors): train it "
                                f"with `lit-rlhf-sft fit --config {config}` and copy the run's exported `model` "
                                "folder's files there, or give that folder as model_name")
    return path


def default_cache_dir() -> str:
    """``$LIT_RLHF_CACHE`` if set, else ``~/.cache/lit_rlhf``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lit_rlhf")


def looks_like_local_path(name: str) -> bool:
    """Hub ids are "name" or "owner/name"; an absolute path, one starting with "." or "~", one with more than
    one "/", or anything that exists here is meant as a path on this machine."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    """Path or hub name to give ``from_pretrained`` for the model called ``name``.

    An embedded name (``"embedded:tiny-t5"``, ``"embedded:tiny-gpt2"``) is built once into
    ``cache_dir`` (default: ``default_cache_dir()``), in a folder named with ``BUILD_VERSION`` so that a
    changed build is rebuilt rather than reused, and its local path is returned. Any other name (a hub
    model such as ``"google/flan-t5-base"`` or a local folder) is returned unchanged.
    """
    if not name.startswith(EMBEDDED_PREFIX):
        if looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
            # fail at once: transformers would take it for a hub id and retry the network for half a minute
            raise ValueError(f"{name!r} names a local folder that does not exist (expected a folder written by "
                             "save_pretrained; hub names look like 'owner/name')")
        return os.path.expanduser(name)
    if name in SHIPPED:
        return shipped_model_path(name)
    if name not in EMBEDDED:
        raise ValueError(f"{name!r} is not an embedded model; choose one of {sorted([*EMBEDDED, *SHIPPED])}")
    root = cache_dir if cache_dir is not None else default_cache_dir()
    folder = os.path.join(root, f"{name[len(EMBEDDED_PREFIX):]}-v{BUILD_VERSION}")
    return EMBEDDED[name](folder)
