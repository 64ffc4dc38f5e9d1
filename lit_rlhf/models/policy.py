"""The trainable language model: a Hugging Face seq2seq or causal LM with a LoRA adapter and a value head.

Callers see one interface for both model kinds: "query ids, response ids, response mask". Where the kinds
really differ (encoder, positions, padding side, the decoder start token) is ``lit_rlhf.models.lm``'s small adapter,
used here for the teacher-forced forward and by the cached decode loop.

The policy owns its scoring passes: :meth:`Policy.score` takes a batch of responses and the mini-batch
groups, and returns the log-probabilities, values and reference log-probabilities (or the exact KL) of every
response token, doing the group loop, the trimming of shared padding and eval mode itself; :meth:`Policy.forward_rows`
is the same forward for one group with gradients (the PPO update).

Reference log-probabilities come from the same weights with the adapter disabled: no second copy of the
model in memory (base biases that ``lora.bias`` trains are put back to their initial values for that pass). A
separately loaded frozen reference stays possible (``reference_model``).

LoRA targets are fitted to the model before peft wraps them (:func:`lora_wrapping`): ``fan_in_fan_out`` for
GPT-2's Conv1D layers, and an ``lm_head`` tied to the input embedding gets its own weight, so that the adapter
changes the output layer only, also once merged (:func:`merge_adapter`, the way to merge an export).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from lit_rlhf.models.decoding import SampledRollout, SpecialTokens, sample_with_cache
from lit_rlhf.runtime import atomic_directory
from lit_rlhf.models.lm import cached_decode_blocker, lm_kind, logprobs_from_logits, trim_batch
from lit_rlhf.settings import GenerationSettings, LoraSettings, WeightDtype, check, dtype_errors, lora_settings
from lit_rlhf.models.tiny import resolve_model_path

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)

EXACT_SCORE_ROWS = 8
"""Rows per scoring forward when ``Policy.sample`` falls back to exact mode."""


class PerRowMaxLength(StoppingCriteria):
    """Stops each row of a batched ``generate`` at its own maximum number of new tokens."""

    def __init__(self, start_length: int, max_new_tokens: Tensor) -> None:
        self.start_length = start_length
        self.max_new_tokens = max_new_tokens  # [B]

    def __call__(self, input_ids: Tensor, scores: Tensor | None = None, **kwargs) -> Tensor:
        generated = input_ids.shape[1] - self.start_length
        return generated >= self.max_new_tokens.to(input_ids.device)  # [B] bool


class ForcedEOSAtRowLimit(LogitsProcessor):
    """A model's ``forced_eos_token_id`` at each row's own last step of a batched ``generate`` (transformers'
    ``ForcedEOSTokenLogitsProcessor`` knows only the batch's longest limit), as the cached loop forces it."""

    def __init__(self, start_length: int, max_new_tokens: Tensor, eos_token_id: int) -> None:
        self.start_length, self.max_new_tokens, self.eos_token_id = start_length, max_new_tokens, eos_token_id

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        last = (input_ids.shape[1] - self.start_length + 1) >= self.max_new_tokens.to(scores.device)  # [B]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos_token_id] = 0.0
        return torch.where(last[:, None], forced, scores)


class ValueHead(nn.Module):
    """V(s_t): dropout + a linear map from the last hidden state to a scalar."""

    def __init__(self, hidden_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: Tensor) -> Tensor:  # [B, T, H] -> [B, T]
        # float32 out, as the log-probs: under mixed precision (autocast) the linear map returns bf16/fp16
        return self.summary(self.dropout(hidden.to(self.summary.weight.dtype))).squeeze(-1).float()


@dataclass
class ResponseBatch:
    """Queries and their responses: [B, P] query ids and mask (padded on the model kind's side), [B, T]
    response ids and mask (right-padded; the mask marks each response's tokens)."""

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.query_ids, self.query_mask, self.response_ids, self.response_mask


@dataclass
class Scores:
    """What :meth:`Policy.score` computed, [B, T] each, 0 outside the response mask; None when not asked for."""

    logprobs: Tensor | None
    values: Tensor | None
    ref_logprobs: Tensor | None
    kl: Tensor | None = None


@dataclass
class PolicyOutput:
    logprobs: Tensor  # [B, T] log pi(response_t | context)
    values: Tensor | None  # [B, T] V(context before response_t)
    logits: Tensor | None = None  # [B, T, V] when asked for
    entropy: Tensor | None = None  # [B, T] entropy of the next-token distribution (no gradient), when asked for


def full_kl_per_token(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(pi || ref) over the vocabulary at every position: sum_v p_v (log p_v - log ref_v).
    [B, T, V] x 2 -> [B, T] (float32)."""
    logp, ref_logp = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


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
    return fuse_tanh_gelu(model)


class InitialWeights(nn.Module):
    """Frozen copies of the base weights that training changes in place, put back for the reference pass.

    With ``lora.bias`` "all" or "lora_only", peft trains the base model's biases themselves (all of them, or
    those of the adapted layers): disabling the adapter leaves the trained biases, so the policy with its adapter
    disabled would drift away from the initial model. The copies are non-persistent buffers: they follow the
    policy's device and stay out of checkpoints (a resumed run takes them from the base model again).
    """

    def __init__(self, model: nn.Module, bias: str) -> None:
        super().__init__()
        self.bias = bias
        # what peft made trainable besides the adapter's own matrices: the base biases
        self.names = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
        params = dict(model.named_parameters())
        for i, name in enumerate(self.names):
            self.register_buffer(f"initial_{i}", params[name].detach().clone(), persistent=False)

    @contextmanager
    def put_back(self, model: nn.Module) -> Iterator[None]:
        """The initial values in ``model``'s parameters for the duration (no gradients), the trained ones after.
        peft's notice that disabling the adapter keeps the trained biases is silenced meanwhile: they are put back."""
        params, trained = dict(model.named_parameters()), {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Careful, disabling adapter layers with bias configured")
            try:
                for i, name in enumerate(self.names):
                    param, initial = params.get(name), getattr(self, f"initial_{i}")
                    if param is None or param.shape != initial.shape:
                        raise ValueError(
                            f"model.lora.bias={self.bias} trains the base model's biases, and this process cannot "
                            f"put their initial values back for the reference (its weights are sharded, {name!r}): "
                            "set model.reference_model to a separate frozen copy, or model.lora.bias=none"
                        )
                    trained[name] = param.data
                    param.data = initial
                yield
            finally:
                for name, data in trained.items():
                    params[name].data = data


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (transformers' activation checkpointing, non-reentrant: works with a frozen base and a LoRA adapter, whose
    inputs need no gradient). The recompute runs with the train/eval modes and dropout rates the block had in
    the forward (:func:`checkpoint_with_forward_modes`): the policy restores its own mode after each pass,
    before the backward. Raises an error naming ``model.gradient_checkpointing`` for a model without support."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; set "
                         "model.gradient_checkpointing=false")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = functools.partial(checkpoint_with_forward_modes, layer)


def _modes(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, bool, dict[str, float]]]:
    """Each module with its train flag and the dropout rates it holds as plain floats (BART's ``self.dropout``)."""
    return [(m, m.training, {k: v for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)})
            for m in modules]


@contextmanager
def _replayed(modes: list[tuple[nn.Module, bool, dict[str, float]]]) -> Iterator[None]:
    now = _modes(m for m, _, _ in modes)
    _apply(modes)
    try:
        yield
    finally:
        _apply(now)


def _apply(modes: list[tuple[nn.Module, bool, dict[str, float]]]) -> None:
    for module, training, rates in modes:
        module.training = training
        for name, rate in rates.items():
            setattr(module, name, rate)


def checkpoint_with_forward_modes(block: nn.Module, function, *args, **kwargs):
    """``torch.utils.checkpoint`` of one block whose recompute (in the backward pass) sees the train/eval modes
    and dropout rates the block's modules had in the forward, whatever they are by then. Without this, a pass
    in eval mode whose backward runs after the policy went back to train mode would recompute with dropout."""
    from torch.utils.checkpoint import checkpoint

    modes = _modes(block.modules())
    return checkpoint(function, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _replayed(modes)),
                      **kwargs)


@contextmanager
def checkpointing_without_dropout(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing in a pass with dropout off (the policy's eval mode).

    transformers checkpoints a block only while the block is in train mode (``GradientCheckpointingLayer``), and
    eval mode is how lit_rlhf turns dropout off. Inside, the checkpointing blocks themselves are in train mode
    while every module under them stays in eval mode; the dropout rates a block reads itself (BART's
    ``dropout(h, p=self.dropout, training=self.training)``) are 0 meanwhile. Everything is restored after."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    saved = _modes(blocks)
    _apply([(block, True, {name: 0.0 for name in rates}) for block, _, rates in saved])
    try:
        yield
    finally:
        _apply(saved)


class Policy(nn.Module):
    """A language model with a trainable LoRA adapter and a value head, behind one seq2seq/causal interface.

    Args:
        model_name: hub name, local path, or an embedded model (``embedded:tiny-t5``, ``embedded:tiny-gpt2``).
        lora: the adapter trained by PPO. A targeted ``lm_head`` that is tied to the input embedding gets its own
            copy of the weight first (same values, same forward pass), so that the adapter never reaches the input
            embedding, in training or when merged (:func:`untie_output_embedding`).
        init_adapter: path or hub name of an existing PEFT adapter (e.g. a supervised fine-tuning
            checkpoint). It is merged into the base weights, which stay frozen, and a fresh LoRA is trained on
            top: the reference policy is then the fine-tuned model, not the raw base model.
        reference_model: load a separate frozen reference model instead of disabling the adapter (costs a
            second copy of the weights; useful when the reference differs from the base). Without it, a
            ``lora.bias`` that trains base biases keeps frozen copies of them for the reference pass
            (:class:`InitialWeights`).
        value_head_dropout: dropout before the value head's linear layer.
        dtype: dtype of the frozen base weights (and of a separate ``reference_model``): "float32", "bfloat16"
            or "float16". The trained weights stay float32 whatever it is: peft upcasts the LoRA adapter (its
            ``autocast_adapter_dtype``) and casts each adapted layer's input to it, and the value head casts the
            hidden states; log-probabilities and values come out float32. Half precision is refused for trained
            base weights (``finetune="full"``, ``lora.bias`` other than "none"), see ``settings.dtype_errors``.
        value_head: build the value head (PPO needs it). False (supervised fine-tuning): none is built, and
            ``forward(with_values=True)`` or ``sample`` raise an error that says so.
        finetune: ``"lora"``: a LoRA adapter is trained on frozen base weights. ``"full"``: no adapter, every
            weight of the model is trainable (e.g. a model trained from scratch); ``save_adapter`` then writes
            the whole model with ``save_pretrained``, which ``init_adapter`` accepts.
        init_from_scratch: build the model from ``model_name``'s config with freshly initialised weights
            instead of loading its weights (the folder then needs only config and tokenizer files). Needs
            ``finetune="full"``.
        gradient_checkpointing: recompute each block's activations in the backward pass instead of keeping them
            (less activation memory, about one more forward per update); the update's pass checkpoints with
            dropout off too (:func:`checkpointing_without_dropout`).
        attn_implementation: ``from_pretrained``'s attention kernel (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``, ...); None: transformers' own choice.
    """

    def __init__(
        self,
        model_name: str = "embedded:tiny-t5",
        lora: LoraSettings | dict | None = None,
        init_adapter: str | None = None,
        reference_model: str | None = None,
        value_head_dropout: float = 0.1,
        dtype: WeightDtype = "float32",
        value_head: bool = True,
        finetune: Literal["lora", "full"] = "lora",
        init_from_scratch: bool = False,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        from peft import get_peft_model

        lora = lora_settings(lora)
        if finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune must be lora or full, got {finetune!r}")
        if init_from_scratch and finetune != "full":
            raise ValueError("model.init_from_scratch=true trains a model from random weights: it needs "
                             "model.finetune=full")
        check(dtype_errors(dtype, finetune, lora.bias))
        torch_dtype = getattr(torch, dtype)
        base, path, setting = load_base_model(model_name, init_adapter, torch_dtype, init_from_scratch,
                                              attn_implementation)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            enable_gradient_checkpointing(base)
        self.lm = lm_kind(base.config, base.generation_config)  # the seq2seq/causal difference
        self.is_seq2seq = self.lm.is_seq2seq
        self.tokenizer = load_tokenizer(path, setting)
        self.finetune = finetune
        if finetune == "full":
            self.model = base.requires_grad_(True)
        else:
            peft_config = lora_config(lora, self.is_seq2seq)
            peft_config.target_modules = lora_target_modules(base, lora.target_modules)
            try:
                with lora_wrapping(base, peft_config):
                    self.model = get_peft_model(base, peft_config)
            except ValueError as err:
                raise ValueError(f"Could not add the LoRA adapter (check model.lora.target_modules): {err}") from err
        self.value_head = ValueHead(base.config.hidden_size, value_head_dropout) if value_head else NoValueHead()
        self.reference: PreTrainedModel | None = None
        if reference_model is not None:
            ref = load_causal_or_seq2seq(resolve_model_path(reference_model), torch_dtype,
                                         attn_implementation=attn_implementation)
            ref.requires_grad_(False).eval()
            self.reference = ref
        # lora.bias all/lora_only trains base biases in place, which disabling the adapter does not undo
        needs_initial = finetune == "lora" and self.reference is None and lora.bias != "none"
        self.initial_biases = InitialWeights(self.model, lora.bias) if needs_initial else None
        self.model_name = model_name
        self.init_adapter = init_adapter
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        # every eos id, the pad and the forced tokens of the model's own generation_config, for both rollout modes
        self.special_tokens = special_tokens(base.generation_config, self.tokenizer, self.is_seq2seq)
        self.eos_token_ids = self.special_tokens.eos
        # its sampling settings, which the rollout replaces (said once, at the first rollout: DPO and SFT never sample)
        self.model_sampling = model_sampling_settings(base.generation_config)
        # why the cached decode loop cannot serve this model (None: it can); fast rollout falls back on it
        self.decode_blocker = cached_decode_blocker(self.model)

    # ------------------------------------------------------------------ bookkeeping

    def parameter_counts(self) -> dict[str, int | float]:
        """Trainable / all parameters of the policy, without and with the value head (as the recipe reports)."""
        def count(params, trainable_only):
            return sum(p.numel() for p in params if p.requires_grad or not trainable_only)

        lm_all, lm_trainable = count(self.model.parameters(), False), count(self.model.parameters(), True)
        vh = count(self.value_head.parameters(), False)  # 0 without a value head
        return {
            "trainable model parameters": lm_trainable,
            "all model parameters": lm_all,
            "percentage of trainable model parameters": 100.0 * lm_trainable / lm_all,
            "trainable parameters with value head": lm_trainable + vh,
            "all parameters with value head": lm_all + vh,
            "percentage with value head": 100.0 * (lm_trainable + vh) / (lm_all + vh),
        }

    @property
    def has_value_head(self) -> bool:
        """False when built with ``value_head=False``: no value head is trained, saved or exported."""
        return isinstance(self.value_head, ValueHead)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ generation

    def max_positions(self) -> int | None:
        """The causal model's absolute position limit (None for seq2seq/relative-position models)."""
        return None if self.is_seq2seq else self.lm.max_positions()

    def fit_prompts(self, query_ids: Tensor, query_mask: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
        """Make room for ``max_new_tokens`` in a causal model's context by dropping the *start* of too-long prompts.

        A safety net for prompts encoded without that room: the data module's prompts leave it already
        (``data.reserve_tokens``, cut in their content), so this never fires for them. The end of a prompt
        holds the instruction ("Summary:"), so the oldest tokens go, and with them any BOS, system prompt or chat
        header. Seq2seq models and prompts that fit are returned unchanged.
        query_ids, query_mask: [B, P] (left-padded) -> [B, P'].
        """
        limit = self.max_positions()
        if limit is None or query_ids.shape[1] + max_new_tokens <= limit:
            return query_ids, query_mask
        keep = limit - max_new_tokens
        if keep < 1:
            raise ValueError(
                f"model.generation.max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                f"{limit}-token context; lower model.generation.max_new_tokens"
            )
        if not getattr(self, "_warned_truncation", False):
            log.warning(
                "Prompts longer than %d tokens are cut from the start (BOS, system prompt and chat header go) to fit "
                "the %d-token context with %d new tokens: encode them with data.reserve_tokens of at least %d "
                "(lit-rlhf sets it from model.generation.max_new_tokens), so they are cut in their content instead",
                keep, limit, max_new_tokens, max_new_tokens,
            )
            self._warned_truncation = True
        return query_ids[:, -keep:], query_mask[:, -keep:]

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        settings: GenerationSettings,
        max_new_tokens: Tensor | None = None,
        generator: torch.Generator | None = None,
        synced_gpus: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample one response per query in a single batched call (KV cache, eval mode).

        input_ids, attention_mask: [B, P] (right padding for seq2seq, left padding for causal);
        max_new_tokens: [B] per-sample limits (drawn from ``settings.max_new_tokens`` if None);
        synced_gpus: keep decoding until every process is done (``generate``'s flag). Needed when the weights
        are sharded across processes (FSDP, DeepSpeed ZeRO-3): each decoding step's forward gathers weights
        with a collective, so a process that stopped early would leave the others waiting. None: transformers'
        own choice.
        Returns response_ids [B, T] (right-padded) and response_mask [B, T]: the tokens up to and including
        the first end-of-sequence, within each sample's own limit.
        """
        self._note_model_sampling(settings)
        batch = input_ids.shape[0]
        if max_new_tokens is None:
            low, high = settings.max_new_tokens
            max_new_tokens = torch.randint(low, high, (batch,), generator=generator)
        max_new_tokens = max_new_tokens.to(input_ids.device)
        config = run_generation_config(settings, self.special_tokens, int(max_new_tokens.max()),
                                       getattr(self.lm, "decoder_start_token_id", None))
        # seq2seq output starts with the decoder start token; causal output starts with the query.
        start = 1 if self.is_seq2seq else input_ids.shape[1]
        stopping = StoppingCriteriaList([PerRowMaxLength(start, max_new_tokens)])
        forced_eos = self.special_tokens.forced_eos
        processors = LogitsProcessorList(
            [ForcedEOSAtRowLimit(start, max_new_tokens, forced_eos)] if forced_eos is not None else [])
        with self.mode(dropout=False), only_generation_config(self.model, config):
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                stopping_criteria=stopping,
                logits_processor=processors,
                synced_gpus=synced_gpus,
            )
        response = out[:, start:]  # [B, T]
        return response, self.response_mask(response, max_new_tokens)

    @torch.no_grad()
    def sample(
        self, input_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings, max_new_tokens: Tensor,
        repeats: int = 1, uniforms: Tensor | None = None,
    ) -> SampledRollout:
        """Like ``generate``, with lit_rlhf's cached loop: finished rows leave the batch, and the log-probs and
        values of the sampled tokens come back with them (``lit_rlhf.models.decoding``). Eval mode, KV cache.

        Where the loop cannot serve the model (``lit_rlhf.models.lm.cached_decode_blocker``: its own cache class,
        layers that are not attention), this falls back to exact mode, with one notice: ``generate``, then the
        teacher-forced scoring pass for the log-probs and values. ``uniforms``: each row's own random numbers
        [B, T] (see ``sample_with_cache``)."""
        self._note_model_sampling(settings)
        blocker = self.decode_blocker
        if blocker is not None:
            if not getattr(self, "_noted_exact_rollout", False):
                log.warning("model.fast_rollout: the cached decode loop cannot serve this model (%s); rollouts use "
                            "exact mode (generate, then a scoring pass; its samples depend on "
                            "model.generation.batch_size)", blocker)
                self._noted_exact_rollout = True
            return self._sample_exact(input_ids, attention_mask, settings, max_new_tokens, repeats)
        with self.mode(dropout=False):
            return sample_with_cache(
                self.model, self.lm, self.value_head if self.has_value_head else None, input_ids, attention_mask,
                max_new_tokens, settings, self.special_tokens, repeats=repeats, uniforms=uniforms,
            )

    def _note_model_sampling(self, settings: GenerationSettings) -> None:
        """Once per policy, a warning naming the model's own sampling settings that ``settings`` replace."""
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if self.model_sampling and not getattr(self, "_noted_model_sampling", False):
            if getattr(rank_zero_only, "rank", 0) == 0:  # one line for the run, not one per process
                log.warning("lit-rlhf: warning: %s", replaced_sampling_notice(self.model_sampling, settings))
            self._noted_model_sampling = True

    def _sample_exact(
        self, input_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings, max_new_tokens: Tensor,
        repeats: int,
    ) -> SampledRollout:
        """``sample``'s result from ``generate`` and the teacher-forced scoring pass (``EXACT_SCORE_ROWS`` rows a
        forward, bounding the [rows, T, V] logits)."""
        input_ids, attention_mask = (t.repeat_interleave(repeats, 0) for t in (input_ids, attention_mask))
        response_ids, response_mask = self.generate(input_ids, attention_mask, settings, max_new_tokens=max_new_tokens)
        rows = ResponseBatch(input_ids, attention_mask, response_ids, response_mask)
        groups = list(torch.arange(len(response_ids)).split(EXACT_SCORE_ROWS))
        scores = self.score(rows, groups, values=self.has_value_head, reference=False)
        values = scores.values if scores.values is not None else torch.zeros_like(scores.logprobs)
        return SampledRollout(response_ids, response_mask, scores.logprobs, values)

    def decode(self, response_ids: Tensor, response_mask: Tensor) -> list[str]:
        """Response texts: each row's masked-in tokens, special tokens dropped. [B, T] -> B strings."""
        # pad (a special token) where the mask is 0; multiplying by the mask would write id 0, a real token in
        # many vocabularies (GPT-2's "!")
        ids = response_ids.masked_fill(~response_mask.bool(), self.pad_token_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def response_mask(self, response: Tensor, max_new_tokens: Tensor | None = None) -> Tensor:
        """1 for tokens up to and including the first eos (any of the model's eos ids), within each row's limit.
        response: [B, T]."""
        is_eos = self.special_tokens.is_eos(response).long()
        # tokens before the first eos have no eos to their left (exclusive cumulative sum == 0)
        mask = ((is_eos.cumsum(1) - is_eos) == 0).long()
        if max_new_tokens is not None:
            positions = torch.arange(response.shape[1], device=response.device)
            mask = mask * (positions[None] < max_new_tokens[:, None]).long()
        return mask

    # ------------------------------------------------------------------ scoring forward passes

    @contextmanager
    def mode(self, dropout: bool) -> Iterator[None]:
        """Train mode (dropout on) or eval mode for the duration of a pass; the previous mode comes back after."""
        was_training = self.training
        self.train(dropout)
        try:
            yield
        finally:
            self.train(was_training)

    def forward(
        self,
        query_ids: Tensor,
        query_mask: Tensor,
        response_ids: Tensor,
        response_mask: Tensor,
        with_values: bool = True,
        return_logits: bool = False,
        with_entropy: bool = False,
    ) -> PolicyOutput:
        """Log-probabilities (and values, and the entropy at each position) of the response tokens under the
        current policy.

        query_ids, query_mask: [B, P]; response_ids, response_mask: [B, T] -> PolicyOutput with [B, T] fields.
        """
        logits, hidden = self.lm.teacher_forced(self.model, query_ids, query_mask, response_ids, response_mask)
        logprobs = logprobs_from_logits(logits, response_ids, with_entropy=with_entropy)
        logprobs, entropy = logprobs if with_entropy else (logprobs, None)
        values = self.value_head(hidden) if with_values else None
        return PolicyOutput(logprobs, values, logits if return_logits else None, entropy)

    @torch.no_grad()
    def reference_forward(
        self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
        return_logits: bool = False,
    ) -> PolicyOutput:
        """Log-probabilities of the response tokens under the reference (adapter disabled, with the initial base
        biases put back where ``lora.bias`` trains them, or the separate reference model). Shapes as in ``forward``."""
        if self.reference is None and self.finetune == "full":
            raise ValueError("A policy that trains all its weights (model.finetune=full) has no adapter to disable: "
                             "give a separate model.reference_model to compare with")
        with self.mode(dropout=False):  # the reference never samples dropout
            if self.reference is not None:
                logits, _ = self.lm.teacher_forced(self.reference, query_ids, query_mask, response_ids, response_mask)
            else:
                initial = self.initial_biases.put_back(self.model) if self.initial_biases is not None else nullcontext()
                with initial, self.model.disable_adapter():  # initial biases first: peft warns on entry
                    logits, _ = self.lm.teacher_forced(self.model, query_ids, query_mask, response_ids, response_mask)
        logprobs = logprobs_from_logits(logits, response_ids)
        return PolicyOutput(logprobs, None, logits if return_logits else None)

    def rows(self, batch: ResponseBatch, idx: Tensor) -> tuple[ResponseBatch, Tensor]:
        """The rows ``idx`` of ``batch`` without the padding columns they all share (the side the query is padded
        on depends on the model kind), and ``idx`` on the batch's device."""
        idx = idx.to(batch.query_ids.device)
        trimmed = trim_batch(
            batch.query_ids[idx], batch.query_mask[idx], batch.response_ids[idx], batch.response_mask[idx],
            left_padded_query=self.lm.query_padding_side == "left",
        )
        return ResponseBatch(*trimmed), idx

    def forward_rows(
        self, batch: ResponseBatch, idx: Tensor, dropout: bool = False, with_values: bool = True,
        with_entropy: bool = False,
    ) -> tuple[PolicyOutput, ResponseBatch, Tensor]:
        """``forward`` on the rows ``idx`` of ``batch`` (trimmed, with gradients): the PPO update's pass.
        Returns the output ([b, t] fields), the trimmed rows and ``idx`` on the batch's device."""
        rows, idx = self.rows(batch, idx)
        # transformers checkpoints only in train mode: with dropout off, the blocks still checkpoint
        checkpointing = checkpointing_without_dropout(self.model) if self.gradient_checkpointing and not dropout \
            else nullcontext()
        with self.mode(dropout), checkpointing:
            out = self(*rows.tensors(), with_values=with_values, with_entropy=with_entropy)
        return out, rows, idx

    @torch.no_grad()
    def score(
        self, batch: ResponseBatch, groups: Sequence[Tensor], policy: bool = True, values: bool = True,
        reference: bool = True, full_kl: bool = False,
    ) -> Scores:
        """Score every response token, one group of rows at a time (eval mode, no gradients).

        ``groups``: row indices of each forward pass. Use the first update epoch's mini-batches, so that the
        rollout's log-probs were computed with the same grouping and padding as the first update: the first
        mini-batch's importance ratio is then exactly 1. Asked-for fields are [B, T] tensors, 0 outside the
        response mask: ``policy`` log-probs, ``values``, ``reference`` log-probs, and with ``full_kl`` the exact
        per-token KL(policy || reference) over the vocabulary (which needs both distributions)."""
        shape, device = batch.response_ids.shape, batch.response_ids.device
        current_needed, reference_needed = policy or values or full_kl, reference or full_kl
        out = Scores(*(torch.zeros(shape, device=device) if wanted else None
                       for wanted in (policy, values, reference, full_kl)))
        for group in groups:
            rows, idx = self.rows(batch, group)
            t, mask = rows.response_ids.shape[1], rows.response_mask
            current = ref = None
            with self.mode(dropout=False):
                if current_needed:
                    current = self(*rows.tensors(), with_values=values, return_logits=full_kl)
                if reference_needed:
                    ref = self.reference_forward(*rows.tensors(), return_logits=full_kl)
            if policy:
                out.logprobs[idx, :t] = current.logprobs * mask
            if values:
                out.values[idx, :t] = current.values * mask
            if reference:
                out.ref_logprobs[idx, :t] = ref.logprobs * mask
            if full_kl:
                out.kl[idx, :t] = full_kl_per_token(current.logits, ref.logits) * mask
        return out

    # ------------------------------------------------------------------ export

    def export(self, target: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> Path:
        """:meth:`save_adapter` into a temporary sibling folder, then swapped in: a crash never leaves half a
        folder under ``target`` (``lit_rlhf.runtime.io.atomic_directory``)."""
        atomic_directory(target, lambda tmp: self.save_adapter(tmp, state_dict=state_dict))
        return Path(target)

    def save_adapter(self, directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the adapter (peft ``save_pretrained``), the tokenizer and the value head into ``directory``.

        The result loads with plain peft: ``PeftModel.from_pretrained(base_model, directory)``. To merge it into
        the base weights, use :func:`merge_adapter` (a bare ``merge_and_unload`` on a base whose ``lm_head`` is
        tied to its input embedding would change the embedding too).
        ``state_dict``: this policy's full weights, keyed as ``self.state_dict()``, to write instead of the
        parameters held here: under a strategy that shards the weights (FSDP), this process holds only a shard.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.finetune == "full":
            return self._save_full_model(directory, state_dict)
        model_state = value_head_state = None
        if state_dict is not None:
            model_state = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
            value_head_state = {k[len("value_head."):]: v for k, v in state_dict.items() if k.startswith("value_head.")}
            if not model_state or (self.has_value_head and not value_head_state):
                raise ValueError(
                    "save_adapter: the given state_dict has no 'model.*' or no 'value_head.*' weights; "
                    f"got keys like {sorted(state_dict)[:3]}"
                )
        # save_embedding_layers=False: a LoRA on lm_head leaves its base weight as the base model has it (nothing
        # here resizes or trains embeddings), so the file holds the adapter only, as without lm_head
        self.model.save_pretrained(directory, state_dict=model_state, save_embedding_layers=False)
        self.tokenizer.save_pretrained(directory)
        if self.has_value_head:
            torch.save(self.value_head.state_dict() if value_head_state is None else value_head_state,
                       directory / "value_head.pt")
        # How to rebuild the trained policy: with init_adapter, this adapter sits on base + init_adapter merged,
        # which adapter_config.json's base_model_name_or_path alone does not say.
        manifest = {
            "base_model": self.model_name,
            "init_adapter": self.init_adapter,
            "value_head": "value_head.pt" if self.has_value_head else None,
            "load": (
                "PeftModel.from_pretrained(lit_rlhf.models.policy.merge_adapter(base, init_adapter), this_dir)"
                if self.init_adapter else "PeftModel.from_pretrained(base, this_dir)"
            ),
            # merge_and_unload on a base whose lm_head is tied to its input embedding would change both
            "merge": (
                "lit_rlhf.models.policy.merge_adapter(lit_rlhf.models.policy.merge_adapter(base, init_adapter), this_dir)"
                if self.init_adapter else "lit_rlhf.models.policy.merge_adapter(base, this_dir)"
            ),
        }
        (directory / "lit_rlhf_adapter.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return directory

    def _save_full_model(self, directory: Path, state_dict: dict[str, Tensor] | None) -> Path:
        """``finetune="full"``: the whole model and tokenizer with ``save_pretrained`` (plus the value head, if
        any), loadable as a base model, or as PPO's ``init_adapter``."""
        model_state = None
        if state_dict is not None:
            model_state = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
            if not model_state:
                raise ValueError(f"save_adapter: the given state_dict has no 'model.*' weights; got {sorted(state_dict)[:3]}")
        self.model.save_pretrained(directory, state_dict=model_state)
        self.tokenizer.save_pretrained(directory)
        if self.has_value_head:
            torch.save(self.value_head.state_dict(), directory / "value_head.pt")
        manifest = {"base_model": self.model_name, "init_adapter": self.init_adapter, "finetune": "full",
                    "load": "AutoModelForSeq2SeqLM/AutoModelForCausalLM.from_pretrained(this_dir)"}
        (directory / "lit_rlhf_adapter.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return directory


class NoValueHead(nn.Module):
    """Stands in for the value head of a policy built with ``value_head=False`` (supervised fine-tuning, or a
    critic-free estimator such as GRPO): no parameters, and asking it for values is an error."""

    def forward(self, hidden: Tensor) -> Tensor:
        raise ValueError(
            "This policy was built with value_head=False (supervised fine-tuning or a critic-free advantage "
            "estimator): it has no value head, so it cannot compute values; call forward(..., with_values=False) "
            "or build it with value_head=True"
        )


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



# ---------------------------------------------------------------------- the model's generation config

GENERATION_FLAGS = ("do_sample", "temperature", "top_k", "top_p", "min_new_tokens", "max_new_tokens",
                    "no_repeat_ngram_size")
"""The fields of a ``generation_config`` that a ``model.generation`` setting of the same name replaces."""
TOKEN_FIELDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "forced_bos_token_id",
                "forced_eos_token_id")
"""The fields of a model's ``generation_config`` that PPO keeps: which tokens end, pad and start a response."""


def _ids(value: int | Sequence[int] | None) -> list[int]:
    """A generation config's token id field (an int, a list or None) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def special_tokens(generation_config: GenerationConfig | None, tokenizer, is_seq2seq: bool) -> SpecialTokens:
    """The token rules both rollout modes follow, from the model's own ``generation_config``: every eos id it
    lists (chat models end turns with ``<|eot_id|>``, ``<|im_end|>``, ... beside the tokenizer's eos, which is
    added when missing), the tokenizer's pad (the collator pads with it), ``forced_bos_token_id`` (seq2seq
    only, as ``generate`` forces it at the decoder's first step) and ``forced_eos_token_id``.

    Its sampling settings (temperature, top-p, repetition penalty, ...) are not kept: PPO samples with the
    run's ``model.generation`` settings, the same in both rollout modes (see :func:`model_sampling_settings`)."""
    config = generation_config if generation_config is not None else GenerationConfig()
    eos = list(dict.fromkeys(_ids(config.eos_token_id) + _ids(tokenizer.eos_token_id)))
    return SpecialTokens(
        eos=tuple(eos), pad=tokenizer.pad_token_id,
        forced_bos=config.forced_bos_token_id if is_seq2seq else None, forced_eos=config.forced_eos_token_id,
    )


def model_sampling_settings(generation_config: GenerationConfig | None) -> dict[str, object]:
    """The settings of a model's own ``generation_config`` that a rollout does not use: all it sets beyond
    transformers' defaults except the token fields (a chat model's ``temperature=0.7``, ``top_p=0.8``,
    ``repetition_penalty=1.05``)."""
    if generation_config is None:
        return {}
    return {k: v for k, v in generation_config.to_diff_dict().items()
            if k not in TOKEN_FIELDS and not k.startswith("_") and k != "transformers_version"}


def replaced_sampling_notice(model_settings: dict[str, object], settings: GenerationSettings) -> str:
    """One line for the user: the model's own sampling settings, and the flags (with their values now) of those
    the rollout samples with instead."""
    own = ", ".join(f"{k}={v!r}" for k, v in model_settings.items())
    flags = [k for k in model_settings if k in GENERATION_FLAGS]
    instead = ", ".join(f"--model.generation.{k} {flag_text(getattr(settings, k))}" for k in flags)
    unused = [k for k in model_settings if k not in GENERATION_FLAGS]
    return (f"the model's generation_config samples with {own}; rollouts sample with the run's settings instead"
            + (f" ({instead})" if instead else "")
            + (f"; {', '.join(unused)}: no such setting here, not used" if unused else ""))


def flag_text(value: object) -> str:
    """A setting's value as it is written on the command line: ``true``, ``1.0``, ``[16, 48]``."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, tuple) else str(value)


def run_generation_config(
    settings: GenerationSettings, tokens: SpecialTokens, max_new_tokens: int, decoder_start_token_id: int | None,
) -> GenerationConfig:
    """``generate``'s configuration for one rollout: the model's token rules (``tokens``) with the run's
    sampling settings on top. ``forced_eos`` is left out: ``ForcedEOSAtRowLimit`` forces it at each row's
    own limit. Use it under :func:`only_generation_config`, so that transformers does not fill the fields
    left unset here from the model's own sampling settings."""
    return GenerationConfig(
        do_sample=settings.do_sample,
        top_k=settings.top_k if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None,
        temperature=settings.temperature if settings.do_sample else None,
        max_new_tokens=max_new_tokens,
        # Capped by the longest limit only: a row whose own limit is shorter simply stops there, and
        # must not lift the eos block for the other rows.
        min_new_tokens=min(settings.min_new_tokens, max_new_tokens),
        pad_token_id=tokens.pad,
        eos_token_id=list(tokens.eos) or None,
        decoder_start_token_id=decoder_start_token_id,
        forced_bos_token_id=tokens.forced_bos,
        use_cache=True,
        # NaN/inf logits would crash sampling; generate anyway and let the rollout's finiteness check skip
        # the step with a clear count instead
        remove_invalid_values=True,
        no_repeat_ngram_size=settings.no_repeat_ngram_size or None,
    )


@contextmanager
def only_generation_config(model: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Within, the model's ``generation_config`` is ``config``: ``generate`` fills every field its
    ``generation_config`` argument leaves unset from the model's own (a chat model's temperature 0.7 or
    repetition penalty 1.05), which PPO must not sample with; transformers' neutral defaults fill them instead."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = config
    try:
        yield
    finally:
        base.generation_config = saved


# ---------------------------------------------------------------------- LoRA target modules


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``nn.Linear``, GPT-2's ``Conv1D``): what
    ``model.lora.target_modules`` can list."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (nn.Linear, Conv1D))})


def lora_target_modules(model: PreTrainedModel, target_modules: list[str] | str | None) -> list[str] | str | None:
    """``target_modules`` checked against the model: each listed name must match a module (peft's rule: the
    module's name, or a ``.``-separated suffix of it), since peft refuses only a list of which *none* matches
    and would otherwise adapt, say, ``lm_head`` alone. None needs peft's default for the architecture.
    ``all-linear`` passes as is. Errors name ``model.lora.target_modules`` and the model's linear layers."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    if target_modules == "all-linear":
        return target_modules
    model_type = getattr(model.config, "model_type", None)
    choices = f"its linear layers are {linear_layer_names(model)}; list some of them, or set all-linear"
    if target_modules is None:
        if model_type in peft_defaults:
            return None
        raise ValueError(f"peft has no default LoRA target modules for model type {model_type!r}: set "
                         f"model.lora.target_modules ({choices})")
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"model.lora.target_modules {missing} match no module of this {type(model).__name__} "
                         f"(model type {model_type!r}): {choices}")
    return list(target_modules)


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
        rank_zero_info(f"The tokenizer of {source} has no pad token: using its eos token {tokenizer.eos_token!r} "
                       f"(id {tokenizer.eos_token_id}) for padding.")
    return tokenizer


# ---------------------------------------------------------------------- LoRA on the model's layers


def lora_config(lora: LoraSettings, is_seq2seq: bool) -> LoraConfig:
    """peft's ``LoraConfig`` for the adapter ``lora`` describes (``fan_in_fan_out`` is set by :func:`lora_wrapping`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        bias=lora.bias, task_type="SEQ_2_SEQ_LM" if is_seq2seq else "CAUSAL_LM",
    )


def lora_targets(model: PreTrainedModel, config: LoraConfig) -> dict[str, nn.Module]:
    """The modules of ``model`` that peft wraps for ``config``, by peft's own name matching; with no
    ``target_modules``, peft's default targets for the architecture (none known: empty, peft then raises)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    if config.target_modules is None:
        defaults = DEFAULT_TARGETS.get(getattr(model.config, "model_type", None))
        if defaults is None:
            return {}
        config = copy.copy(config)
        config.target_modules = set(defaults)
    return {name: module for name, module in model.named_modules()
            if name and check_target_module_exists(config, name)}


def untie_output_embedding(model: PreTrainedModel) -> None:
    """Give the output embedding (``lm_head``) its own copy of a weight it shares with the input embedding.

    A LoRA on a tied ``lm_head`` is applied to the output only, but ``merge_and_unload`` adds its update to the
    shared matrix, so the merged model's input embeddings change too. The copy holds the same values: the forward
    pass is unchanged. It costs one vocabulary x hidden matrix. The config says so too, so that transformers does
    not tie them again and peft does not take them as tied (T5 keeps its decoder scaling in
    ``scale_decoder_outputs``; a saved T5 with different ``lm_head`` and embedding weights loads untied)."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    scale = _tied_output_scale(model.config)
    if output is not None and embedding is not None and output.weight is embedding.weight:
        copy = output.weight.detach().clone() if scale == 1.0 else output.weight.detach() * scale
        output.weight = nn.Parameter(copy, requires_grad=output.weight.requires_grad)
    model.config.tie_word_embeddings = False


T5_FAMILY = ("t5", "mt5", "umt5", "longt5", "switch_transformers")
"""Model types whose transformers 4.x forward scales the decoder output by ``d_model ** -0.5`` exactly when
``tie_word_embeddings`` is set (transformers 5 reads ``scale_decoder_outputs`` instead)."""


def _tied_output_scale(config) -> float:
    """The factor an untied copy of the output embedding takes so that the function stays the same: on
    transformers 4.x a T5's tie flag also turns its decoder-output scaling on, which untying turns off, so the
    copy carries the scaling instead; 1 elsewhere."""
    import transformers

    # (a config saved by transformers 5 carries scale_decoder_outputs, which 4.x's forward ignores)
    if getattr(config, "model_type", None) not in T5_FAMILY or int(transformers.__version__.split(".")[0]) >= 5:
        return 1.0
    return float(config.d_model) ** -0.5 if getattr(config, "tie_word_embeddings", False) else 1.0


@contextmanager
def lora_wrapping(model: PreTrainedModel, config: LoraConfig) -> Iterator[None]:
    """Around peft wrapping ``config``'s targets in ``model`` (``get_peft_model``, ``PeftModel.from_pretrained``):
    fit the two to each other first.

    * ``fan_in_fan_out`` is True for GPT-2's ``Conv1D`` layers (weights stored in x out). peft has one value
      per adapter: where Conv1D and Linear targets mix (GPT-2's ``c_attn`` and ``lm_head``), it sets it right
      per layer and warns at the switch, a notice silenced here as it asks nothing of anyone.
    * a targeted ``lm_head``, or a targeted embedding whose weight ``lm_head`` shares, makes ``lm_head`` take its
      own copy of the weight (:func:`untie_output_embedding`): the adapter then changes one of them only."""
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, config)
    conv1d = [isinstance(module, Conv1D) for module in targets.values()]
    config.fan_in_fan_out = any(conv1d)
    output = model.get_output_embeddings()
    if output is not None and any(module is output or getattr(module, "weight", None) is output.weight
                                  for module in targets.values()):
        untie_output_embedding(model)
    with warnings.catch_warnings():
        if any(conv1d) and not all(conv1d):
            warnings.filterwarnings(
                "ignore", message="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`")
        yield


def merge_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    """``model`` with the peft adapter in ``adapter`` (a folder or hub name) merged into its weights.

    The way to merge a lit_rlhf export for deployment: unlike a bare ``PeftModel.from_pretrained(model,
    adapter).merge_and_unload()``, it first gives a targeted ``lm_head`` that is tied to the input embedding its
    own weight (:func:`lora_wrapping`), so the merge changes the output layer only, as training did."""
    from peft import LoraConfig, PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(adapter)
    if not isinstance(config, LoraConfig):
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with lora_wrapping(model, config):
        wrapped = PeftModel.from_pretrained(model, adapter, config=config)
    return wrapped.merge_and_unload()


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


def build_policy(kwargs: dict, dtype: str, device: torch.device | None = None) -> tuple[Policy, str]:
    """A :class:`Policy` of ``kwargs`` with its base in ``dtype`` as resolved on ``device``
    (``settings.resolve_dtype``: ``auto`` is bfloat16 on a CUDA device with bfloat16, float32 elsewhere), and that
    dtype. Logs the choice once (rank zero)."""
    from lit_rlhf.settings import resolve_base_dtype

    resolved = resolve_base_dtype(dtype, device, kwargs.get("finetune", "lora"), lora_settings(kwargs.get("lora")).bias,
                                  "Frozen base weights")
    return Policy(**kwargs, dtype=resolved), resolved
