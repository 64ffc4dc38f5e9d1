"""What both systems' workers share (standard library only at import time: the TRL side runs in its own
environment, without lit_rlhf): the reward, the step's phase record, the warm-up length."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

PHASES = ("generate", "reward", "scoring", "update", "other")
WARMUP_NEW_TOKENS = 8  # warm-up steps generate this many tokens per response (not measured)


def stub_reward(texts: list[str]) -> list[float]:
    """Deterministic pseudo-scores in [-0.5, 0.5), free: the same function on both sides."""
    return [(sum(map(ord, t)) % 1000) / 1000 - 0.5 for t in texts]


def phase_seconds(phases: dict[str, float], total: float) -> dict[str, float]:
    rec = {p: float(phases.get(p, 0.0)) for p in PHASES if p != "other"}
    rec["other"] = max(0.0, total - sum(rec.values()))
    rec["total"] = total
    return rec


def step_record(phases: dict[str, float], total: float, lengths: list[int], prompt_lengths: list[int],
                cpu_phases: dict[str, float], cpu_total: float) -> dict[str, Any]:
    """One step's wall seconds per phase (``other``: the rest of the step), total, the same in the process's CPU
    seconds (``cpu``: what co-tenants taking turns on the cores do not add), and the tokens it saw."""
    rec: dict[str, Any] = phase_seconds(phases, total)
    rec["cpu"] = phase_seconds(cpu_phases, cpu_total)
    rec["response_lengths"] = sorted(set(lengths))
    rec["prompt_lengths"] = sorted(set(prompt_lengths))
    rec["rows"] = len(lengths)
    return rec


@contextmanager
def timed(store: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall seconds of the block to ``store[name]`` and its CPU seconds to ``store["cpu:" + name]``."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        store[name] = store.get(name, 0.0) + time.perf_counter() - start
        store["cpu:" + name] = store.get("cpu:" + name, 0.0) + time.process_time() - cpu


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def new_tokens(step: int, warmup: int, measured: int) -> int:
    return WARMUP_NEW_TOKENS if step < warmup else measured


def profile_table(prof, rows: int = 25) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
