"""torch's intra-op CPU threads for a run: ``model.num_threads`` of PPOModule and SFTModule.

A small model runs thousands of tiny ops per step, and each multi-threaded op ends at an OpenMP barrier that
waits for every thread: when another process shares the cores, one descheduled thread stalls every op. On 2
cores the embedded default PPO step (0.67M parameters) took 0.46 s on 2 threads and 0.59 s on 1 with nothing
else running, but 21.6 s on 2 threads and 0.65 s on 1 beside a process multiplying matrices on 2 threads
(benchmarks/RESULTS_NEIGHBOUR.md). Larger models gain more from the cores (1.6-1.8x from 5M to 65M
parameters) and are the ones worth the risk; one thread also makes a small model's results independent of
the machine's core count (a thread count changes the order of float sums).

``"auto"`` (the default) therefore uses one thread below ``AUTO_SINGLE_THREAD_BELOW`` parameters and torch's
default above, shared among the run's processes on the machine; an ``OMP_NUM_THREADS`` in the environment
(the user's, or the share of the cores Lightning gives each process of a multi-process CPU run) is kept;
an integer is used as given; None leaves torch's setting alone.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Union

import torch
from lightning.pytorch.utilities import rank_zero_info

NumThreads = Union[int, Literal["auto"], None]
"""``model.num_threads``: a thread count, ``"auto"`` (by the model's size) or None (torch's own setting)."""

AUTO_SINGLE_THREAD_BELOW = 10_000_000
"""Policies with fewer parameters run on one thread under ``"auto"``: the embedded models (0.3M to 5.3M);
hub models (t5-small 60M and up) keep all cores. Measured on T5s of 0.7M to 65M parameters
(``benchmarks/bench_neighbour.py --crossover``): 2 cores gained 1.3x at 0.7M, 1.5x at 1.9M and 1.6-1.8x from
5.3M up on a quiet machine, and lost 3-33x beside a 2-thread neighbour at every size."""


def num_threads_errors(value: Any, flag: str = "model.num_threads") -> list[str]:
    """The setting's problems (empty when valid), each naming ``flag``."""
    if value is None or value == "auto":
        return []
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return [f"{flag} must be a thread count >= 1, 'auto' or null, got {value!r}"]
    return []


def choose_num_threads(
    setting: NumThreads, parameters: int, current: int, environment: str | None = None, cpus: int | None = None,
    local_processes: int = 1,
) -> tuple[int, str]:
    """The intra-op thread count for ``setting`` and why, as ``(threads, reason)``. Pure: no torch state read.

    Args:
        setting: ``model.num_threads``.
        parameters: the policy's parameter count.
        current: torch's thread count now (``torch.get_num_threads()``: its default, or OMP_NUM_THREADS).
        environment: the value of ``OMP_NUM_THREADS`` (None when unset).
        cpus: CPUs this process may use (default: all of them).
        local_processes: processes of the run on this machine (they share its cores).
    """
    if setting is None:
        return current, "model.num_threads=null keeps torch's setting"
    if setting != "auto":
        return int(setting), f"model.num_threads={setting}"
    if environment:
        return current, f"OMP_NUM_THREADS={environment} is set"
    if parameters < AUTO_SINGLE_THREAD_BELOW:
        return 1, f"model.num_threads=auto: fewer than {AUTO_SINGLE_THREAD_BELOW:,} parameters"
    share = max(1, (cpus or os.cpu_count() or 1) // max(1, local_processes))
    return min(current, share), "model.num_threads=auto: torch's default for a large model"


def use_num_threads(setting: NumThreads, policy: Any, trainer: Any = None) -> int:
    """Set torch's intra-op threads for a run of ``policy`` (a ``lit_rlhf.models.policy.Policy``, or any torch module:
    its parameter count decides ``auto``) and log the choice once (rank zero). Call in the LightningModule's
    ``configure_model``: it runs in every process after the launch."""
    if hasattr(policy, "parameter_counts"):
        parameters = int(policy.parameter_counts()["all model parameters"])
    else:
        parameters = sum(p.numel() for p in policy.parameters())
    local = int(getattr(trainer, "num_devices", 1) or 1) if trainer is not None else 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads, reason = choose_num_threads(setting, parameters, torch.get_num_threads(),
                                         os.environ.get("OMP_NUM_THREADS"), cpus, local)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    rank_zero_info(f"Using {threads} intra-op CPU thread{'s' if threads != 1 else ''} ({reason}; the model has "
                   f"{parameters:,} parameters; set model.num_threads to override)")
    return threads
