"""The row pipeline of ``PromptDataModule``: from a source's splits to the encoded training and held-out rows.

Each split is read and checked (the columns the settings name), rows without a prompt (or, with labels, a
completion) are skipped and counted, the length filter applies, the rows are encoded (``encode_prompts``) and the
prompts over their limit dropped and counted; the same rules read ``predict_path``'s rows.
"""

from __future__ import annotations

from collections import Counter
from math import ceil
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_rlhf.data.formats import DERIVED_COLUMNS, PROMPT_FIT, PromptFormat, encode_prompts, with_string_ids
from lit_rlhf.data.sources import SkippedRows, drop_blank_rows, load_source, quiet_datasets_progress, read_data_files


def _length_in_range(values: list[Any], min_chars: int, max_chars: int | None) -> list[bool]:
    return [min_chars < len(str(v)) <= (max_chars if max_chars is not None else float("inf")) for v in values]


def _fits(prompt_fit: list[str]) -> list[bool]:
    return [how != "too_long" for how in prompt_fit]


class PromptRows:
    """The row pipeline of ``PromptDataModule`` (its base): ``build_splits`` for training and held-out rows,
    ``predict_rows`` for predict. It reads the data module's settings and ``tokenizer`` and calls its
    ``load_tokenizer``, ``prompt_format``, ``text_columns`` and ``required_columns``; a subclass encodes its own rows
    by overriding ``encode_rows`` (and ``read_predict_rows``/``encode_predict_rows`` for predict)."""

    def _drop_blank(self, rows: datasets.Dataset, where: str, predict: bool = False) -> datasets.Dataset:
        """``rows`` without those with a null or empty prompt or response, counted in ``empty_rows`` and warned
        about once with the first one's id; the one check every data module and predict apply."""
        empty = self.empty_rows
        before = empty.count
        rule = self.text_columns(predict)
        kept = drop_blank_rows(rows, rule, empty, where)
        if empty.count > before:
            rank_zero_warn(f"{where}: skipped {empty.count - before} rows with "
                           f"{rule.within(rows.column_names).in_words()} (the first: row {empty.first_id!r})")
        return kept

    def _source_split(self, source: datasets.DatasetDict, split: str, setting: str) -> datasets.Dataset:
        if split not in source:
            raise ValueError(f"{setting}={split!r} is not in data.dataset={self.dataset!r}; it has {sorted(source)}")
        rows = source[split]
        if len(rows) == 0:
            raise ValueError(f"data.dataset={self.dataset!r} {setting}={split!r} has no rows")
        self._check_columns(rows.column_names, f"data.dataset={self.dataset!r} {setting}={split!r}")
        if "id" not in rows.column_names:
            rows = rows.add_column("id", [str(i) for i in range(len(rows))])
        return rows

    def _check_columns(self, columns: list[str], where: str) -> None:
        required = self.required_columns()
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"{where} lacks the column(s) {missing}: it has {columns}, and {required} are needed (named by "
                "data.prompt_column/template/messages_column/reference_column/completion_column/filter_column)"
            )

    @quiet_datasets_progress()
    def _filter(self, rows: datasets.Dataset, split: str) -> datasets.Dataset:
        if self.filter_column is None:
            return rows
        kept = rows.filter(_length_in_range, input_columns=self.filter_column, batched=True,
                           fn_kwargs={"min_chars": self.min_chars, "max_chars": self.max_chars})
        if len(kept) == 0:
            lengths = [len(str(v)) for v in rows[self.filter_column]] or [0]
            raise ValueError(
                f"data.min_chars={self.min_chars}, data.max_chars={self.max_chars} keep none of the {len(rows)} rows "
                f"of data.dataset={self.dataset!r} split={split!r}, whose {self.filter_column!r} lengths range from "
                f"{min(lengths)} to {max(lengths)} characters; widen data.min_chars/data.max_chars"
            )
        return kept

    @quiet_datasets_progress()
    def encode_rows(self, rows: datasets.Dataset) -> datasets.Dataset:
        """A split's checked and filtered rows encoded (``encode_prompts``), those over their limit dropped."""
        encoded = rows.map(encode_prompts, batched=True,
                           fn_kwargs={"tokenizer": self.tokenizer, "fmt": self.prompt_format()})
        return self._drop_too_long(encoded)

    def _drop_too_long(self, encoded: datasets.Dataset) -> datasets.Dataset:
        """``encoded`` without the prompts over their limit (``truncation=drop``, or a frame that alone is too
        long); what was cut and dropped is added to ``prompt_counts``."""
        fit = Counter(encoded[PROMPT_FIT])
        self.prompt_counts.update({"prompts_cut": fit["cut"], "prompts_dropped": fit["too_long"]})
        return encoded.filter(_fits, input_columns=PROMPT_FIT, batched=True) if fit["too_long"] else encoded

    def limits_in_words(self) -> str:
        """The prompt limits in force, as the settings name them."""
        reserve = self.prompt_format().response_tokens  # a preference module's format reserves per pair instead
        room = f" less data.reserve_tokens={reserve}" if reserve else ""
        context = (f"the model's {self.max_context_tokens}-token context{room}" if self.max_context_tokens is not None
                   else None)
        prompt = (f"data.max_prompt_tokens={self.max_prompt_tokens}" if self.max_prompt_tokens is not None else None)
        return " and ".join(x for x in (prompt, context) if x) or "no limit"

    def log_prompt_counts(self, where: str) -> None:
        """One line: how many prompts of ``where`` were cut and dropped (nothing when none were)."""
        counts = self.prompt_counts
        if counts["prompts_cut"] or counts["prompts_dropped"]:
            rank_zero_info(f"{where} over {self.limits_in_words()}: "
                           f"{counts['prompts_cut']} cut in their content, {counts['prompts_dropped']} dropped "
                           f"(data.truncation={self.truncation})")

    def build_splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Filter, prompt, tokenize and split; every step is cached by datasets, so a second call reads it."""
        self.load_tokenizer()
        self.empty_rows = SkippedRows()
        self.prompt_counts = Counter(prompts_cut=0, prompts_dropped=0)
        source = load_source(self.dataset)
        rows = self._source_split(source, self.split, "data.split")
        self.source_columns = tuple(c for c in rows.column_names if c not in DERIVED_COLUMNS)
        kept = self._filter(self._drop_blank(rows, f"data.dataset={self.dataset!r} split={self.split!r}"), self.split)
        if self.eval_split is not None:
            held_out = self._source_split(source, self.eval_split, "data.eval_split")
            where = f"data.dataset={self.dataset!r} eval_split={self.eval_split!r}"
            held_out = self._filter(self._drop_blank(held_out, where), self.eval_split)
            train, test = self.encode_rows(kept), self.encode_rows(held_out)
        else:
            n_test = ceil(self.test_size * len(kept))  # datasets' rounding: the held-out part rounds up
            if n_test >= len(kept):
                raise ValueError(
                    f"data.test_size={self.test_size} holds out {n_test} of the {len(kept)} filtered rows, leaving "
                    "none for training; lower data.test_size or keep more rows (data.min_chars/max_chars)"
                )
            parts = self.encode_rows(kept).train_test_split(
                test_size=self.test_size, shuffle=self.shuffle_split, seed=self.split_seed)
            train, test = parts["train"], parts["test"]
        for name, part in (("training", train), ("held-out", test)):
            if len(part) == 0:
                raise ValueError(f"no {name} prompts are left: {self.prompt_counts['prompts_dropped']} were longer "
                                 f"than {self.limits_in_words()} (data.truncation={self.truncation}); raise "
                                 "data.max_prompt_tokens or set data.truncation=content")
        self.row_counts = {"source": len(rows), "kept": len(kept), "train": len(train), "test": len(test),
                           **self.prompt_counts, **self.empty_rows.summary()}
        return train, test

    def predict_rows(self) -> datasets.Dataset:
        """``predict_path``'s rows, loaded and encoded by the subclass's hooks, in one way for every data module:
        blank rows skipped and prompts over their limit dropped, both counted and logged."""
        where = f"data.predict_path={self.predict_path!r}"
        rows = self._drop_blank(self.read_predict_rows(), where, predict=True)
        self.prompt_counts = Counter(prompts_cut=0, prompts_dropped=0)
        encoded = self._drop_too_long(self.encode_predict_rows(rows))
        self.log_prompt_counts(f"Rows of {where}")
        return encoded

    @quiet_datasets_progress()
    def read_predict_rows(self) -> datasets.Dataset:
        """The rows of ``predict_path``, with string ids (row numbers where absent)."""
        rows = read_data_files(self.predict_path, "data.predict_path")
        needed = [c for c in self.prompt_format().needed_columns() if c != self.completion_column]
        missing = [c for c in needed if c not in rows.column_names]
        if missing:
            raise ValueError(f"data.predict_path={self.predict_path!r} lacks the column(s) {missing} the prompt "
                             f"needs (its columns: {rows.column_names})")
        return with_string_ids(rows)

    @quiet_datasets_progress()
    def encode_predict_rows(self, rows: datasets.Dataset) -> datasets.Dataset:
        """``predict_path``'s rows encoded as prompts (no labels)."""
        fmt = self.prompt_format()
        fmt = PromptFormat(**{**fmt.__dict__, "with_labels": False})  # predict has no labels to learn
        return rows.map(encode_prompts, batched=True, fn_kwargs={"tokenizer": self.tokenizer, "fmt": fmt})
