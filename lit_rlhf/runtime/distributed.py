"""What several processes must agree on: reductions, decisions, sharded weights, per-rank draws.

Every function takes the Lightning ``trainer`` (or None outside a run) and is the identity, or the obvious
local answer, in a single process. Reductions sum *sums and counts*, never per-rank means, so a statistic
over all processes equals the one a single process would compute over the whole global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lit_rlhf.runtime.io import rng_state, set_rng_state


def world_size(trainer: Any) -> int:
    return 1 if trainer is None else int(trainer.world_size)


def all_reduce_sum(trainer: Any, t: Tensor) -> Tensor:
    """Element-wise sum of ``t`` over all processes (a new tensor; ``t`` is untouched)."""
    if world_size(trainer) <= 1:
        return t
    return trainer.strategy.reduce(t.clone(), reduce_op="sum")  # the strategy reduces in place


def all_reduce_max(trainer: Any, t: Tensor) -> Tensor:
    if world_size(trainer) <= 1:
        return t
    return trainer.strategy.reduce(t.clone(), reduce_op="max")


def mean_over_ranks(trainer: Any, stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each scalar's mean over processes, with one all-reduce (the identity in a single process)."""
    if world_size(trainer) <= 1 or not stats:
        return stats
    names = sorted(stats)
    means = all_reduce_sum(trainer, torch.stack([stats[k].float() for k in names])) / world_size(trainer)
    return dict(zip(names, means.unbind()))


def grad_norm(parameters: list[nn.Parameter], device: torch.device) -> Tensor:
    """The global L2 norm of the parameters' gradients, after backward.

    Under DDP the gradients are already all-reduced, so every rank sees the same norm; under FSDP each rank
    holds a shard (its norm differs, but decisions on it go through ``any_rank``), and DeepSpeed keeps them
    in its own buffers (``p.grad`` is None: nothing to check here, a norm of 0)."""
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros((), device=device)


def uses_fsdp(trainer: Any) -> bool:
    """True under Lightning's FSDP strategy (on any number of processes: its precision plugin is FSDP's)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def uses_deepspeed(trainer: Any) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return trainer is not None and isinstance(trainer.strategy, DeepSpeedStrategy)


def configure_grad_clipping(trainer: Any, max_grad_norm: float | None, flag: str = "model.ppo.max_grad_norm") -> None:
    """Prepare ``clip_grad_norm`` under the run's strategy, or refuse; call in ``setup``, before the model loads.

    DeepSpeed clips inside its own optimizer step, by its config's ``gradient_clipping`` (Lightning's clipping
    call does nothing there): ``max_grad_norm`` goes into that config, before the strategy builds its engine.
    A config that already sets another value is refused, naming both settings."""
    if max_grad_norm is None or not uses_deepspeed(trainer):
        return
    config = trainer.strategy.config
    own = config.get("gradient_clipping")
    if own and own != max_grad_norm:
        raise ValueError(f"{flag}={max_grad_norm} and the DeepSpeed config's gradient_clipping={own} (trainer.strategy) "
                         f"both clip the gradient norm: set one of them (DeepSpeed applies {flag} through its config)")
    config["gradient_clipping"] = float(max_grad_norm)


def clip_grad_norm(module: Any, optimizer: Any, max_norm: float) -> None:
    """Clip the global gradient norm of ``module``'s trainable parameters to ``max_norm``, after backward and
    before the optimizer step, as the strategy allows it (a collective under FSDP: every rank must call it).

    FSDP: each rank holds a shard of the gradients, so the norm must be reduced over ranks, which the root
    FSDP module's own ``clip_grad_norm_`` does (Lightning's ``clip_gradients`` refuses norm clipping under FSDP).
    DeepSpeed: nothing here; its step clips (``configure_grad_clipping``). Otherwise Lightning's
    ``clip_gradients`` (``torch.nn.utils.clip_grad_norm_``, after unscaling mixed-precision gradients)."""
    trainer = module.trainer
    if uses_deepspeed(trainer):
        return
    if uses_fsdp(trainer):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = trainer.strategy.model
        if not isinstance(root, FSDP):
            raise ValueError("gradient clipping under FSDP needs the LightningModule wrapped by the strategy as one "
                             f"root FSDP module, got {type(root).__name__}: leave wrapping to trainer.strategy")
        root.clip_grad_norm_(max_norm)
        return
    module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def check_trainer_clipping(trainer: Any) -> None:
    """Refuse ``trainer.gradient_clip_val`` under FSDP in ``setup`` (automatic optimization: SFT, DPO, reward
    model), before the model loads: Lightning's FSDP precision refuses norm clipping only at the first step."""
    if uses_fsdp(trainer) and trainer.gradient_clip_val:
        raise ValueError(f"trainer.gradient_clip_val={trainer.gradient_clip_val} is not available under FSDP "
                         "(trainer.strategy: Lightning's FSDP does not clip by norm): unset it, or use DDP or DeepSpeed")


def any_rank(trainer: Any, flag: bool, device: torch.device | None = None) -> bool:
    """True if ``flag`` is true on any process. Skip decisions must agree on all ranks, or the next
    collective (DDP's gradient all-reduce, a sharded forward) would hang."""
    if world_size(trainer) <= 1:
        return bool(flag)
    return bool(all_reduce_sum(trainer, torch.tensor([float(flag)], device=device)).item() > 0)


@contextmanager
def gradient_sync(trainer: Any, sync: bool) -> Iterator[None]:
    """Around one ``manual_backward`` (Lightning prepares DDP's gradient reduction in each one): with ``sync``
    False, DDP keeps this backward's gradients on the process (Lightning's ``block_backward_sync``, DDP's
    ``no_sync``), so that the next synced backward all-reduces their sum once. Accumulating micro-batches: every
    one but the mini-batch's last unsynced; every rank runs the same number of them, so the last one's all-reduce
    is taken by all. Never leave every backward unsynced:
    the ranks' weights would drift apart. FSDP (which reduce-scatters each backward to keep its gradients
    sharded), DeepSpeed and a single process: nothing to do."""
    strategy = getattr(trainer, "strategy", None)
    if sync or world_size(trainer) <= 1 or not hasattr(strategy, "block_backward_sync"):
        yield
        return
    with strategy.block_backward_sync():
        yield


def gather_objects(trainer: Any, rows: list) -> list:
    """Every rank's list, concatenated in rank order (the identity in a single process)."""
    dist = torch.distributed
    if world_size(trainer) <= 1 or not dist.is_available() or not dist.is_initialized():
        return rows
    gathered: list[Any] = [None] * world_size(trainer)
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def checkpoint_rng(trainer: Any) -> dict[str, Any]:
    """The random-number states for a checkpoint: ``rng`` (rank zero's) and, under several processes,
    ``rng_by_rank`` (every process's, in rank order; each draws its own dropout masks, of its own batch's
    shapes, so their states differ). A collective: every process calls it while a checkpoint is written."""
    states = gather_objects(trainer, [rng_state()])
    return {"rng": states[0]} if len(states) == 1 else {"rng": states[0], "rng_by_rank": states}


def restore_checkpoint_rng(trainer: Any, state: dict[str, Any]) -> bool:
    """Restore this process's random-number states from :func:`checkpoint_rng`'s ``state``; from a checkpoint of
    another number of processes (or one without ``rng_by_rank``), rank zero's on every process.

    Returns whether this process got its own states back (always true in a single process when the checkpoint
    holds any): when false, processes that must draw different numbers need :func:`seed_per_rank` again."""
    by_rank = state.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == world_size(trainer):
        set_rng_state(by_rank[int(trainer.global_rank)])
        return True
    if state.get("rng") is not None:
        set_rng_state(state["rng"])
        return world_size(trainer) <= 1
    return False


def weights_sharded(trainer: Any) -> bool:
    """True under a multi-process strategy that shards the weights (FSDP, DeepSpeed ZeRO-3)."""
    if world_size(trainer) <= 1:
        return False
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy) or bool(getattr(trainer.strategy, "zero_stage_3", False))


def synced_gpus(trainer: Any) -> bool | None:
    """``generate``'s ``synced_gpus``: with sharded weights every forward is a collective, so each process
    keeps decoding until all are done; otherwise None (transformers decides, as in a single process)."""
    return True if weights_sharded(trainer) else None


def trainable_state(module: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``state_dict`` that hold trainable parameters of ``module`` (checkpoints need nothing
    else: the frozen base comes back from its model name). Under FSDP, parameter names include the wrappers'
    segments; checkpoint keys do not."""
    trainable = {
        name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        for name, p in module.named_parameters() if p.requires_grad
    }
    return {k: v for k, v in state_dict.items() if k in trainable}


def seed_per_rank(trainer: Any) -> None:
    """Give each process its own reproducible sampling stream (nothing to do in a single process).

    seed_everything gives every process the same seed: processes would sample their responses with the same
    random numbers (on the tiny model, 82% of the tokens of two ranks' responses were equal). Call at the start
    of a fresh run, and after a restore that gave every process rank zero's states (a checkpoint of another
    number of processes); never after one that restored each process's own (:func:`restore_checkpoint_rng`
    returned True): a new seed would make the resumed run sample differently from the uninterrupted one."""
    if world_size(trainer) > 1:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + int(trainer.global_rank))


def draw_length_limits(generator: torch.Generator, low: int, high: int, batch: int, trainer: Any) -> Tensor:
    """Each sample's maximum number of new tokens [batch], uniform in [low, high).

    Every process draws the limits of the whole global batch (world x batch) from the same generator and
    keeps its own slice: processes get different limits, the generators stay in step (so rank zero's
    checkpoint resumes every rank), and a single process draws exactly what ``Policy.generate`` would."""
    world = world_size(trainer)
    rank = 0 if trainer is None else int(trainer.global_rank)
    limits = torch.randint(low, high, (world * batch,), generator=generator)  # [W * B]
    return limits[rank * batch : (rank + 1) * batch]


@contextmanager
def full_weights(
    trainer: Any, module: nn.Module, prefix: str = "policy.", trainable_only: bool = True,
) -> Iterator[dict[str, Tensor] | None]:
    """The complete weights of ``module`` (the LightningModule's attribute named by ``prefix``) for export.

    A collective under FSDP and DeepSpeed ZeRO-3: every rank must enter. Yields the full state dict (FSDP: on
    rank zero; empty elsewhere), or None when the module's own parameters are complete (one process, DDP,
    ZeRO-1/2, and ZeRO-3 inside the gather, which gathers the trainable parameters only unless
    ``trainable_only`` is False: an export that merges an adapter into its base needs the base too)."""
    strategy = trainer.strategy
    if not weights_sharded(trainer):
        yield None
    elif getattr(strategy, "zero_stage_3", False):
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield None
    else:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
            state = strategy.model.state_dict()  # keys as the LightningModule's: "policy.model...."
        yield {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def export_weights(
    trainer: Any, module: nn.Module, write: Callable[[dict[str, Tensor] | None], Any], prefix: str,
    trainable_only: bool = True,
) -> None:
    """Call ``write`` once, on rank zero, with the complete weights of the LightningModule's attribute
    ``module`` (named by ``prefix``; see ``full_weights``: a state dict, or None when ``module`` holds them).
    The one export path of every module (policy adapters and models, reward models).

    A collective under sharded weights: every rank must call it."""
    with full_weights(trainer, module, prefix, trainable_only) as state_dict:
        if trainer.is_global_zero:
            write(state_dict)


def export_policy(trainer: Any, policy: nn.Module, target: str | os.PathLike) -> None:
    """Export the LightningModule's ``policy`` (``Policy.export``: an adapter, or a whole model) to ``target``,
    from its complete weights, written once by rank zero (``export_weights``). PPO's, SFT's and DPO's export."""
    export_weights(trainer, policy, lambda state_dict: policy.export(target, state_dict), "policy.")


def declared_block_classes(root: nn.Module) -> set[type[nn.Module]]:
    """The block classes that the Hugging Face models inside ``root`` declare must not be split across devices
    (``_no_split_modules``, which transformers' ``device_map`` and accelerate's FSDP plugin read too): a T5's
    ``T5Block``, a Qwen2's ``Qwen2DecoderLayer``, a BART's encoder and decoder layers. Raises an error that says
    what to set when no module of ``root`` declares any."""
    names = {name for module in root.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    classes = {type(module) for module in root.modules() if type(module).__name__ in names}
    if not classes:
        raise ValueError(
            f"No module of {type(root).__name__} declares its transformer blocks (_no_split_modules): give "
            "trainer.strategy.init_args.auto_wrap_policy the block classes to wrap, e.g. "
            "[transformers.models.llama.modeling_llama.LlamaDecoderLayer]"
        )
    return classes


class DeclaredBlocksWrapPolicy(ModuleWrapPolicy):
    """FSDP's auto-wrap policy for any Hugging Face architecture: each block the model declares
    (:func:`declared_block_classes`) becomes its own FSDP unit, as torch's ``ModuleWrapPolicy`` does for a
    hand-written list of classes (``configs/strategy/fsdp.yaml`` names this class, so the same overlay serves
    T5, GPT-2, Llama, Qwen, Mistral, Gemma, BART, ...)."""

    def __init__(self) -> None:
        super().__init__(set())

    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]):
        self._module_classes = declared_block_classes(root_module)
        self._module_classes_str = str(self._module_classes)
        return super()._run_policy(root_module, ignored_modules, root_kwargs)
