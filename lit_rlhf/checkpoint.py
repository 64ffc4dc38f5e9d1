"""Checkpoint files that are either complete or absent.

Lightning's default writer saves into a temporary file elsewhere and then moves it; across file systems
the move is a copy, so a process killed during the copy leaves a truncated checkpoint under the final name.
``AtomicCheckpointIO`` writes next to the target, flushes to disk, then renames: on POSIX the rename is atomic,
so ``last.ckpt`` is always the last *complete* checkpoint.

``load_checkpoint`` reads one for the command line: a file torch cannot read (cut short by a full disk or a copy,
not a checkpoint at all) is one error naming ``--ckpt_path``, not torch's traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_rlhf.io import atomic_torch_save


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (``--ckpt_path``), loaded on the CPU the safe way (``weights_only=True``).

    Raises a ValueError naming the file when torch cannot read it: a truncated file ends in
    ``PytorchStreamReader failed reading zip archive``, other bytes in a pickle error of some kind."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # whatever torch.load raises, the file is not a checkpoint it can read
        raise unreadable_checkpoint(path, err) from err


def unreadable_checkpoint(path: str | Path, err: BaseException) -> ValueError:
    """The error for a ``--ckpt_path`` that torch could not load: the file, torch's reason in one sentence."""
    lines = str(err).strip().splitlines()
    reason = f"{type(err).__name__}: {lines[0].split('. ')[0]}" if lines else type(err).__name__
    return ValueError(f"--ckpt_path {path} is not a readable checkpoint ({reason}): a file cut short or not written "
                      f"by torch.save; give another checkpoint of the run (its checkpoints/ folder)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose ``save_checkpoint`` never leaves a partial file under the checkpoint's name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, path)


class InterruptCheckpoint(Checkpoint):
    """Saves ``last.ckpt`` beside the run's other checkpoints when fit stops on Ctrl-C or an error, so that
    ``--ckpt_path .../checkpoints/last.ckpt`` resumes it: Lightning's ``OnExceptionCheckpoint`` with the run's
    folder and file name.

    Not a subclass of ``OnExceptionCheckpoint``: with one of those present, Lightning turns every
    ``fit(ckpt_path=None)`` into ``ckpt_path="last"`` and silently resumes from whatever last checkpoint it finds.
    Saves only once this run has stepped the optimizer (a failed start leaves nothing to resume, and an older
    ``last.ckpt`` is kept). A stop inside a PPO step saves the weights as they are and the step count before
    that step: the resumed run redoes the step, so it is resumable but not bit-identical to an uninterrupted run.
    Under several processes only Ctrl-C saves (every process receives it); an error on one process would wait
    for the others at the save's barrier.
    """

    def __init__(self, filename: str = "last") -> None:
        super().__init__()
        self.filename = filename
        self.ckpt_path: str | None = None
        """Where the last save went (None until one)."""
        self._start_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._start_step is None or trainer.global_step == self._start_step:
            return
        if trainer.world_size > 1 and not isinstance(exception, KeyboardInterrupt):
            return
        periodic = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        folder = periodic[0].dirpath if periodic else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        self.ckpt_path = str(Path(folder) / f"{self.filename}.ckpt")
        if periodic:
            # recorded in the checkpoint: the resumed ModelCheckpoint then overwrites this file, not last-v1.ckpt
            periodic[0].last_model_path = self.ckpt_path
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero:
            print(f"\nStopped by {type(exception).__name__}; saved {self.ckpt_path} (resume with --ckpt_path)",
                  flush=True)
