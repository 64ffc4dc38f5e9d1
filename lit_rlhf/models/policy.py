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

Beside it: ``lit_rlhf.models.loading`` (model, tokenizer), ``lit_rlhf.models.lora`` (the adapter),
``lit_rlhf.models.generation`` (sampling), ``lit_rlhf.models.export`` (the saved folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from lit_rlhf.models.checkpointing import checkpointing_without_dropout, enable_gradient_checkpointing
from lit_rlhf.models.decoding import SampledRollout
from lit_rlhf.models.export import export_policy, write_adapter
from lit_rlhf.models.generation import (
    eos_response_mask,
    fit_to_context,
    generate_batch,
    model_sampling_settings,
    sample_rollout,
    special_tokens,
)
from lit_rlhf.models.lm import cached_decode_blocker, lm_kind, trim_batch
from lit_rlhf.models.loading import check_finetune, load_base_model, load_reference, load_tokenizer
from lit_rlhf.models.logprobs import full_kl_per_token, token_logprobs
from lit_rlhf.models.lora import InitialWeights, add_lora, parameter_counts
from lit_rlhf.settings import GenerationSettings, LoraSettings, WeightDtype, check, dtype_errors, lora_settings

EXACT_SCORE_ROWS = 8
"""Rows per scoring forward when ``Policy.sample`` falls back to exact mode."""


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


class Policy(nn.Module):
    """A language model with a trainable LoRA adapter and a value head, behind one seq2seq/causal interface.

    Args:
        model_name: hub name, local path, or an embedded model (``embedded:tiny-t5``, ``embedded:tiny-gpt2``).
        lora: the adapter trained by PPO. A targeted ``lm_head`` that is tied to the input embedding gets its own
            copy of the weight first (same values, same forward pass), so that the adapter never reaches the input
            embedding, in training or when merged (:func:`~lit_rlhf.models.lora.untie_output_embedding`).
        init_adapter: path or hub name of an existing PEFT adapter (e.g. a supervised fine-tuning
            checkpoint). It is merged into the base weights, which stay frozen, and a fresh LoRA is trained on
            top: the reference policy is then the fine-tuned model, not the raw base model.
        reference_model: load a separate frozen reference model instead of disabling the adapter (costs a
            second copy of the weights; useful when the reference differs from the base). Without it, a
            ``lora.bias`` that trains base biases keeps frozen copies of them for the reference pass
            (:class:`~lit_rlhf.models.lora.InitialWeights`).
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
            dropout off too (:func:`~lit_rlhf.models.checkpointing.checkpointing_without_dropout`).
        attn_implementation: ``from_pretrained``'s attention kernel (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``, ...); None: transformers' own choice.
        logprob_chunk_size: 0: the forward returns the [B, T, V] logits. N > 0: the LM head is applied N positions
            (of the flattened rows x tokens) at a time and only each chunk's log-probs kept; the backward recomputes
            each chunk's logits (:mod:`lit_rlhf.models.logprobs`). The exact KL still builds the logits.
    """

    logprob_temperature: float = 1.0  # log-probs of softmax(logits / this): forward, reference_forward, sampling

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
        logprob_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        lora = lora_settings(lora)
        check_finetune(finetune, init_from_scratch)
        check(dtype_errors(dtype, finetune, lora.bias))
        torch_dtype = getattr(torch, dtype)
        base, path, setting = load_base_model(model_name, init_adapter, torch_dtype, init_from_scratch,
                                              attn_implementation)
        self.gradient_checkpointing, self.logprob_chunk_size = gradient_checkpointing, logprob_chunk_size
        if gradient_checkpointing:
            enable_gradient_checkpointing(base)
        self.lm = lm_kind(base.config, base.generation_config)  # the seq2seq/causal difference
        self.is_seq2seq = self.lm.is_seq2seq
        self.tokenizer = load_tokenizer(path, setting)
        self.finetune = finetune
        self.model = base.requires_grad_(True) if finetune == "full" else add_lora(base, lora, self.is_seq2seq)
        self.value_head = ValueHead(base.config.hidden_size, value_head_dropout) if value_head else NoValueHead()
        self.reference: PreTrainedModel | None = load_reference(reference_model, torch_dtype, attn_implementation)
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
        self.notices_said: set[str] = set()  # the warnings this policy says once (first_notice)

    # ------------------------------------------------------------------ bookkeeping

    def parameter_counts(self) -> dict[str, int | float]:
        """Trainable / all parameters of the policy, without and with the value head (as the recipe reports)."""
        return parameter_counts(self.model, self.value_head)

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
        """Make room for ``max_new_tokens`` in a causal model's context by dropping the *start* of too-long prompts
        (:func:`lit_rlhf.models.generation.fit_to_context`). query_ids, query_mask: [B, P] (left-padded) -> [B, P']."""
        return fit_to_context(self, query_ids, query_mask, max_new_tokens)

    def generate(
        self, input_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings,
        max_new_tokens: Tensor | None = None, generator: torch.Generator | None = None, synced_gpus: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample one response per query in a single batched call (KV cache, eval mode): response_ids and
        response_mask [B, T]. See :func:`lit_rlhf.models.generation.generate_batch`."""
        return generate_batch(self, input_ids, attention_mask, settings, max_new_tokens, generator, synced_gpus)

    def sample(
        self, input_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings, max_new_tokens: Tensor,
        repeats: int = 1, uniforms: Tensor | None = None,
    ) -> SampledRollout:
        """Like ``generate``, with lit_rlhf's cached loop, the log-probs and values of the sampled tokens coming back
        with them; exact mode where the loop cannot serve the model. See
        :func:`lit_rlhf.models.generation.sample_rollout`."""
        return sample_rollout(self, input_ids, attention_mask, settings, max_new_tokens, repeats, uniforms)

    def sample_exact(
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

    def first_notice(self, notice: str) -> bool:
        """True the first time this policy is asked about ``notice``: a warning it says once."""
        first = notice not in self.notices_said
        self.notices_said.add(notice)
        return first

    def decode(self, response_ids: Tensor, response_mask: Tensor) -> list[str]:
        """Response texts: each row's masked-in tokens, special tokens dropped. [B, T] -> B strings."""
        # pad (a special token) where the mask is 0; multiplying by the mask would write id 0, a real token in
        # many vocabularies (GPT-2's "!")
        ids = response_ids.masked_fill(~response_mask.bool(), self.pad_token_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def response_mask(self, response: Tensor, max_new_tokens: Tensor | None = None) -> Tensor:
        """1 for tokens up to and including the first eos (any of the model's eos ids), within each row's limit.
        response: [B, T]."""
        return eos_response_mask(self.special_tokens, response, max_new_tokens)

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
        entropy_grad: bool = False,
    ) -> PolicyOutput:
        """Log-probabilities (and values, and the entropy at each position) of the response tokens under the
        current policy. The entropy has a gradient only with ``entropy_grad`` (an entropy bonus in the loss).
        query_ids, query_mask: [B, P]; response_ids, response_mask: [B, T] -> PolicyOutput with [B, T] fields.
        """
        logprobs, entropy, hidden, logits = token_logprobs(
            self.lm, self.model, (query_ids, query_mask, response_ids, response_mask), with_values, with_entropy,
            entropy_grad, self.logprob_chunk_size, keep_logits=return_logits, temperature=self.logprob_temperature)
        values = self.value_head(hidden) if with_values else None
        return PolicyOutput(logprobs, values, logits, entropy)

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
        tensors = (query_ids, query_mask, response_ids, response_mask)
        with self.mode(dropout=False):  # the reference never samples dropout
            if self.reference is not None:
                scores = token_logprobs(self.lm, self.reference, tensors, chunk_size=self.logprob_chunk_size,
                                        keep_logits=return_logits, temperature=self.logprob_temperature)
            else:
                initial = self.initial_biases.put_back(self.model) if self.initial_biases is not None else nullcontext()
                with initial, self.model.disable_adapter():  # initial biases first: peft warns on entry
                    scores = token_logprobs(self.lm, self.model, tensors, chunk_size=self.logprob_chunk_size,
                                            keep_logits=return_logits, temperature=self.logprob_temperature)
        return PolicyOutput(scores.logprobs, None, scores.logits)

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
        with_entropy: bool = False, entropy_grad: bool = False,
    ) -> tuple[PolicyOutput, ResponseBatch, Tensor]:
        """``forward`` on the rows ``idx`` of ``batch`` (trimmed, with gradients): the PPO update's pass.
        Returns the output ([b, t] fields), the trimmed rows and ``idx`` on the batch's device."""
        rows, idx = self.rows(batch, idx)
        # transformers checkpoints only in train mode: with dropout off, the blocks still checkpoint
        checkpointing = checkpointing_without_dropout(self.model) if self.gradient_checkpointing and not dropout \
            else nullcontext()
        with self.mode(dropout), checkpointing:
            out = self(*rows.tensors(), with_values=with_values, with_entropy=with_entropy, entropy_grad=entropy_grad)
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
        return export_policy(self, target, state_dict)

    def save_adapter(self, directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the adapter (peft ``save_pretrained``), the tokenizer and the value head into ``directory``
        (the whole model with ``finetune="full"``): :func:`lit_rlhf.models.export.write_adapter`, which says how
        it loads and merges. ``state_dict``: this policy's full weights, keyed as ``self.state_dict()``, to write
        instead of the parameters held here (under FSDP, this process holds only a shard)."""
        return write_adapter(self, directory, state_dict)


class NoValueHead(nn.Module):
    """Stands in for the value head of a policy built with ``value_head=False`` (supervised fine-tuning, or a
    critic-free estimator such as GRPO): no parameters, and asking it for values is an error."""

    def forward(self, hidden: Tensor) -> Tensor:
        raise ValueError(
            "This policy was built with value_head=False (supervised fine-tuning or a critic-free advantage "
            "estimator): it has no value head, so it cannot compute values; call forward(..., with_values=False) "
            "or build it with value_head=True"
        )
