"""Writing a trained policy into a folder: its LoRA adapter (loadable with plain peft), or the whole model of a
``finetune="full"`` policy, with the tokenizer, the value head and a manifest that says how to rebuild it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lit_rlhf.runtime import atomic_directory

if TYPE_CHECKING:
    from lit_rlhf.models.policy import Policy


def export_policy(policy: Policy, target: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> Path:
    """``policy.save_adapter`` into a temporary sibling folder, then swapped in: a crash never leaves half a
    folder under ``target`` (``lit_rlhf.runtime.io.atomic_directory``)."""
    atomic_directory(target, lambda tmp: policy.save_adapter(tmp, state_dict=state_dict))
    return Path(target)


def _prefixed(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state_dict`` under ``prefix`` (``"model."``), keyed without it."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def write_adapter(policy: Policy, directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write the adapter (peft ``save_pretrained``), the tokenizer and the value head of ``policy`` into
    ``directory``; a ``finetune="full"`` policy writes its whole model (:func:`write_full_model`).

    The result loads with plain peft: ``PeftModel.from_pretrained(base_model, directory)``. To merge it into
    the base weights, use :func:`~lit_rlhf.models.lora.merge_adapter` (a bare ``merge_and_unload`` on a base whose
    ``lm_head`` is tied to its input embedding would change the embedding too).
    ``state_dict``: the policy's full weights, keyed as ``policy.state_dict()``, to write instead of the
    parameters held here: under a strategy that shards the weights (FSDP), this process holds only a shard.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if policy.finetune == "full":
        return write_full_model(policy, directory, state_dict)
    model_state, value_head_state = gathered_parts(policy, state_dict)
    # save_embedding_layers=False: a LoRA on lm_head leaves its base weight as the base model has it (nothing
    # here resizes or trains embeddings), so the file holds the adapter only, as without lm_head
    policy.model.save_pretrained(directory, state_dict=model_state, save_embedding_layers=False)
    policy.tokenizer.save_pretrained(directory)
    save_value_head(policy, directory, value_head_state)
    # How to rebuild the trained policy: with init_adapter, this adapter sits on base + init_adapter merged,
    # which adapter_config.json's base_model_name_or_path alone does not say.
    manifest = {
        "base_model": policy.model_name,
        "init_adapter": policy.init_adapter,
        "value_head": "value_head.pt" if policy.has_value_head else None,
        "load": (
            "PeftModel.from_pretrained(lit_rlhf.models.merge_adapter(base, init_adapter), this_dir)"
            if policy.init_adapter else "PeftModel.from_pretrained(base, this_dir)"
        ),
        # merge_and_unload on a base whose lm_head is tied to its input embedding would change both
        "merge": (
            "lit_rlhf.models.merge_adapter(lit_rlhf.models.merge_adapter(base, init_adapter), this_dir)"
            if policy.init_adapter else "lit_rlhf.models.merge_adapter(base, this_dir)"
        ),
    }
    (directory / "lit_rlhf_adapter.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def gathered_parts(policy: Policy, state_dict: dict[str, Tensor] | None) -> tuple[dict | None, dict | None]:
    """The model's and the value head's entries of a gathered ``state_dict`` (keyed as ``policy.state_dict()``;
    under a sharding strategy this process holds only a shard of both), or (None, None) without one."""
    if state_dict is None:
        return None, None
    model_state, value_head_state = _prefixed(state_dict, "model."), _prefixed(state_dict, "value_head.")
    if not model_state or (policy.has_value_head and not value_head_state):
        raise ValueError(
            "save_adapter: the given state_dict has no 'model.*' or no 'value_head.*' weights; "
            f"got keys like {sorted(state_dict)[:3]}"
        )
    return model_state, value_head_state


def save_value_head(policy: Policy, directory: Path, value_head_state: dict[str, Tensor] | None) -> None:
    """``value_head.pt`` in ``directory`` (none without a value head): ``value_head_state`` if given, else the
    policy's own."""
    if policy.has_value_head:
        torch.save(policy.value_head.state_dict() if value_head_state is None else value_head_state,
                   directory / "value_head.pt")


def write_full_model(policy: Policy, directory: Path, state_dict: dict[str, Tensor] | None) -> Path:
    """``finetune="full"``: the whole model and tokenizer with ``save_pretrained`` (plus the value head, if
    any), loadable as a base model, or as PPO's ``init_adapter``."""
    model_state, value_head_state = gathered_parts(policy, state_dict)
    policy.model.save_pretrained(directory, state_dict=model_state)
    policy.tokenizer.save_pretrained(directory)
    save_value_head(policy, directory, value_head_state)
    manifest = {"base_model": policy.model_name, "init_adapter": policy.init_adapter, "finetune": "full",
                "load": "AutoModelForSeq2SeqLM/AutoModelForCausalLM.from_pretrained(this_dir)"}
    (directory / "lit_rlhf_adapter.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory
