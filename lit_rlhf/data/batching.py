"""Prompt rows into batches: padding, the collator, and the seeded, resumable stream of training batches.

    pad                  token-id lists -> ids and mask, padded on one side (lit_rlhf.models.pad_rows)
    PromptCollator       rows -> a padded batch (tensors for the model, lists for rewards and logs)
    PromptStreamSampler  the seeded stream of training batches, resumable, one slice per process
    length_grouped       a stream order regrouped into batches of similar-length rows
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch.utils.data import DistributedSampler

from lit_rlhf.models import pad_rows as pad


@dataclass(frozen=True)
class PromptCollator:
    """Pads a list of rows into a batch: tensors for the model, lists of strings for rewards and logs.

    ``padding_side`` comes from the model kind: ``"right"`` for encoder-decoder models (as T5 tokenizers pad;
    the encoder masks padding wherever it is), ``"left"`` for decoder-only models, so that generation
    continues right after each prompt's last token rather than after padding. ``reference_column``: the row
    value that becomes ``reference`` (None: the batch has no references). ``columns``: source columns carried
    under ``batch["columns"]`` for rewards. ``record_names``: the input and output names of a prediction record
    (``predict`` writes the row's ``record_names[0]`` and the response under ``record_names[1]``).
    """

    pad_token_id: int
    padding_side: Literal["left", "right"]
    reference_column: str | None = None
    columns: tuple[str, ...] = ()
    record_names: tuple[str, str] = ("prompt", "response")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad([row["input_ids"] for row in rows], self.pad_token_id, self.padding_side)
        labels = {}
        if "summary_ids" in rows[0]:
            # supervised fine-tuning: the completion is the response, right-padded as generate returns it
            summary_ids, summary_mask = pad([row["summary_ids"] for row in rows], self.pad_token_id, "right")
            labels = {"summary_ids": summary_ids, "summary_mask": summary_mask}
        source = self.record_names[0]
        return {
            **labels,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query": [row["query"] for row in rows],
            "reference": None if self.reference_column is None else [row.get(self.reference_column) for row in rows],
            source: [row.get(source) for row in rows],
            "id": [row["id"] for row in rows],
            "prompt": [row["prompt"] for row in rows],
            "columns": {name: [row.get(name) for row in rows] for name in self.columns},
            "record_names": self.record_names,
        }


class PromptStreamSampler(DistributedSampler):
    """This process's share of a seeded stream of training batches, starting where training left off.

    The stream is epoch after epoch of a permutation of the training rows (seed + epoch; no shuffle: file
    order). Stream batch ``k`` holds ``num_replicas x batch_size`` rows, and process ``rank`` takes its
    ``batch_size`` slice. Iteration starts at batch ``position_fn()`` (the batches training has taken), so a
    resumed run sees exactly the rows an uninterrupted one would, with any number of processes. ``lengths``
    (one per row): each epoch's stream batches hold rows of similar length (:func:`length_grouped`). A
    DistributedSampler subclass, so Lightning keeps it under DDP instead of swapping in its own.
    """

    def __init__(
        self, dataset_size: int, batch_size: int, num_replicas: int, rank: int, seed: int, shuffle: bool,
        position_fn: Callable[[], int], lengths: list[int] | None = None,
    ) -> None:
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.position_fn = position_fn
        self.lengths = lengths
        self.batches_per_epoch = dataset_size // (batch_size * num_replicas)

    def _start(self) -> tuple[int, int]:
        return divmod(self.position_fn(), self.batches_per_epoch)  # (stream epoch, batch within it)

    def epoch_order(self, epoch: int) -> list[int]:
        """Every row of stream epoch ``epoch`` in stream order (the rows of whole stream batches only)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        if self.lengths is None:
            return order
        return length_grouped(order, self.lengths, self.batch_size * self.num_replicas,
                              generator if self.shuffle else None)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self._start()
        order = self.epoch_order(epoch)
        per_step = self.batch_size * self.num_replicas
        for k in range(start, self.batches_per_epoch):
            first = k * per_step + self.rank * self.batch_size
            yield from order[first : first + self.batch_size]

    def __len__(self) -> int:
        # The whole epoch's share, also when iteration starts mid-epoch: a resumed Lightning loop restores its
        # count of the epoch's batches already done and goes on counting from there, and it takes the batch at
        # which that count reaches len(loader) as the epoch's last (where gradient accumulation is flushed into
        # an optimizer step, and epoch-end validation and schedulers run). The remaining batches only would end
        # a resumed epoch early.
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the stream position, not Lightning's epoch counter, picks the permutation."""


def length_grouped(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator | None,
                   chunk: int = 50) -> list[int]:
    """``order`` regrouped into batches of similar-length rows: cut into chunks of ``chunk`` batches, each chunk
    sorted by length and cut into batches, the batches then shuffled with ``generator`` (None: kept in order).
    Only the rows of whole batches are kept."""
    order = order[: len(order) // batch_size * batch_size]
    span = chunk * batch_size
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    if generator is not None:
        batches = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in batches for i in batch]
