"""benchmarks/gpu_check.sh, the one prepared check for a CUDA machine, as a dry run on CPU with tiny sizes (its own
file: the longest single test, which pytest-xdist's per-file scheduling can then start on a free worker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --device cpu: PPO and GRPO steps with every lever, an exact resume, each
    policy-loss and scoring setting, the per-phase memory benchmark; the same script the GPU machine runs, on
    tiny sizes."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out"), "GPU_CHECK_CACHE": str(tmp_path / "cache"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--device", "cpu"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "out" / "GPU_RESULTS.md").read_text()
    assert "Exact resume: yes" in report and "| GRPO k=4, 2 steps | 2 |" in report
    assert "| tiny (64, 2, 2,000) | ppo bf16 ckpt 4x8+8 micro2 chunk2 |" in report  # the memory benchmark's table
    # each policy-loss and scoring setting ran its two steps (the on-policy exact rollout: first ratio exactly 1)
    assert report.count("| ok |") == 7, report
