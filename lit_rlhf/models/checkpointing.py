"""Activation (gradient) checkpointing of the policy's transformer blocks, with the train/eval modes and dropout
rates of the forward pass replayed in the backward's recompute, and checkpointing in a pass with dropout off."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

from torch import nn
from transformers import PreTrainedModel


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
