"""Loading the policy's model and tokenizer: a hub name, a local folder or an embedded model, the seq2seq or causal
class picked from its config, an ``init_adapter`` merged in (or a whole fine-tuned model in its place), a separate
frozen reference, and :func:`build_policy`, the :class:`~lit_rlhf.models.policy.Policy` in its resolved dtype."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_rlhf.models.lora import merge_adapter
from lit_rlhf.models.tiny import resolve_model_path
from lit_rlhf.settings import check, lora_settings, resolve_base_dtype

if TYPE_CHECKING:
    from lit_rlhf.models.policy import Policy

log = logging.getLogger(__name__)


def _is_seq2seq(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def fuse_tanh_gelu(model: nn.Module) -> nn.Module:
    """Replace transformers' ``NewGELUActivation`` (T5's ``gelu_new``, GPT-2's activation) by
    ``nn.GELU(approximate="tanh")``: the same function in one kernel instead of five elementwise ops, whose
    intermediate [B, T, d_ff] tensors autograd would keep (on the flan-t5-base recipe workload, 719 MiB less
    peak memory). Outputs agree to float rounding. Returns ``model``, changed in place."""
    from transformers.activations import NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))
    return model


def load_causal_or_seq2seq(
    path: str, dtype: torch.dtype | None = None, from_scratch: bool = False, attn_implementation: str | None = None
) -> PreTrainedModel:
    """Load a model by hub name or local path, picking the seq2seq or causal class from its config
    (``from_scratch``: its architecture with fresh weights), with :func:`fuse_tanh_gelu` applied.
    ``attn_implementation``: ``from_pretrained``'s (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ...);
    None: transformers' own choice."""
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if _is_seq2seq(config) else AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_config(config, **kwargs) if from_scratch else cls.from_pretrained(path, **kwargs)
    except (ValueError, ImportError) as err:
        if attn_implementation is None:
            raise
        raise ValueError(f"model.attn_implementation={attn_implementation!r} is not available for {path!r}: "
                         f"{err}\nChoose another one (e.g. sdpa or eager) or null (transformers' choice)") from err
    return contiguous_head_input(fuse_tanh_gelu(model))


def contiguous_head_input(model: nn.Module) -> nn.Module:
    """Make the LM head's input contiguous before the head runs. A causal LM applies its head to a strided slice of
    the last hidden states (transformers' ``logits_to_keep``), and ``nn.Linear`` on a non-contiguous 3-D input runs
    a batched matmul that, in bfloat16 on a CPU, first copies the [vocab, hidden] weight once per row (a 40M-parameter
    Qwen2 shape with 16 rows: 79% of the scoring pass; benchmarks/RESULTS_TRL_GRPO.md). The copy made instead holds
    hidden states, not logits. Returns ``model``, changed in place (a forward pre-hook on its output embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        head.register_forward_pre_hook(_contiguous_first)
    return model


def _contiguous_first(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def finetune_errors(finetune: str, init_from_scratch: bool = False) -> list[str]:
    """A ``model.finetune`` other than lora or full, and ``model.init_from_scratch`` without full."""
    errors = [] if finetune in ("lora", "full") else [f"model.finetune must be lora or full, got {finetune!r}"]
    if init_from_scratch and finetune != "full":
        errors.append("model.init_from_scratch=true trains a model from random weights: it needs model.finetune=full")
    return errors


def check_finetune(finetune: str, init_from_scratch: bool) -> None:
    """Raise for :func:`finetune_errors`."""
    check(finetune_errors(finetune, init_from_scratch))


def load_reference(
    reference_model: str | None, dtype: torch.dtype, attn_implementation: str | None = None
) -> PreTrainedModel | None:
    """The separate frozen reference model ``reference_model`` names (eval mode, no gradients); None without one."""
    if reference_model is None:
        return None
    ref = load_causal_or_seq2seq(resolve_model_path(reference_model), dtype, attn_implementation=attn_implementation)
    return ref.requires_grad_(False).eval()


def is_full_model_folder(path: str) -> bool:
    """True for a local folder holding a whole ``save_pretrained`` model (config.json, no adapter_config.json)."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, "adapter_config.json")
    )


def load_base_model(
    model_name: str, init_adapter: str | None, dtype: torch.dtype, init_from_scratch: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, str, str]:
    """The base model, the folder (or hub name) its tokenizer loads from, and the setting that names that folder
    (``model.model_name`` or ``model.init_adapter``).

    ``init_adapter`` may be a peft adapter folder (merged into the base with :func:`merge_adapter`) or a whole
    ``save_pretrained`` model folder, e.g. the export of a full supervised fine-tuning run: that model then
    replaces the base. ``init_from_scratch``: build from the config with fresh weights (the folder may hold no
    weights).
    """
    resolved = {}
    for setting, name in (("model_name", model_name), ("init_adapter", init_adapter)):
        try:
            resolved[setting] = resolve_model_path(name) if name is not None else None
        except ValueError as err:
            raise ValueError(f"Could not load model.{setting}={name!r}: {err}") from err
    path, adapter_path, setting = resolved["model_name"], resolved["init_adapter"], "model.model_name"
    if adapter_path is not None and is_full_model_folder(adapter_path):
        log.info("model.init_adapter=%r is a whole model: it replaces model.model_name=%r", init_adapter, model_name)
        path, adapter_path, setting = adapter_path, None, "model.init_adapter"
    try:
        base = load_causal_or_seq2seq(path, dtype, from_scratch=init_from_scratch,
                                      attn_implementation=attn_implementation)
    except OSError as err:
        given = model_name if setting == "model.model_name" else init_adapter
        raise ValueError(
            f"Could not load {setting}={given!r}: {err}\nGive a hub name (needs the network), a local "
            "folder written by save_pretrained, or an embedded model (embedded:tiny-t5, embedded:tiny-gpt2)."
        ) from err
    if adapter_path is not None:
        # Merge the fine-tuned adapter into the frozen base; PPO trains a new adapter on top.
        base = merge_adapter(base, adapter_path)
    return base, path, setting

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "sentencepiece.bpe.model")
"""Files of which a model folder holds at least one when a tokenizer was saved with it."""


def load_tokenizer(path: str, setting: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the model in ``path`` (a folder or hub name), with a pad token (eos when it has
    none). ``setting`` names the flag that gave ``path``, for the error messages.

    A local folder without tokenizer files is refused: transformers would build an empty tokenizer from the
    model's config, and generation would fail far from the cause."""
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"{setting}={path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, ...): "
                         "save the model's tokenizer into the same folder (tokenizer.save_pretrained(folder))")
    return ensure_pad_token(AutoTokenizer.from_pretrained(path), f"{setting}={path!r}")


PAD_NOTICES_GIVEN: set[str] = set()
"""The tokenizers (by source) whose eos stand-in for padding was announced in this process."""


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    """``tokenizer``, padding with its eos token when it has no pad token (decoder-only tokenizers such as GPT-2's
    ship without one; the attention mask keeps the padding out of the model's view). ``source`` names the flag
    and value it came from (``model.model_name='gpt2'``), for the notice and the error when it has neither."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"The tokenizer of {source} has neither a pad nor an eos token, so batches cannot be padded: save "
                "the tokenizer with a pad token set (tokenizer.add_special_tokens({'pad_token': ...}); "
                "save_pretrained) and give that folder")
        tokenizer.pad_token = tokenizer.eos_token
        if source not in PAD_NOTICES_GIVEN:  # the data module and the policy load the same tokenizer: one line
            PAD_NOTICES_GIVEN.add(source)
            rank_zero_info(f"The tokenizer of {source} has no pad token: using its eos token "
                           f"{tokenizer.eos_token!r} (id {tokenizer.eos_token_id}) for padding.")
    return tokenizer


def model_source_errors(sources: dict[str, str | None]) -> list[str]:
    """Cheap checks of the models a run will load, before anything is built or written: each name resolves
    (an embedded model is built, a local path exists) and a model name's config loads. ``sources``: flag -> name
    (None: not used). Messages name the flag."""
    errors = []
    for flag, name in sources.items():
        if name is None:
            continue
        try:
            path = resolve_model_path(name)
            if flag.endswith("model_name") or flag.endswith("reference_model"):
                AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            errors.append(f"Could not load {flag}={name!r}: {err}\nGive a hub name (needs the network), a local folder "
                          "written by save_pretrained, or an embedded model (embedded:tiny-t5, embedded:tiny-gpt2).")
    return errors


def is_encoder_decoder(name: str) -> bool:
    """Whether the model ``name`` (as ``model.model_name`` takes it) is an encoder-decoder, read from its config;
    False where the config does not load (``model_source_errors`` says why)."""
    try:
        return bool(getattr(AutoConfig.from_pretrained(resolve_model_path(name)), "is_encoder_decoder", False))
    except (OSError, ValueError):
        return False


def build_policy(kwargs: dict, dtype: str, device: torch.device | None = None) -> tuple[Policy, str]:
    """A :class:`Policy` of ``kwargs`` with its base in ``dtype`` as resolved on ``device``
    (``settings.resolve_dtype``: ``auto`` is bfloat16 on a CUDA device with bfloat16, float32 elsewhere), and that
    dtype. Logs the choice once (rank zero)."""
    from lit_rlhf.models.policy import Policy  # policy.py loads its model with this file's functions

    resolved = resolve_base_dtype(dtype, device, kwargs.get("finetune", "lora"), lora_settings(kwargs.get("lora")).bias,
                                  "Frozen base weights")
    return Policy(**kwargs, dtype=resolved), resolved
