"""Checkpoint files that are either complete or absent.

Lightning's default writer saves into a temporary file elsewhere and then moves it; across file systems
the move is a copy, so a process killed during the copy leaves a truncated checkpoint under the final name.
``AtomicCheckpointIO`` writes next to the target, flushes to disk, then renames: on POSIX the rename is atomic,
so ``last.ckpt`` is always the last *complete* checkpoint.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_rlhf.io import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose ``save_checkpoint`` never leaves a partial file under the checkpoint's name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, path)
