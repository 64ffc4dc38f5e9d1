"""Where prompt data comes from: a hub dataset, a local file or folder, or a copy bundled with lit_rlhf.

    load_source          ``dataset`` setting -> ``datasets.DatasetDict`` (splits by name)
    read_data_files      one file or a folder of files of one format -> one ``datasets.Dataset`` (predict inputs)
    load_local_directory files named by split (``train*``, ``validation*``/``dev*``, ``test*``) -> splits
    drop_blank_rows      rows -> the rows that hold what a ``RowTexts`` rule asks (the others counted)
    first_null           the id of the first row with no value in a column (a reward's column checked before a run)
    keyed_to_this_code   rows whose datasets cache key covers lit_rlhf's own code (load_source, read_data_files)

Every error a user can cause (no such path, an empty file, a file datasets cannot parse, mixed formats) is one
line naming the setting and the file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_rlhf.models import looks_like_local_path

# `datasets` is imported where it is used: it takes ~1.5 s to import, which `lit-rlhf fit --help` need not pay.
# Annotations naming `datasets.Dataset`/`DatasetDict` are text only (postponed annotations).

FILE_FORMATS = {
    ".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".csv": "csv", ".csv.gz": "csv",
    ".parquet": "parquet",
}
"""File endings datasets reads, and the datasets builder of each."""

SPLIT_PREFIXES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
"""Local-directory sources: a file belongs to the split its name starts with."""

BUNDLED = {"dialogsum": "lit_rlhf.data.dialogsum:load_bundled_dialogsum",
           "dialogsum-pairs": "lit_rlhf.data.sampled_pairs:load_bundled_pairs",
           "arithmetic": "lit_rlhf.data.arithmetic:load_bundled_arithmetic",
           "arithmetic-tools": "lit_rlhf.data.arithmetic:load_bundled_arithmetic_tools",
           "arithmetic-questions": "lit_rlhf.data.arithmetic:load_bundled_arithmetic_questions"}
"""``bundled:<name>`` sources: the function (``module:function``) returning the copy shipped with lit_rlhf."""


@contextlib.contextmanager
def quiet_datasets_progress() -> Iterator[None]:
    """datasets' progress bars off inside the block (or the decorated function), back to the user's setting after.

    For lit_rlhf's own ``map``/``filter`` calls: each is a second or less, and their bars were a tenth of a run's
    log. ``HF_DATASETS_DISABLE_PROGRESS_BARS``, when set, decides as in datasets itself. The switch is datasets'
    process-wide one, so a thread that runs datasets inside the block is quiet too.
    """
    from datasets import config
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def file_format(name: str) -> str | None:
    """The datasets builder for a file name (``json``, ``csv``, ``parquet``), or None when it is none of them."""
    return next((fmt for ext, fmt in FILE_FORMATS.items() if name.endswith(ext)), None)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load(fmt: str, data_files: dict[str, list[str]] | list[str], setting: str) -> datasets.DatasetDict:
    """datasets' builder over the files, after checking none is empty; a parse error becomes one line."""
    import datasets

    files = [f for group in (data_files.values() if isinstance(data_files, dict) else [data_files]) for f in group]
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise ValueError(f"{setting}: {empty[0]} is empty; give it rows or remove it")
    try:
        return datasets.load_dataset(fmt, data_files=data_files)
    except Exception as err:  # datasets raises many types for a malformed file
        raise ValueError(f"{setting}: {', '.join(files)} could not be read: {_first_line(err)}") from err


def load_local_directory(directory: str, setting: str = "data.dataset") -> datasets.DatasetDict:
    """Files named by split (``train*``, ``validation*``/``valid*``/``dev*``, ``test*``), all of one format."""
    data_files: dict[str, list[str]] = {}
    formats: set[str] = set()
    for name in sorted(os.listdir(directory)):
        fmt = file_format(name)
        split = next((s for s, prefixes in SPLIT_PREFIXES.items() if name.startswith(prefixes)), None)
        if fmt is not None and split is not None:
            data_files.setdefault(split, []).append(os.path.join(directory, name))
            formats.add(fmt)
    if not data_files:
        raise ValueError(
            f"{setting}={directory!r} has no data files: expected files named train*, validation* (or dev*) "
            f"and test* ending in {', '.join(FILE_FORMATS)}; found {sorted(os.listdir(directory))}"
        )
    if len(formats) > 1:
        raise ValueError(f"{setting}={directory!r} mixes file formats {sorted(formats)}; keep one format per directory")
    return _load(formats.pop(), data_files, f"{setting}={directory!r}")


def load_bundled(name: str) -> datasets.DatasetDict:
    """The dataset shipped with lit_rlhf under ``name`` (``bundled:dialogsum``)."""
    if name not in BUNDLED:
        raise ValueError(f"data.dataset='bundled:{name}' is not bundled with lit_rlhf; bundled: "
                         f"{', '.join('bundled:' + n for n in BUNDLED)}")
    module, function = BUNDLED[name].split(":")
    return getattr(importlib.import_module(module), function)()


def load_source(dataset: str) -> datasets.DatasetDict:
    """The ``dataset`` setting's splits: ``bundled:<name>``, a local folder (files named by split), a local
    file (one split, ``train``) or a hub dataset name; keyed to this code (:func:`keyed_to_this_code`)."""
    import datasets

    return datasets.DatasetDict({name: keyed_to_this_code(rows) for name, rows in _load_source(dataset).items()})


def _load_source(dataset: str) -> datasets.DatasetDict:
    if dataset.startswith("bundled:"):
        return load_bundled(dataset.removeprefix("bundled:"))
    local = os.path.expanduser(dataset)
    if os.path.isdir(local):
        return load_local_directory(local)
    if os.path.isfile(local):
        fmt = file_format(local)
        if fmt is None:
            raise ValueError(f"data.dataset={dataset!r}: expected a {', '.join(FILE_FORMATS)} file")
        return _load(fmt, {"train": [local]}, f"data.dataset={dataset!r}")
    if looks_like_local_path(dataset) or file_format(dataset) is not None:
        raise ValueError(
            f"data.dataset={dataset!r} is not a directory or a data file here: give a jsonl/json/csv/parquet file, a "
            "directory of train*/validation*/test* files, 'bundled:dialogsum', or a hub dataset name"
        )
    import datasets

    return datasets.load_dataset(dataset)


def read_data_files(path: str | None, setting: str) -> datasets.Dataset:
    """Rows of one file, or of a folder of files of one format (the others in it are ignored), as one Dataset.
    Errors name ``setting`` and the file, in one line."""
    if path is None:
        raise ValueError(f"give --{setting} (a jsonl, csv or parquet file or folder)")
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        raise ValueError(f"{setting}={path!r} does not exist")
    files = [os.path.join(local, n) for n in sorted(os.listdir(local))] if os.path.isdir(local) else [local]
    typed = [(f, file_format(f)) for f in files]
    if os.path.isdir(local):
        typed = [(f, fmt) for f, fmt in typed if fmt is not None]
    formats = {fmt for _, fmt in typed}
    if not typed or None in formats:
        raise ValueError(f"{setting}={path!r}: expected a {', '.join(FILE_FORMATS)} file or a folder of them")
    if len(formats) > 1:
        raise ValueError(f"{setting}={path!r} mixes file formats {sorted(formats)}; keep one format")
    rows = _load(formats.pop(), [f for f, _ in typed], f"{setting}={path!r}")["train"]
    if len(rows) == 0:
        raise ValueError(f"{setting}={path!r} has no rows")
    return keyed_to_this_code(rows)


# ------------------------------------------------------------------------------------------------ the cache key


@functools.cache
def code_digest() -> str:
    """A digest of lit_rlhf's own Python files: it changes whenever the code that encodes rows may have."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]  # all of lit_rlhf: encoding reads models/ and rewards/ too
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def keyed_to_this_code(rows: datasets.Dataset) -> datasets.Dataset:
    """``rows`` (all of them, no copy) under a fingerprint that also covers :func:`code_digest`.

    datasets caches each ``map``/``filter`` result on disk under a key made of its input's fingerprint and the
    function, which it names by its import path when it can be imported (its code is not read): without this, a
    changed lit_rlhf (a new version, an edited checkout) would reuse the encodings an older one cached (prompts cut
    by the old rule, say). Every later transform's key derives from this fingerprint, so none can cross versions.
    """
    from datasets.fingerprint import Hasher

    fingerprint = Hasher.hash([rows._fingerprint, code_digest()])
    return rows.select(range(len(rows)), new_fingerprint=fingerprint)


# ---------------------------------------------------------------------------------------------- null and empty rows


def is_blank(value: Any) -> bool:
    """Whether a prompt or response value holds nothing to train on: null, a text of whitespace only, or a
    conversation that is empty, has a null message, or ends in a blank message (its last turn is the prompt's
    question or the response)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        contents = [m.get("content") if isinstance(m, dict) else m for m in value]
        return not contents or any(c is None for c in contents) or is_blank(contents[-1])
    return False


@dataclass(frozen=True)
class RowTexts:
    """What a row must hold to be used (``drop_blank_rows``), the one rule for prompts, SFT rows, preference pairs
    and predict rows.

    A column of ``texts`` (a plain prompt column, a conversation, an SFT completion, a preference response) must
    hold text (:func:`is_blank`). A ``template`` prompt is built from its ``fields``: a null field skips the row
    (it would render as the text "None"), an empty one is fine (an Alpaca-style row's empty ``input``), and the row
    is skipped only when the rendered prompt is blank."""

    texts: tuple[str, ...] = ()
    template: str | None = None
    fields: tuple[str, ...] = ()
    """The ``template``'s placeholders (``formats.template_fields``)."""

    def within(self, columns: Sequence[str]) -> RowTexts:
        """This rule on the ``columns`` a source has (a conversation pair has no prompt column to check)."""
        texts = tuple(c for c in dict.fromkeys(self.texts) if c in columns)
        return RowTexts(texts, self.template, self.fields)

    def is_blank(self, row: dict[str, Any]) -> bool:
        """Whether ``row`` lacks a text this rule asks for."""
        if any(is_blank(row[c]) for c in self.texts):
            return True
        if self.template is None:
            return False
        if any(row[f] is None for f in self.fields):
            return True
        return not self.template.format_map({f: row[f] for f in self.fields}).strip()

    def columns(self) -> list[str]:
        return list(dict.fromkeys([*self.fields, *self.texts]))

    def in_words(self) -> str:
        """What a skipped row lacks, for the warning and the error: "a null or empty 'prompt'", "a null
        'instruction' or 'input' or a blank prompt"."""
        parts = [f"a null {' or '.join(map(repr, self.fields))}"] if self.template is not None and self.fields else []
        if self.template is not None:
            parts.append("a blank prompt")
        if self.texts:
            parts.append(f"a null or empty {' or '.join(map(repr, self.texts))}")
        return " or ".join(parts) or "nothing"


@dataclass
class SkippedRows:
    """Rows skipped for a null or empty prompt or response: how many, and the first one's id (for the message)."""

    count: int = 0
    first_id: str | None = None

    def add(self, ids: Sequence[Any]) -> None:
        if ids and self.first_id is None:
            self.first_id = str(ids[0])
        self.count += len(ids)

    def summary(self) -> dict[str, int | str]:
        """``skipped_empty`` and ``first_skipped_empty`` (the first skipped row's id), when any row was skipped."""
        return {} if not self.count else {"skipped_empty": self.count, "first_skipped_empty": self.first_id}


def drop_blank_rows(rows: datasets.Dataset, rule: RowTexts, skipped: SkippedRows,
                    where: str) -> datasets.Dataset:
    """``rows`` without those that break ``rule`` (:class:`RowTexts`: a null value, or a blank prompt or
    response): those are counted in ``skipped``, never trained on as the text "None" or as an empty prompt.
    ``rows`` need an ``id`` column. Raises when no row is left (``where`` names the data setting)."""
    rule = rule.within(rows.column_names)
    columns = rule.columns()
    if not columns:
        return rows
    blank = [rule.is_blank(dict(zip(columns, values))) for values in zip(*(rows[c] for c in columns))]
    if not any(blank):
        return rows
    ids = list(rows["id"])
    dropped = [ids[i] for i, b in enumerate(blank) if b]
    skipped.add(dropped)
    if len(dropped) == len(rows):
        raise ValueError(f"{where}: every row has {rule.in_words()} (the first: row {str(dropped[0])!r}); nothing is "
                         "left to use")
    return rows.select([i for i, b in enumerate(blank) if not b])


def first_null(rows: datasets.Dataset, column: str) -> str | None:
    """The id of the first row of ``rows`` with no value (null, or absent from its JSON line) in ``column``."""
    if column not in rows.column_names:
        return None
    return next((str(i) for i, v in zip(rows["id"], rows[column]) if v is None), None)
