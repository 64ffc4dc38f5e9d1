"""Checkpoint files that are either complete or absent.

Lightning's default writer saves into a temporary file elsewhere and then moves it; across file systems
the move is a copy, so a process killed during the copy leaves a truncated checkpoint under the final name.
``AtomicCheckpointIO`` writes next to the target, flushes to disk, then renames: on POSIX the rename is atomic,
so ``last.ckpt`` is always the last *complete* checkpoint.

``InterruptCheckpoint`` keeps ``last.ckpt`` the run's last complete step: saved at the end of fit, and on Ctrl-C
after the step in progress (never a half-updated step), so resuming it is the uninterrupted run.

``load_checkpoint`` reads one for the command line: a file torch cannot read (cut short by a full disk or a copy,
not a checkpoint at all) is one error naming ``--ckpt_path``, not torch's traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_rlhf.runtime.distributed import any_rank
from lit_rlhf.runtime.io import atomic_torch_save


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
    """Saves ``last.ckpt`` beside the run's other checkpoints at the end of fit, and when fit stops on Ctrl-C or
    an error, so that ``--ckpt_path .../checkpoints/last.ckpt`` resumes the run (or ``test`` measures its end).

    Every save happens between two training steps, where a periodic checkpoint is taken: weights, optimizer,
    step counts, data position, random-number states and the module's own state (a PPO KL controller) all
    describe the same moment, and a resumed run goes on exactly as an uninterrupted one. A step cut in the
    middle would leave them apart (the prompt batch taken, the random streams advanced by the rollout, some
    mini-batch updates made), so Ctrl-C during a training step lets that step finish, then saves and stops; a
    second Ctrl-C stops at once, keeping the last complete checkpoint. With ``trainer.accumulate_grad_batches``
    the stop waits for the optimizer step that ends the accumulation: a checkpoint holds no accumulated
    gradients, so one saved in between would resume without them. An error during a step saves nothing
    (the last complete checkpoint is kept); Ctrl-C or an error between steps (validation, a callback) saves at
    once.

    Not a subclass of ``OnExceptionCheckpoint``: with one of those present, Lightning turns every
    ``fit(ckpt_path=None)`` into ``ckpt_path="last"`` and silently resumes from whatever last checkpoint it finds.
    Saves only once this run has stepped the optimizer (a failed start leaves nothing to resume, and an older
    ``last.ckpt`` is kept). Under several processes the decision to stop after a step is taken together (any
    process that received Ctrl-C stops them all after the same step), and an error saves nothing: the other
    processes would wait for it at the save's barrier.
    """

    def __init__(self, filename: str = "last") -> None:
        super().__init__()
        self.filename = filename
        self.ckpt_path: str | None = None
        """Where the last save went (None until one)."""
        self._start_step: int | None = None
        self._trainer: Any = None
        self._stop_requested = False  # Ctrl-C arrived during a step: stop after it
        self._stopped_after_step = False  # the stop's checkpoint is written: on_exception has nothing to add
        self._step_at_batch_start = 0  # trainer.global_step when the current training batch began
        self._accumulating = False  # the last training batch's gradients wait for a later optimizer step
        self._previous_handler: Any = None

    # ------------------------------------------------------------------ Ctrl-C

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step, self._trainer = trainer.global_step, trainer
        self._stop_requested = self._stopped_after_step = self._accumulating = False
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        trainer = self._trainer
        # several processes receive Ctrl-C at slightly different points: between two steps too, they wait for
        # the next step's end, where they decide together (one stopping alone would hang the others)
        # (and between the batches of an accumulated gradient, which wait for its optimizer step)
        defer = in_training_step(trainer) or self._accumulating or (trainer.world_size > 1 and trainer.training)
        if self._stop_requested or not defer:
            raise KeyboardInterrupt
        self._stop_requested = True
        if trainer.is_global_zero:
            print("\nCtrl-C: finishing this step, then saving last.ckpt and stopping (Ctrl-C again stops at once; "
                  "the run then resumes from its last complete checkpoint)", file=sys.stderr, flush=True)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # gradients accumulated over several batches: only a batch that stepped the optimizer ends a step whose
        # whole state a checkpoint holds (the same decision on every process)
        self._accumulating = (pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1
                              and trainer.global_step == self._step_at_batch_start)
        # a checkpoint callback runs after the others: this is where ModelCheckpoint has just saved
        if run_ends_here(trainer):  # (the same on every process) the run saves and exports as usual
            self._restore_handler()  # what comes after the last step (an "after" measurement) stops at once
            return
        if self._accumulating or not any_rank(trainer, self._stop_requested, pl_module.device):
            return
        self._save(trainer)
        self._stopped_after_step = True
        if trainer.is_global_zero:
            print(f"Stopped by Ctrl-C after {step_name(pl_module, trainer)}; saved {self.ckpt_path} "
                  "(resume with --ckpt_path)", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    # ------------------------------------------------------------------ the end of fit, errors

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()
        if self._start_step is not None and trainer.global_step != self._start_step:
            self._save(trainer)  # the last step, which a periodic checkpoint may not have caught

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:
            self._save_on_exception(trainer, pl_module, exception)
        finally:
            self._restore_handler()

    def _save_on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._stopped_after_step or self._start_step is None or trainer.global_step == self._start_step:
            return
        if trainer.world_size > 1 and not isinstance(exception, KeyboardInterrupt):
            return
        if in_training_step(trainer) or self._accumulating:
            if trainer.is_global_zero:
                where = "inside a training step, whose state is half-updated" if in_training_step(trainer) else (
                    "between the batches of an accumulated gradient (trainer.accumulate_grad_batches)")
                print(f"\nStopped by {type(exception).__name__} {where}: nothing saved; resume from the run's last "
                      f"complete checkpoint in {self._folder(trainer)}", file=sys.stderr, flush=True)
            return
        self._save(trainer)
        if trainer.is_global_zero:
            print(f"\nStopped by {type(exception).__name__}; saved {self.ckpt_path} (resume with --ckpt_path)",
                  file=sys.stderr, flush=True)

    @staticmethod
    def _periodic(trainer) -> list[ModelCheckpoint]:
        return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]

    def _folder(self, trainer) -> Path:
        """The periodic checkpoints' folder, else ``<log_dir>/checkpoints``."""
        periodic = self._periodic(trainer)
        if periodic:
            return Path(periodic[0].dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def _save(self, trainer) -> None:
        periodic = self._periodic(trainer)
        self.ckpt_path = str(self._folder(trainer) / f"{self.filename}.ckpt")
        if periodic:
            # recorded in the checkpoint: the resumed ModelCheckpoint then overwrites this file, not last-v1.ckpt
            periodic[0].last_model_path = self.ckpt_path
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # the whole state (says so: no log line)


def in_training_step(trainer) -> bool:
    """Whether a training batch is in flight: taken from the loader and not yet through ``training_step`` and
    the optimizer (Lightning counts a batch processed right after them, before ``on_train_batch_end``)."""
    if trainer is None or not trainer.training:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return progress.ready > progress.processed


def run_ends_here(trainer) -> bool:
    """Whether fit ends after the current step: the module stopped it (PPO's ``model.ppo_steps``) or
    ``trainer.max_steps`` is reached."""
    return trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step


def step_name(pl_module, trainer) -> str:
    """``PPO step 57`` for a module counting PPO steps, else ``step 57`` (optimizer steps)."""
    ppo_step = getattr(pl_module, "ppo_step", None)
    return f"PPO step {ppo_step}" if ppo_step is not None else f"step {trainer.global_step}"
