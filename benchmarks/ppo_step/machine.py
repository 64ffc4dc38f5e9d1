"""The machine under the benchmark: log lines, peak RSS, phase timers, the GEMM rates and read bandwidth the
limits divide by, the CPU and library versions. Standard library only at import time (torch is imported where it
is used)."""

from __future__ import annotations

import math
import os
import platform
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ppo_step.settings import (BANDWIDTH_MIB, BANDWIDTH_MIB_TINY, BANDWIDTH_REPEATS, DECODE_ROWS, GEMM_REPEATS,
                               GEMM_REPEATS_TINY, ModelSize)


def log(msg: str) -> None:
    print(msg, flush=True)


def vm_kib(field_name: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryWatch:
    """Peak RSS of the setup (model loading) and of the steps, from /proc/self/status VmHWM."""

    def __init__(self) -> None:
        self.setup_peak_kib = 0
        self.steps_peak_kib = 0
        self.reset_ok = False
        self.rss_after_setup_kib = 0

    def start_steps(self) -> None:
        self.setup_peak_kib = vm_kib("VmHWM")
        self.rss_after_setup_kib = vm_kib("VmRSS")
        self.reset_ok = reset_peak_rss()

    def end_steps(self) -> None:
        self.steps_peak_kib = vm_kib("VmHWM")

    def report(self) -> dict[str, Any]:
        mib = 1 / 1024
        return {
            "rss_after_setup_mib": self.rss_after_setup_kib * mib,
            "setup_peak_mib": self.setup_peak_kib * mib,
            # without the reset, VmHWM after the steps is the whole process's peak
            "steps_peak_mib": self.steps_peak_kib * mib if self.reset_ok else float("nan"),
            "process_peak_mib": max(self.setup_peak_kib, self.steps_peak_kib) * mib,
            "peak_reset_ok": self.reset_ok,
        }


@contextmanager
def timed(store: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    store[name] = store.get(name, 0.0) + time.perf_counter() - start


def best_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """The shortest of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rate(threads: int, n: int = 2048, repeats: int = GEMM_REPEATS, dtype: str = "float32",
              shape: tuple[int, int, int] | None = None) -> float:
    """Best GEMM rate (FLOP/s) of an [m, k] x [k, n] matmul with ``dtype`` inputs on ``threads`` threads;
    ``shape`` (m, k, n), default n x n x n."""
    import torch

    torch.set_num_threads(threads)
    m, k, n = shape or (n, n, n)
    a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
    # one untimed call is enough warm-up for a single timed one (--tiny); more repeats get two
    return 2 * m * k * n / best_seconds(lambda: a @ b, repeats, warmup=min(2, repeats))


def read_bandwidth(threads: int, mib: int = BANDWIDTH_MIB, repeats: int = BANDWIDTH_REPEATS) -> float:
    """Best memory read rate (bytes/s): ``sum`` over an fp32 tensor of ``mib`` MiB on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.full((mib * 2**18,), 1.0)
    return x.numel() * 4 / best_seconds(x.sum, repeats, warmup=1)


def machine_rates(threads: int, dtype: str, size: ModelSize, tiny: bool) -> dict[str, Any]:
    """What the limits divide by, measured now: the 2048 x 2048 GEMM rate in fp32 and in bf16 (GFLOP/s), the
    read bandwidth (GB/s), and the GEMM rate of one decode step's shapes in ``dtype``: [b, d_model] x
    [d_model, d_ff] for each b of DECODE_ROWS."""
    repeats = GEMM_REPEATS_TINY if tiny else GEMM_REPEATS
    rows = {str(b): gemm_rate(threads, repeats=10 * repeats, dtype=dtype, shape=(b, size.d_model, size.d_ff)) / 1e9
            for b in DECODE_ROWS}
    bandwidth = read_bandwidth(threads, BANDWIDTH_MIB_TINY, 3) if tiny else read_bandwidth(threads)
    return {"gemm_gflops": gemm_rate(threads, repeats=repeats) / 1e9,
            "gemm_gflops_bf16": gemm_rate(threads, repeats=repeats, dtype="bfloat16") / 1e9,
            "read_gbps": bandwidth / 1e9,
            "gemm_rows_gflops": rows}


def log_rates(when: str, rates: dict[str, Any]) -> None:
    log(f"rates {when}: GEMM 2048x2048 fp32 {rates['gemm_gflops']:.0f} GFLOP/s, bf16 {rates['gemm_gflops_bf16']:.0f}; "
        f"read bandwidth {rates['read_gbps']:.1f} GB/s; decode-shape GEMM "
        + ", ".join(f"b {b}: {r:.0f}" for b, r in rates["gemm_rows_gflops"].items()) + f"; load {os.getloadavg()}")


def cpu_flags() -> str:
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    model, flags = "?", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return f"{model}; flags: {' '.join(w for w in wanted if w in flags)}"


def machine_description() -> str:
    return f"{platform.node()}, {os.cpu_count()} CPU cores, {cpu_flags()}"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "lightning", "trl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
