"""Rows of the bundled DialogSum copy for the data tests, and ``DialogSumDataModule`` set up on them."""

import gzip
import json
from importlib import resources
from pathlib import Path

from lit_rlhf.data import DialogSumDataModule
from conftest import write_jsonl


def raw_rows(split: str) -> list[dict]:
    """The rows of a bundled file (``train``, ``dev``, ``test``), as the file holds them."""
    source = resources.files("lit_rlhf.assets.dialogsum").joinpath(f"dialogsum.{split}.jsonl.gz")
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def hub_like_rows(n: int, start: int = 0) -> list[dict]:
    """``n`` bundled train rows in the hub schema (``fname`` -> ``id``)."""
    rows = raw_rows("train")[start : start + n]
    keys = ("dialogue", "summary", "topic")
    return [{"id": r["fname"], **{k: r[k] for k in keys}} for r in rows]


def write_dialogs(folder: Path) -> Path:
    """A local dataset folder: 40 bundled train rows as ``train``, 5 others as ``validation``."""
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", hub_like_rows(40))
    write_jsonl(folder / "validation.jsonl", hub_like_rows(5, start=100))
    return folder


def ready(**kwargs) -> DialogSumDataModule:
    """A ``DialogSumDataModule`` of ``kwargs``, prepared and set up for fit."""
    dm = DialogSumDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm
