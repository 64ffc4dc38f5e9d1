"""Log-probabilities (and entropies) of the response tokens of a teacher-forced forward, with or without the
[rows, tokens, vocab] logits.

``chunk_size`` 0 is the plain path: the model returns every position's logits, and
:func:`~lit_rlhf.models.lm.logprobs_from_logits` reads them. ``chunk_size`` N > 0 (``model.logprob_chunk_size``)
never holds those logits: the model runs with its LM head fed no position (a forward pre-hook on the output
embedding takes the head's input and hands the head an empty slice), then the head is applied to the flattened
rows x tokens of that input N positions at a time, each chunk's logits cast to float32, reduced to the chosen
token's log-probability (and the entropy) and dropped. With gradients, each chunk is checkpointed
(``torch.utils.checkpoint``, replaying the head's train/eval modes of the forward): the backward recomputes its
logits from the saved head input, so the peak holds one chunk's [N, V] float32 logits (and their gradient)
instead of all rows' [B, T, V].

What the head reads is what the model hands it, so whatever a model does to its last hidden states before the
head comes with it (T5 scales them by ``d_model ** -0.5`` before a tied head; the head's own LoRA adapter, tied
or untied, is the module called); what models do to the logits after the head is applied from the config:
``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere), ``logits_scaling`` (Granite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from lit_rlhf.models.checkpointing import checkpoint_with_forward_modes
from lit_rlhf.models.lm import logprobs_from_logits


class TokenScores(NamedTuple):
    """[B, T] log-probs, [B, T] entropy (None unless asked for), [B, T, H] last hidden states for the value head
    (None unless asked for), [B, T, V] logits (None unless kept)."""

    logprobs: Tensor
    entropy: Tensor | None
    hidden: Tensor | None
    logits: Tensor | None


def full_kl_per_token(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(pi || ref) over the vocabulary at every position: sum_v p_v (log p_v - log ref_v).
    [B, T, V] x 2 -> [B, T] (float32)."""
    logp, ref_logp = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def token_logprobs(
    lm: Any, model: nn.Module, tensors: tuple[Tensor, Tensor, Tensor, Tensor], with_hidden: bool = False,
    with_entropy: bool = False, entropy_grad: bool = False, chunk_size: int = 0, keep_logits: bool = False,
    temperature: float = 1.0,
) -> TokenScores:
    """The response tokens' log-probs under ``model`` (``lm``: its seq2seq/causal adapter). ``tensors``: query ids,
    query mask [B, P], response ids, response mask [B, T]. ``chunk_size`` > 0: the LM head chunk by chunk (see
    the module's docstring); the logits are then never built, so ``keep_logits`` (the exact KL needs them) takes
    the plain path. The entropy has a gradient only with ``entropy_grad``. ``temperature``: of the policy whose
    log-probs (and entropy, and kept logits) these are, softmax(logits / temperature)."""
    response_ids = tensors[2]
    if chunk_size <= 0 or keep_logits:
        logits, hidden = lm.teacher_forced(model, *tensors, with_hidden=with_hidden)
        if temperature != 1.0:
            logits = logits / temperature
        logprobs = logprobs_from_logits(logits, response_ids, with_entropy=with_entropy, entropy_grad=entropy_grad)
        logprobs, entropy = logprobs if with_entropy else (logprobs, None)
        return TokenScores(logprobs, entropy, hidden, logits if keep_logits else None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: its wrapped model
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embedding (LM head) to apply chunk by chunk: "
                         "set model.logprob_chunk_size=0")
    t = response_ids.shape[1]
    # the positions whose logits teacher_forced keeps: all of a seq2seq decoder's, a causal LM's last t + 1 but one
    positions = slice(None) if lm.is_seq2seq else slice(-t - 1, -1)
    with head_inputs(head, positions) as captured:
        _, hidden = lm.teacher_forced(model, *tensors, with_hidden=with_hidden)
    if not captured:
        raise RuntimeError(f"{type(base).__name__}'s forward did not call its output embedding "
                           f"{type(head).__name__}: set model.logprob_chunk_size=0")
    states = captured[-1]  # [B, T, H]
    transform = logit_transform(base.config, temperature)
    logprobs, entropy = chunked_logprobs(head, states.reshape(-1, states.shape[-1]), response_ids.reshape(-1),
                                         chunk_size, with_entropy, entropy_grad, transform)
    return TokenScores(logprobs.view(response_ids.shape), entropy.view(response_ids.shape) if with_entropy else None,
                       hidden, None)


@contextmanager
def head_inputs(head: nn.Module, positions: slice) -> Iterator[list[Tensor]]:
    """Inside: every call of ``head`` records its input's ``positions`` [B, t, H] in the yielded list and computes
    the head on none of them (an empty slice: [B, 0, V] logits, no work)."""
    captured: list[Tensor] = []

    def take(module: nn.Module, args: tuple) -> tuple:
        states = args[0]
        captured.append(states if positions == slice(None) else states[:, positions])
        return (states[:, :0], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield captured
    finally:
        handle.remove()


def logit_transform(config: Any, temperature: float = 1.0) -> Callable[[Tensor], Tensor] | None:
    """What ``config``'s model does to the head's logits before returning them (None: nothing): Gemma's final
    soft-capping ``cap * tanh(logits / cap)``, Cohere's ``logits * logit_scale``, Granite's ``logits /
    logits_scaling``, with the models' own operations in their order; then the division by ``temperature`` (the
    plain path's order: the model's logits, then ``/ temperature``)."""
    own = _model_logit_transform(config)
    if temperature == 1.0:
        return own
    return (lambda logits: logits / temperature) if own is None else (lambda logits: own(logits) / temperature)


def _model_logit_transform(config: Any) -> Callable[[Tensor], Tensor] | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale, divisor = getattr(text, "logit_scale", None), getattr(text, "logits_scaling", None)
    if cap is not None:
        return lambda logits: torch.tanh(logits / cap) * cap
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return lambda logits: logits * scale
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool):
        return lambda logits: logits / divisor
    return None


def chunked_logprobs(
    head: nn.Module, states: Tensor, labels: Tensor, chunk_size: int, with_entropy: bool = False,
    entropy_grad: bool = False, transform: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``log softmax(transform(head(states)))[labels]`` (and the entropy) of N positions, ``chunk_size`` at a time.
    states: [N, H], labels: [N] -> [N] float32 (and [N]). With gradients each chunk is checkpointed: its logits
    are recomputed in the backward, never kept."""
    parts = []
    for h, y in zip(states.split(chunk_size), labels.split(chunk_size)):
        args = (head, h, y, with_entropy, entropy_grad, transform)
        # the recompute sees the head's train/eval modes of the forward (the policy's mode is back by the backward)
        parts.append(checkpoint_with_forward_modes(head, _chunk, *args) if torch.is_grad_enabled() else _chunk(*args))
    logprobs = torch.cat([p[0] for p in parts])
    return logprobs, torch.cat([p[1] for p in parts]) if with_entropy else None


def _chunk(
    head: nn.Module, states: Tensor, labels: Tensor, with_entropy: bool, entropy_grad: bool,
    transform: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """One chunk: [n, H] -> [n] log-probs and [n] entropy (empty without ``with_entropy``), as
    ``logprobs_from_logits`` computes them."""
    logits = head(states)
    logits = (transform(logits) if transform is not None else logits).float()  # [n, V]
    logprobs, lse = ChosenLogSoftmax.apply(logits, labels)
    if not with_entropy:
        return logprobs, logprobs.new_empty(0)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        # H = lse - sum softmax(z) z, the sum as a batched dot product: one [n, V] temporary (the softmax), not three
        expected = torch.softmax(logits, dim=-1).unsqueeze(-2) @ logits.unsqueeze(-1)  # [n, 1, 1]
        entropy = lse - expected.view(-1)
    return logprobs, entropy


class ChosenLogSoftmax(torch.autograd.Function):
    """``(z[label] - lse(z), lse(z))`` of logits z [n, V] and labels [n]: the autograd of ``gather`` and
    ``logsumexp`` keeps a zero-filled scatter, the subtraction, the exponential and the product of [n, V] each in
    the backward; this one computes the gradient ``softmax(z) (g_lse - g) + onehot(label) g`` in one [n, V]
    tensor."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, labels, lse)
        return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - lse, lse

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, grad_lse: Tensor) -> tuple[Tensor, None]:
        logits, labels, lse = ctx.saved_tensors
        grad = torch.sub(logits, lse[:, None]).exp_().mul_((grad_lse - grad_logprobs)[:, None])
        return grad.scatter_add_(-1, labels.unsqueeze(-1), grad_logprobs.unsqueeze(-1)), None
