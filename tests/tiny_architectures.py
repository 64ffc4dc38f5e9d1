"""Tiny random models of the architectures users bring, built from configs in milliseconds, offline.

Each is saved with ``save_pretrained`` beside an embedded tiny tokenizer (``lit_rlhf.models.tiny``: the GPT-2 one for
decoder-only models, the T5 one for encoder-decoders), with the config's vocabulary set to match, so that
``Policy(path)`` loads it exactly as it loads a hub model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import transformers as tf
from transformers import AutoTokenizer, GenerationConfig

from lit_rlhf.models import resolve_model_path

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}
"""A decoder-only model of two layers, grouped-query attention (4 query heads, 2 key/value heads)."""
SMALL_SEQ2SEQ = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                 "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                 "max_position_embeddings": 512}
"""BART-family sizes."""


def _causal(config_class: Callable[..., Any], **extra: Any) -> Callable[[int, int], Any]:
    def make(vocab: int, eos: int) -> Any:
        return config_class(**{**SMALL, **extra}, vocab_size=vocab, bos_token_id=eos, eos_token_id=eos,
                            pad_token_id=eos)
    return make


def _bart_like(config_class: Callable[..., Any], **extra: Any) -> Callable[[int, int], Any]:
    # T5 tokenizer ids: <pad> 0, </s> 1; BART's own defaults (eos 2, forced_eos 2) would name <unk> here
    def make(vocab: int, eos: int) -> Any:
        return config_class(**{**SMALL_SEQ2SEQ, **extra}, vocab_size=vocab, pad_token_id=0, eos_token_id=eos,
                            forced_eos_token_id=eos)
    return make


CONFIGS: dict[str, Callable[[int, int], Any]] = {
    "llama": _causal(tf.LlamaConfig),
    "qwen2": _causal(tf.Qwen2Config),
    "qwen3": _causal(tf.Qwen3Config, head_dim=8),
    # the window (8) is shorter than prompt + response: the cached decode must mask what a full cache holds
    "mistral": _causal(tf.MistralConfig, sliding_window=8),
    "gemma2": _causal(tf.Gemma2Config, head_dim=8, sliding_window=8, query_pre_attn_scalar=8),
    "phi3": _causal(tf.Phi3Config),
    "gpt_neox": lambda vocab, eos: tf.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos),
    "opt": lambda vocab, eos: tf.OPTConfig(
        vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos),
    "bart": _bart_like(tf.BartConfig, decoder_start_token_id=1, bos_token_id=0),
    # mBART-style: no decoder start token in the config (generate starts from bos), a forced first token
    "mbart": _bart_like(tf.MBartConfig, bos_token_id=0),
    "pegasus": _bart_like(tf.PegasusConfig, decoder_start_token_id=0),
    "mt5": lambda vocab, eos: tf.MT5Config(
        vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=eos,
        decoder_start_token_id=0),
}
"""Config builders of each architecture, (vocabulary size, eos id) -> config."""

SEQ2SEQ = ("bart", "mbart", "pegasus", "mt5")


def build_tiny(kind: str, path: Path, seed: int = 0, config_fields: dict[str, Any] | None = None,
               **generation: Any) -> str:
    """Write a tiny random ``kind`` model (a key of ``CONFIGS``) and its tokenizer into ``path``; returns it.
    ``config_fields``: model config fields over the builder's (e.g. dropout rates). ``generation``: fields of the
    saved ``generation_config`` (e.g. several ``eos_token_id``, a ``forced_bos_token_id``) over the ones the
    config implies."""
    embedded = "embedded:tiny-t5" if kind in SEQ2SEQ else "embedded:tiny-gpt2"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(embedded))
    config = CONFIGS[kind](len(tokenizer), tokenizer.eos_token_id)
    for name, value in (config_fields or {}).items():
        setattr(config, name, value)
    model_class = tf.AutoModelForSeq2SeqLM if kind in SEQ2SEQ else tf.AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class.from_config(config)
    tokens = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                    "decoder_start_token_id", "forced_eos_token_id")}
    model.generation_config = GenerationConfig(**{**{k: v for k, v in tokens.items() if v is not None},
                                                  **generation})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_tiny_mamba(path: Path, seed: int = 0) -> str:
    """A tiny Mamba (state-space layers, no attention): a model the cached decode loop cannot serve."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    eos = tokenizer.eos_token_id
    config = tf.MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.MambaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
