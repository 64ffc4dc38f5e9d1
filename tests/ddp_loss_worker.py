"""The PPO loss on 2 CPU processes (gloo), spawned by ``tests/runtime/test_ddp.py`` with ``torch.multiprocessing``.

Each process holds a mini-batch of its own (other rows, other response lengths, another padded width),
computes ``objectives.ppo_objective`` with the reduction the modules use (``distributed.all_reduce_sum`` on a
strategy that reduces in place, as Lightning's does on gloo) and averages the gradients over the processes,
as ``DistributedDataParallel`` does. The test compares them with one process's gradient on the two
mini-batches put together.

It imports torch and two torch-only modules of lit_rlhf, nothing else: a spawned process re-imports the
module its function lives in, and Lightning alone takes seconds to import.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from lit_rlhf.runtime import distributed as dist
from lit_rlhf import objectives
WORLD = 2
FEATURES = 4
NORM_CONSTANT = 6.0  # token_sum_norm's constant: the longest response allowed
CLIP, CLIP_VALUE, VF_COEF, KL_COEF = 0.2, 0.2, 0.1, 0.05


class TinyPolicy(nn.Module):
    """Per-token log-probabilities and values from features: [B, T, F] -> ([B, T], [B, T])."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # the same weights in every process
        self.policy = nn.Parameter(torch.randn(FEATURES, generator=generator))
        self.value = nn.Parameter(torch.randn(FEATURES, generator=generator))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return -nn.functional.softplus(features @ self.policy), features @ self.value


def minibatch(rank: int) -> dict[str, Tensor]:
    """Rank ``rank``'s mini-batch: rank 0 holds 2 rows of lengths 6 and 2, rank 1 holds 3 rows of 1, 4 and 2."""
    generator = torch.Generator().manual_seed(10 + rank)
    lengths = [[6, 2], [1, 4, 2]][rank]
    rows, width = len(lengths), max(lengths)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()  # [B, T]

    def noise(scale: float) -> Tensor:
        return torch.randn(rows, width, generator=generator) * scale

    features = torch.randn(rows, width, FEATURES, generator=generator)
    logprobs, values = (t.detach() for t in TinyPolicy()(features))
    # old log-probs away from the current ones, so that some ratios are clipped
    return {"features": features, "response_mask": mask, "old_logprobs": logprobs + noise(0.3),
            "old_values": values + noise(0.3), "advantages": noise(1.0), "returns": noise(1.0),
            "ref_logprobs": logprobs + noise(0.2)}


def objective(model: nn.Module, batch: dict[str, Tensor], mode: str, reduce_fn: objectives.ReduceFn) -> Tensor:
    """The PPO module's loss of one mini-batch: clipped surrogate + k3 KL term, plus vf_coef x value loss."""
    logprobs, values = model(batch["features"])
    loss, _ = objectives.ppo_objective(
        logprobs, batch["old_logprobs"], values, batch["old_values"], batch["advantages"], batch["returns"],
        batch["response_mask"], CLIP, CLIP_VALUE, VF_COEF, mode, NORM_CONSTANT, batch["ref_logprobs"], KL_COEF,
        reduce_fn=reduce_fn)
    return loss


def averaged(grad: Tensor) -> Tensor:
    """The gradient averaged over processes, as ``DistributedDataParallel`` leaves it after backward (wrapping
    the model in DDP would do the same, at seconds of start-up cost)."""
    torch.distributed.all_reduce(grad)
    return grad / WORLD


def reduce_in_place(t: Tensor, reduce_op: str) -> Tensor:
    """Lightning's ``strategy.reduce`` on gloo: an all-reduce that overwrites its input."""
    assert reduce_op == "sum"
    torch.distributed.all_reduce(t)
    return t


def run(rank: int, init_file: str, out_dir: str, modes: list[str]) -> None:
    """``torch.multiprocessing.spawn``'s function: each mode's DDP-averaged gradient into ``rank{r}.pt``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        trainer = SimpleNamespace(world_size=WORLD, strategy=SimpleNamespace(reduce=reduce_in_place))
        gradients = {}
        for mode in modes:
            model = TinyPolicy()
            objective(model, minibatch(rank), mode, partial(dist.all_reduce_sum, trainer)).backward()
            gradients[mode] = {name: averaged(p.grad) for name, p in model.named_parameters()}
        torch.save(gradients, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
