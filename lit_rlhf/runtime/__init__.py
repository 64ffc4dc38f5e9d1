"""What a run needs around the math: distributed.py (reductions, agreed decisions, sharded weights, per-rank
RNG), io.py (atomic files, RNG states), checkpoint.py (atomic checkpoints, last.ckpt at the end and on Ctrl-C),
runs.py (run folders), threads.py, progress.py, guards.py (skipped steps), health.py (degenerate rollouts).

A bottom layer: imports nothing of lit_rlhf.
"""

from lit_rlhf.runtime.checkpoint import AtomicCheckpointIO, InterruptCheckpoint, load_checkpoint
from lit_rlhf.runtime.distributed import (
    DeclaredBlocksWrapPolicy,
    checkpoint_rng,
    clip_grad_norm,
    declared_block_classes,
    restore_checkpoint_rng,
)
from lit_rlhf.runtime.guards import SkipGuard
from lit_rlhf.runtime.health import DegenerateWatch, degenerate_reason, degenerate_rollout
from lit_rlhf.runtime.io import atomic_directory, atomic_write
from lit_rlhf.runtime.progress import ModelSummaryWithoutFlops, PPOProgressBar, RunProgressBar
from lit_rlhf.runtime.runs import (
    RunFolder,
    combine_with_checkpoint,
    given_model_keys,
    plain_values,
    remove_if_only_start_files,
    run_folder_of,
)
from lit_rlhf.runtime.threads import (
    AUTO_SINGLE_THREAD_BELOW,
    NumThreads,
    choose_num_threads,
    num_threads_errors,
    use_num_threads,
)

__all__ = [
    "AUTO_SINGLE_THREAD_BELOW",
    "AtomicCheckpointIO",
    "DeclaredBlocksWrapPolicy",
    "DegenerateWatch",
    "InterruptCheckpoint",
    "ModelSummaryWithoutFlops",
    "NumThreads",
    "PPOProgressBar",
    "RunFolder",
    "RunProgressBar",
    "SkipGuard",
    "atomic_directory",
    "atomic_write",
    "checkpoint_rng",
    "choose_num_threads",
    "clip_grad_norm",
    "combine_with_checkpoint",
    "declared_block_classes",
    "degenerate_reason",
    "degenerate_rollout",
    "given_model_keys",
    "load_checkpoint",
    "num_threads_errors",
    "plain_values",
    "remove_if_only_start_files",
    "restore_checkpoint_rng",
    "run_folder_of",
    "use_num_threads",
]
