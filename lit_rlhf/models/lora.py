"""LoRA on the model's layers: peft's config and targets fitted to the model, the adapter added or merged, and the
initial base weights that training changes in place.

LoRA targets are fitted to the model before peft wraps them (:func:`lora_wrapping`): ``fan_in_fan_out`` for
GPT-2's Conv1D layers, and an ``lm_head`` tied to the input embedding gets its own weight, so that the adapter
changes the output layer only, also once merged (:func:`merge_adapter`, the way to merge an export).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import nn
from transformers import PreTrainedModel

from lit_rlhf.settings import LoraSettings

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel


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


def add_lora(base: PreTrainedModel, lora: LoraSettings, is_seq2seq: bool) -> PeftModel:
    """``base`` wrapped by peft with the trainable adapter ``lora`` describes, its targets checked against the
    model (:func:`lora_target_modules`) and fitted to it (:func:`lora_wrapping`). Errors name
    ``model.lora.target_modules``."""
    from peft import get_peft_model

    peft_config = lora_config(lora, is_seq2seq)
    peft_config.target_modules = lora_target_modules(base, lora.target_modules)
    try:
        with lora_wrapping(base, peft_config):
            return get_peft_model(base, peft_config)
    except ValueError as err:
        raise ValueError(f"Could not add the LoRA adapter (check model.lora.target_modules): {err}") from err


def parameter_counts(model: nn.Module, value_head: nn.Module) -> dict[str, int | float]:
    """Trainable / all parameters of ``model`` (LoRA trains a small part of it), without and with the
    ``value_head`` (as the recipe reports)."""
    def count(params, trainable_only):
        return sum(p.numel() for p in params if p.requires_grad or not trainable_only)

    lm_all, lm_trainable = count(model.parameters(), False), count(model.parameters(), True)
    vh = count(value_head.parameters(), False)  # 0 without a value head
    return {
        "trainable model parameters": lm_trainable,
        "all model parameters": lm_all,
        "percentage of trainable model parameters": 100.0 * lm_trainable / lm_all,
        "trainable parameters with value head": lm_trainable + vh,
        "all parameters with value head": lm_all + vh,
        "percentage with value head": 100.0 * (lm_trainable + vh) / (lm_all + vh),
    }


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
