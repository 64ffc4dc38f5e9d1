"""DialogSum prompts for PPO: load (hub, bundled copy or local files), filter, apply the prompt, split, batch.

The defaults reproduce the recipe: the DialogSum train split, dialogues of 200 < length <= 1000
characters, the "Summarize the following conversation." prompt, the query text decoded from the prompt's
token ids, and an unshuffled 80/20 split (``train_test_split(test_size=0.2, shuffle=False, seed=42)``).
The 80% part feeds PPO rollouts; the held-out 20% is the validation and test set.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from importlib import resources
from math import ceil
from typing import Any, Callable, Iterator, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from lit_rlhf.tiny import looks_like_local_path, resolve_model_path

# `datasets` is imported where it is used: it takes ~1.5 s to import, which `lit-rlhf fit --help` need not pay. Not
# under TYPE_CHECKING either: jsonargparse runs those blocks when it reads signatures. Annotations below that name
# `datasets.Dataset`/`DatasetDict` are text only (postponed annotations).

DEFAULT_PROMPT_TEMPLATE = "\nSummarize the following conversation.\n\n{dialogue}\n\nSummary:\n"
"""The recipe's prompt; ``{dialogue}`` is replaced by the dialogue."""

REQUIRED_COLUMNS = ("id", "dialogue", "summary")
"""Columns a source split must have (``topic`` and others are kept when present)."""

_BUNDLED_FILES = {"train": "dialogsum.train.jsonl.gz", "validation": "dialogsum.dev.jsonl.gz"}
_BUNDLED_TEST_FILE = "dialogsum.test.jsonl.gz"
_BUNDLED_REFERENCES = 3  # the bundled test file has three reference summaries per dialogue

# Local-directory sources: a file belongs to the split its name starts with.
_SPLIT_PREFIXES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}


@contextlib.contextmanager
def quiet_datasets_progress() -> Iterator[None]:
    """datasets' progress bars off inside the block, back to the user's setting after.

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


def _expand_test_references(batch: dict[str, list]) -> dict[str, list]:
    """One row per (dialogue, reference summary), ids ``{fname}_{k}``, in file order."""
    out: dict[str, list] = {"id": [], "dialogue": [], "summary": [], "topic": []}
    for i, fname in enumerate(batch["fname"]):
        for k in range(1, _BUNDLED_REFERENCES + 1):
            out["id"].append(f"{fname}_{k}")
            out["dialogue"].append(batch["dialogue"][i])
            out["summary"].append(batch[f"summary{k}"][i])
            out["topic"].append(batch[f"topic{k}"][i])
    return out


def load_bundled_dialogsum() -> datasets.DatasetDict:
    """The DialogSum copy shipped in ``lit_rlhf/assets/dialogsum``, in the schema of hub ``knkarthick/dialogsum``.

    Splits ``train`` (12,460 rows), ``validation`` (500, the upstream dev file) and ``test`` (1,500: each of
    the 500 test dialogues once per reference summary, ids ``test_{n}_{k}`` for k = 1..3, in that order);
    columns ``id, dialogue, summary, topic``. The files are read with datasets' ``json`` builder, so the
    Arrow conversion is cached by datasets like any other dataset.
    """
    import datasets

    assets = resources.files("lit_rlhf.assets.dialogsum")
    with contextlib.ExitStack() as stack:
        def local(name: str) -> str:
            return str(stack.enter_context(resources.as_file(assets.joinpath(name))))

        # Two loads: the test file has another schema (summary1..3, topic1..3) than train and dev.
        train_dev = datasets.load_dataset("json", data_files={s: local(f) for s, f in _BUNDLED_FILES.items()})
        test = datasets.load_dataset("json", data_files={"test": local(_BUNDLED_TEST_FILE)})["test"]
    columns = ["id", "dialogue", "summary", "topic"]
    out = {split: ds.rename_column("fname", "id").select_columns(columns) for split, ds in train_dev.items()}
    with quiet_datasets_progress():
        expanded = test.map(_expand_test_references, batched=True, remove_columns=test.column_names)
    out["test"] = expanded.select_columns(columns)
    return datasets.DatasetDict(out)




def _load_local_directory(directory: str) -> datasets.DatasetDict:
    """Files named by split (``train*``, ``validation*``/``valid*``/``dev*``, ``test*``), jsonl/json or parquet."""
    data_files: dict[str, list[str]] = {}
    formats: set[str] = set()
    for name in sorted(os.listdir(directory)):
        fmt = next((f for ext, f in _FILE_FORMATS.items() if name.endswith(ext)), None)
        split = next((s for s, prefixes in _SPLIT_PREFIXES.items() if name.startswith(prefixes)), None)
        if fmt is not None and split is not None:
            data_files.setdefault(split, []).append(os.path.join(directory, name))
            formats.add(fmt)
    if not data_files:
        raise ValueError(
            f"dataset={directory!r} has no data files: expected files named train*, validation* (or dev*) "
            f"and test* ending in {', '.join(_FILE_FORMATS)}; found {sorted(os.listdir(directory))}"
        )
    if len(formats) > 1:
        raise ValueError(
            f"dataset={directory!r} mixes file formats {sorted(formats)}; keep one format per directory"
        )
    return load_data_files(f"data.dataset={directory!r}", formats.pop(), data_files)


def load_data_files(setting: str, fmt: str, data_files: dict[str, list[str]] | list[str], **kwargs: Any) -> Any:
    """``datasets.load_dataset(fmt, data_files=data_files, **kwargs)``, with an empty file or one that datasets
    cannot read reported in one line that starts with ``setting`` (e.g. ``data.dataset='dialogs'``)."""
    import datasets

    files = [f for group in data_files.values() for f in group] if isinstance(data_files, dict) else data_files
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        # datasets' json builder ends in a bare StopIteration on an empty file
        raise ValueError(f"{setting}: {empty[0]} is empty; give it rows or remove it")
    try:
        return datasets.load_dataset(fmt, data_files=data_files, **kwargs)
    except Exception as err:  # datasets raises many types for a malformed file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{setting} could not be read: {first}") from err


def _dialogue_length_in_range(dialogues: list[str], min_chars: int, max_chars: int) -> list[bool]:
    return [min_chars < len(dialogue) <= max_chars for dialogue in dialogues]


def apply_prompt_and_tokenize(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    prompt_template: str,
    max_prompt_tokens: int | None,
) -> dict[str, list]:
    """The prompt (``prompt_template`` around each dialogue), its token ids (truncated to ``max_prompt_tokens``)
    and the query text decoded from them: the columns training, evaluation and predict read."""
    prompts = [prompt_template.replace("{dialogue}", dialogue) for dialogue in batch["dialogue"]]
    truncate = max_prompt_tokens is not None
    input_ids = tokenizer(prompts, truncation=truncate, max_length=max_prompt_tokens).input_ids
    # As in the recipe, the query is the decoded prompt ids (special tokens such as T5's </s> included): the
    # prompt as the model sees it, after any truncation and the tokenizer's normalisation.
    return {"prompt": prompts, "input_ids": input_ids, "query": tokenizer.batch_decode(input_ids)}


def tokenize_summary(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_summary_tokens: int | None
) -> dict[str, list]:
    """The reference summary as the response the model should produce, ending with eos (supervised labels)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(batch["summary"], add_special_tokens=False).input_ids
    if max_summary_tokens is not None:
        ids = [row[: max_summary_tokens - 1] for row in ids]
    return {"summary_ids": [row + [eos] for row in ids]}


def _pad(rows: list[list[int]], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ids and mask, LongTensor [B, L], on the given side."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@dataclass(frozen=True)
class PromptCollator:
    """Pads a list of rows into a batch: tensors for the model, lists of strings for rewards and logs.

    ``padding_side`` comes from the model kind: ``"right"`` for encoder-decoder models (as T5 tokenizers pad;
    the encoder masks padding wherever it is), ``"left"`` for decoder-only models, so that generation
    continues right after each prompt's last token rather than after padding.
    """

    pad_token_id: int
    padding_side: Literal["left", "right"]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = _pad([row["input_ids"] for row in rows], self.pad_token_id, self.padding_side)
        labels = {}
        if "summary_ids" in rows[0]:
            # supervised fine-tuning: the reference summary is the response, right-padded as generate returns it
            summary_ids, summary_mask = _pad([row["summary_ids"] for row in rows], self.pad_token_id, "right")
            labels = {"summary_ids": summary_ids, "summary_mask": summary_mask}
        return {
            **labels,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query": [row["query"] for row in rows],
            "reference": [row.get("summary") for row in rows],
            "dialogue": [row.get("dialogue") for row in rows],
            "id": [row["id"] for row in rows],
            "prompt": [row["prompt"] for row in rows],
        }


class PromptStreamSampler(DistributedSampler):
    """This process's share of a seeded stream of rollout batches, starting where training left off.

    The stream is epoch after epoch of a permutation of the training prompts (seed + epoch; no shuffle: file
    order). Stream batch ``k`` holds ``num_replicas x batch_size`` prompts, and process ``rank`` takes its
    ``batch_size`` slice. Iteration starts at batch ``position_fn()`` (the module's PPO step), so a resumed run
    sees exactly the prompts an uninterrupted one would, with any number of processes. A DistributedSampler
    subclass, so Lightning keeps it under DDP instead of swapping in its own.
    """

    def __init__(
        self, dataset_size: int, batch_size: int, num_replicas: int, rank: int, seed: int, shuffle: bool,
        position_fn: Callable[[], int],
    ) -> None:
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.position_fn = position_fn
        self.batches_per_epoch = dataset_size // (batch_size * num_replicas)

    def _start(self) -> tuple[int, int]:
        return divmod(self.position_fn(), self.batches_per_epoch)  # (stream epoch, batch within it)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self._start()
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.dataset_size)
        per_step = self.batch_size * self.num_replicas
        for k in range(start, self.batches_per_epoch):
            first = k * per_step + self.rank * self.batch_size
            yield from order[first : first + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self._start()[1]) * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the stream position, not Lightning's epoch counter, picks the permutation."""


def check_data_settings(
    prompt_template: str, min_chars: int, max_chars: int, max_prompt_tokens: int | None, test_size: float,
    batch_size: int, eval_batch_size: int, num_workers: int, max_summary_tokens: int | None,
) -> None:
    """Raise a ValueError naming the ``data.*`` setting that cannot work."""
    if "{dialogue}" not in prompt_template:
        raise ValueError(
            f"data.prompt_template must contain '{{dialogue}}' where the dialogue goes; got {prompt_template!r}"
        )
    if min_chars < 0 or max_chars <= min_chars:
        raise ValueError(
            f"data.min_chars={min_chars}, data.max_chars={max_chars}: need 0 <= min_chars < max_chars "
            "(dialogues with min_chars < length <= max_chars are kept)"
        )
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(
            f"data.max_prompt_tokens must be None or a positive number of tokens, got {max_prompt_tokens}"
        )
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"data.test_size must be a fraction strictly between 0 and 1, got {test_size}")
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"data.{name} must be at least 1, got {value}")
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
    if max_summary_tokens is not None and max_summary_tokens < 2:
        raise ValueError(f"data.max_summary_tokens must be None or at least 2 (one token and eos), got {max_summary_tokens}")


class DialogSumDataModule(L.LightningDataModule):
    """DialogSum dialogues turned into summarisation prompts for PPO rollouts.

    Batches are dicts with ``input_ids`` and ``attention_mask`` (LongTensor ``[B, L]``, right-padded for
    encoder-decoder models, left-padded for decoder-only ones), and lists of strings ``query`` (the decoded
    prompt ids), ``reference`` (the human summary), ``id`` and ``prompt`` (the prompt text before
    tokenization). ``prepare_data`` loads and tokenizes once (datasets caches each step on disk);
    ``setup`` then reads the cached result on every process.

    Args:
        model_name: Model whose tokenizer encodes the prompts: a hub name, a local folder saved with
            ``save_pretrained``, or an embedded model (``embedded:tiny-t5``, ``embedded:tiny-gpt2``).
            Whether it is an encoder-decoder (right padding) or decoder-only model (left padding) is read
            from its config. Give the same name as the policy model.
        dataset: ``"bundled"`` (the DialogSum copy shipped with lit_rlhf, no network), a hub dataset
            name such as ``"knkarthick/dialogsum"``, or a local directory of jsonl/json/parquet files
            named by split (``train*``, ``validation*`` or ``dev*``, ``test*``). Needs the columns
            ``id``, ``dialogue`` and ``summary``.
        split: Source split that feeds the recipe (filtered, then split into train and held-out parts).
        min_chars: Keep dialogues strictly longer than this many characters.
        max_chars: Keep dialogues at most this many characters long.
        prompt_template: Prompt text; ``{dialogue}`` is replaced by the dialogue (no other placeholders).
        max_prompt_tokens: If set, prompts are truncated to this many tokens, on the tokenizer's
            truncation side (the right by default, which cuts the end of the prompt, "Summary:"
            included); ``None`` (the recipe) keeps whole prompts. Prefer ``max_chars`` to bound length.
        test_size: Fraction of the filtered rows held out for validation and test; as in datasets'
            ``train_test_split``, the held-out count is rounded up.
        split_seed: Seed of the train/held-out split; only used when ``shuffle_split`` is True.
        shuffle_split: Shuffle before splitting. False (the recipe): the train part is the first
            ``1 - test_size`` of the filtered rows, in order.
        batch_size: Prompts per training batch, i.e. the rollout batch of one PPO step. Incomplete last
            batches are dropped so every PPO step gets a full rollout batch.
        eval_batch_size: Prompts per validation/test batch.
        num_workers: DataLoader worker processes (0: load in the main process).
        shuffle: Shuffle the training prompts each epoch.
        seed: Seed of the training-prompt shuffle.
        with_labels: Supervised fine-tuning mode: batches also hold ``summary_ids`` and ``summary_mask``
            (LongTensor ``[B, S]``, right-padded), the reference summary tokenized with eos at its end;
            the training loader is then a plain shuffled epoch loader (not PPO's step-indexed stream).
        max_summary_tokens: With ``with_labels``: cut reference summaries to this many tokens (eos
            included). None keeps them whole.
        group_by_length: With ``with_labels``, in one process: batch prompts of similar length together
            (shuffled chunks of 50 batches, sorted within each chunk), so less time goes into padding.
        predict_path: Dialogues to summarize in ``predict``: a .jsonl/.json(.gz), .csv or .parquet file,
            or a folder of such files, with a ``dialogue`` column (``id`` is optional: row numbers
            otherwise). The prompt template and ``max_prompt_tokens`` apply; no length filter.
    """

    def __init__(
        self,
        model_name: str = "embedded:tiny-t5",
        dataset: str = "bundled",
        split: str = "train",
        min_chars: int = 200,
        max_chars: int = 1000,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        max_prompt_tokens: int | None = None,
        test_size: float = 0.2,
        split_seed: int = 42,
        shuffle_split: bool = False,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        with_labels: bool = False,
        max_summary_tokens: int | None = None,
        group_by_length: bool = False,
        predict_path: str | None = None,
    ) -> None:
        super().__init__()
        check_data_settings(prompt_template, min_chars, max_chars, max_prompt_tokens, test_size, batch_size,
                            eval_batch_size, num_workers, max_summary_tokens)
        self.save_hyperparameters()
        for name, value in self.hparams.items():  # every argument is also an attribute of the same name
            setattr(self, name, value)
        self.predict_set: datasets.Dataset | None = None
        self.consumed_batches = 0  # rollout batches training has taken from the prompt stream (state_dict)

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.is_encoder_decoder: bool | None = None
        self.train_set: datasets.Dataset | None = None
        """Prompts for PPO rollouts (the first ``1 - test_size`` of the filtered rows unless shuffled)."""
        self.test_set: datasets.Dataset | None = None
        """Held-out prompts, served by both ``val_dataloader`` and ``test_dataloader``."""
        self._sizes: dict[str, int] = {}

    # -- loading ------------------------------------------------------------------------------------------

    def _load_tokenizer(self) -> None:
        if self.tokenizer is not None:
            return
        path = resolve_model_path(self.model_name)
        self.is_encoder_decoder = bool(AutoConfig.from_pretrained(path).is_encoder_decoder)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"The tokenizer of model_name={self.model_name!r} has neither a pad nor an eos token, so "
                    "batches cannot be padded: save the tokenizer with a pad token set "
                    "(tokenizer.add_special_tokens({'pad_token': ...}); save_pretrained) and give that folder"
                )
            # Decoder-only tokenizers (GPT-2, many others) ship without a pad token; eos is the usual stand-in,
            # and the attention mask keeps the padding out of the model's view.
            tokenizer.pad_token = tokenizer.eos_token
            rank_zero_info(
                f"The tokenizer of {self.model_name!r} has no pad token: using its eos token "
                f"{tokenizer.eos_token!r} (id {tokenizer.eos_token_id}) for padding."
            )
        self.tokenizer = tokenizer

    def _load_source(self) -> datasets.DatasetDict:
        if self.dataset == "bundled":
            return load_bundled_dialogsum()
        local = os.path.expanduser(self.dataset)
        if os.path.isdir(local):
            return _load_local_directory(local)
        if looks_like_local_path(self.dataset):
            raise ValueError(
                f"dataset={self.dataset!r} is not a directory: give 'bundled', a hub dataset name such as "
                "'knkarthick/dialogsum', or a directory of train*/validation*/test* jsonl or parquet files"
            )
        import datasets

        return datasets.load_dataset(self.dataset)

    def _source_split(self) -> datasets.Dataset:
        source = self._load_source()
        if self.split not in source:
            raise ValueError(f"split={self.split!r} is not in dataset={self.dataset!r}; it has {sorted(source)}")
        rows = source[self.split]
        missing = [c for c in REQUIRED_COLUMNS if c not in rows.column_names]
        if missing:
            raise ValueError(
                f"dataset={self.dataset!r} split={self.split!r} lacks the column(s) {missing}: it has "
                f"{rows.column_names}, and {list(REQUIRED_COLUMNS)} are needed (rename its columns to these)"
            )
        return rows

    def _build(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Filter, prompt, tokenize and split; every step is cached by datasets, so a second call reads it."""
        self._load_tokenizer()
        rows = self._source_split()
        with quiet_datasets_progress():
            kept = rows.filter(
                _dialogue_length_in_range,
                input_columns="dialogue",
                batched=True,
                fn_kwargs={"min_chars": self.min_chars, "max_chars": self.max_chars},
            )
        if len(kept) == 0:
            lengths = [len(d) for d in rows["dialogue"]] or [0]
            raise ValueError(
                f"min_chars={self.min_chars}, max_chars={self.max_chars} keep none of the {len(rows)} dialogues "
                f"of dataset={self.dataset!r} split={self.split!r}, whose lengths range from {min(lengths)} to "
                f"{max(lengths)} characters; widen min_chars/max_chars"
            )
        n_test = ceil(self.test_size * len(kept))  # datasets' rounding: the held-out part rounds up
        if n_test >= len(kept):
            raise ValueError(
                f"test_size={self.test_size} holds out {n_test} of the {len(kept)} filtered rows, leaving none "
                "for training; lower test_size or keep more rows (min_chars/max_chars)"
            )
        prompts = self._tokenize(kept)
        if self.with_labels:
            with quiet_datasets_progress():
                prompts = prompts.map(
                    tokenize_summary, batched=True,
                    fn_kwargs={"tokenizer": self.tokenizer, "max_summary_tokens": self.max_summary_tokens},
                )
        parts = prompts.train_test_split(
            test_size=self.test_size, shuffle=self.shuffle_split, seed=self.split_seed
        )
        self._sizes = {
            "source": len(rows), "kept": len(kept), "train": len(parts["train"]), "test": len(parts["test"])
        }
        return parts["train"], parts["test"]

    # -- Lightning hooks ----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and tokenizes, leaving datasets' cache files for setup().
        self._build()

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._load_tokenizer()
            if self.predict_set is None:
                self.predict_set = self._build_predict_set()
            return
        if self.train_set is None:
            self.train_set, self.test_set = self._build()

    def _build_predict_set(self) -> datasets.Dataset:
        return self._tokenize(load_predict_rows(self.predict_path))

    def _tokenize(self, rows: datasets.Dataset) -> datasets.Dataset:
        """``rows`` with the prompt applied and tokenized (``apply_prompt_and_tokenize``)."""
        with quiet_datasets_progress():
            return rows.map(
                apply_prompt_and_tokenize, batched=True,
                fn_kwargs={"tokenizer": self.tokenizer, "prompt_template": self.prompt_template,
                           "max_prompt_tokens": self.max_prompt_tokens},
            )

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            raise RuntimeError("call setup('predict') before asking for the predict data loader")
        side = "right" if self.is_encoder_decoder else "left"
        collate = PromptCollator(pad_token_id=self.tokenizer.pad_token_id, padding_side=side)
        return DataLoader(self.predict_set, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def summary(self) -> dict[str, int]:
        """Row counts after ``setup``: ``source`` (the source split), ``kept`` (after the length filter),
        ``train`` and ``test`` (the two parts of the split)."""
        if not self._sizes:
            raise RuntimeError("call setup() before summary()")
        return dict(self._sizes)

    @property
    def collator(self) -> PromptCollator:
        if self.tokenizer is None or self.train_set is None:
            raise RuntimeError("call setup() before asking for data loaders")
        side = "right" if self.is_encoder_decoder else "left"
        return PromptCollator(pad_token_id=self.tokenizer.pad_token_id, padding_side=side)

    def train_dataloader(self) -> DataLoader:
        if self.with_labels:
            return self._supervised_dataloader()
        collate = self.collator
        if len(self.train_set) < self.batch_size:
            # drop_last would leave no batch at all, and training would silently do nothing.
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {len(self.train_set)} training prompts; "
                "lower batch_size or keep more rows (min_chars/max_chars, test_size)"
            )
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(self.train_set) < self.batch_size * world_size:
            raise ValueError(
                f"batch_size={self.batch_size} x {world_size} processes is more than the {len(self.train_set)} "
                "training prompts; lower batch_size"
            )
        sampler = PromptStreamSampler(
            len(self.train_set), self.batch_size, num_replicas=world_size, rank=rank, seed=self.seed,
            shuffle=self.shuffle, position_fn=self._consumed_batches,
        )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate,
            num_workers=self.num_workers,
            # its own generator: creating an iterator otherwise draws from the global RNG, which would shift
            # the sampling of a resumed run away from that of an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _supervised_dataloader(self) -> DataLoader:
        """Shuffled epochs of (prompt, reference summary) pairs; Lightning distributes them under DDP."""
        generator = torch.Generator().manual_seed(self.seed)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.group_by_length and world_size == 1:
            lengths = [len(ids) for ids in self.train_set["input_ids"]]
            batches = LengthGroupedBatchSampler(lengths, self.batch_size, generator)
            return DataLoader(self.train_set, batch_sampler=batches, collate_fn=self.collator,
                              num_workers=self.num_workers)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True,
            collate_fn=self.collator, num_workers=self.num_workers, generator=generator,
        )

    def _consumed_batches(self) -> int:
        """Rollout batches training has already used: counted as they are handed to ``training_step`` and
        restored from a checkpoint through this data module's own ``state_dict``."""
        return self.consumed_batches

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for each batch right before its step (after any prefetching), so the count is
        # of batches training really took, whatever the loader read ahead.
        if self.trainer is not None and self.trainer.training:
            self.consumed_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position in the prompt stream (Lightning stores it in checkpoints): a resumed run continues with
        the prompts an uninterrupted run would have seen."""
        return {"consumed_batches": self.consumed_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_batches = int(state_dict.get("consumed_batches", 0))

    def _held_out_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_set,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            # its own generator: each new iterator (every validation pass) would otherwise draw its base seed
            # from the global RNG and shift the training run's sampling
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._held_out_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._held_out_dataloader()


class LengthGroupedBatchSampler:
    """Batches of similar-length rows: shuffle, cut into chunks of ``chunk`` batches, sort each chunk by
    length, and shuffle the order of the resulting batches. A new shuffle each epoch (one seeded generator).
    The last incomplete batch is dropped."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, chunk: int = 50) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.generator = generator
        self.chunk = chunk

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        order = order[: len(self) * self.batch_size]
        span = self.chunk * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            group = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [group[k : k + self.batch_size] for k in range(0, len(group), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


_PREDICT_FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".csv": "csv",
                    ".parquet": "parquet"}


def load_predict_rows(path: str | None) -> datasets.Dataset:
    """Rows to summarize from a file or a folder of files (one format), with ``id`` (added as the row number
    when absent) and ``dialogue`` columns. Errors name the file and what is wrong, in one line."""
    if path is None:
        raise ValueError("predict needs dialogues: give --data.predict_path (a jsonl, csv or parquet file or folder)")
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        raise ValueError(f"data.predict_path={path!r} does not exist")
    files = [os.path.join(local, n) for n in sorted(os.listdir(local))] if os.path.isdir(local) else [local]
    typed = [(f, next((fmt for ext, fmt in _PREDICT_FORMATS.items() if f.endswith(ext)), None)) for f in files]
    if os.path.isdir(local):
        typed = [(f, fmt) for f, fmt in typed if fmt is not None]
    formats = {fmt for _, fmt in typed}
    if not typed or None in formats:
        raise ValueError(f"data.predict_path={path!r}: expected a {', '.join(_PREDICT_FORMATS)} file or a folder of them")
    if len(formats) > 1:
        raise ValueError(f"data.predict_path={path!r} mixes file formats {sorted(formats)}; keep one format")
    rows = load_data_files(f"data.predict_path={path!r}", formats.pop(), [f for f, _ in typed], split="train")
    if len(rows) == 0:
        raise ValueError(f"data.predict_path={path!r} has no rows")
    if "dialogue" not in rows.column_names:
        raise ValueError(f"data.predict_path={path!r} has no 'dialogue' column (its columns: {rows.column_names})")
    if "id" not in rows.column_names:
        rows = rows.add_column("id", [None] * len(rows))
    # a row without an id gets its row number; ids become strings whatever the file's type
    with quiet_datasets_progress():
        return rows.map(
            lambda r, i: {"id": str(i) if r["id"] is None else str(r["id"]), "dialogue": str(r["dialogue"] or "")},
            with_indices=True,
        )
