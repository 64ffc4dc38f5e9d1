"""Writes what ``predict`` returns into ``predictions.jsonl``, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.runtime import atomic_write


class PredictionWriter(BasePredictionWriter):
    """Collects the records of ``predict_step`` (a list of dicts per batch: ``id``, ``dialogue``,
    ``summary`` and, where a reward/evaluator is configured, ``score``) and writes them once, at the end, as
    one JSON object per line into ``<output_dir>/predictions.jsonl`` (a temporary sibling, then renamed, so a
    reader never sees half a file), and says where in one line. With several processes each writes
    ``predictions.rank<r>.jsonl``.

    Args:
        output_dir: folder of the file; None: the trainer's log directory (the run folder of a run's checkpoint;
            without one, lit-rlhf's ``trainer.default_root_dir``).
        filename: the file's name.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.filename = filename
        self.path: Path | None = None
        self.written: str | None = None
        """The line saying where the file is, once written (shown at the end of predict)."""

    def write_on_epoch_end(self, trainer, pl_module, predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        batches = list(predictions)
        if batches and batches[0] and isinstance(batches[0][0], list):  # several dataloaders: one list each
            batches = [batch for loader in batches for batch in loader]
        records = [record for batch in batches for record in batch]
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        name, stem, ext = self.filename, *os.path.splitext(self.filename)
        if trainer.world_size > 1:
            name = f"{stem}.rank{trainer.global_rank}{ext}"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.path = atomic_write(folder / name, text)
        if trainer.world_size > 1:
            self.written = f"Predictions written to {folder / f'{stem}.rank*{ext}'} (one file per process)"
        else:
            self.written = f"Predictions written to {self.path} ({len(records)} row{'' if len(records) == 1 else 's'})"

    def on_predict_end(self, trainer, pl_module) -> None:
        # said here, not when the file is written: the progress bar, still open at the epoch's end, would share
        # its line; lit-rlhf adds this writer after the bar, whose own on_predict_end closes it first
        if self.written:
            rank_zero_info(self.written)
            self.written = None
