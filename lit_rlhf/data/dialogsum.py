"""DialogSum prompts for PPO: the bundled copy of DialogSum and ``DialogSumDataModule``, the recipe's preset of
the generic ``lit_rlhf.data.PromptDataModule``.

The defaults reproduce the recipe: the DialogSum train split, dialogues of 200 < length <= 1000
characters, the "Summarize the following conversation." prompt, the query text decoded from the prompt's
token ids, and an unshuffled 80/20 split (``train_test_split(test_size=0.2, shuffle=False, seed=42)``).
The 80% part feeds PPO rollouts; the held-out 20% is the validation and test set.
"""

from __future__ import annotations

import contextlib
from importlib import resources

from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.formats import PromptFormat, Truncation, encode_prompts, tokenize_completions
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.data.sources import quiet_datasets_progress, read_data_files
from lit_rlhf.settings import GenerationSettings, longest_response

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


def apply_prompt_and_tokenize(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    prompt_template: str,
    max_prompt_tokens: int | None,
) -> dict[str, list]:
    """The prompt (``prompt_template`` around each dialogue), its token ids (the dialogue cut so that the prompt
    fits ``max_prompt_tokens``) and the query text decoded from them: the columns training, evaluation and
    predict read."""
    fmt = PromptFormat(template=prompt_template, max_prompt_tokens=max_prompt_tokens)
    return encode_prompts(batch, tokenizer, fmt)


def tokenize_summary(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_summary_tokens: int | None
) -> dict[str, list]:
    """The reference summary as the response the model should produce, ending with eos (supervised labels)."""
    return {"summary_ids": tokenize_completions(batch["summary"], tokenizer, max_summary_tokens)}


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


class DialogSumDataModule(PromptDataModule):
    """DialogSum dialogues turned into summarisation prompts for PPO rollouts: ``PromptDataModule`` with the
    recipe's settings (the dialogue length filter, the summarisation template, the summaries as references and
    SFT labels, an unshuffled 80/20 split, no chat template).

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
        prompt_template: Prompt text; ``{dialogue}`` is replaced by the dialogue (other ``{column}`` placeholders by
            that column of the row; ``{{``/``}}`` are literal braces).
        max_prompt_tokens: If set, the longest prompt in tokens: a longer one is cut in its dialogue (the
            dialogue's end goes; the instruction and "Summary:" stay whole) or dropped (``truncation``).
            ``None`` (the recipe) keeps whole prompts. Prefer ``max_chars`` to bound length.
        truncation: What a prompt over ``max_prompt_tokens`` (or the model's context) becomes: ``content``
            (default) cuts the end of its dialogue, so every prompt keeps the instruction and ends with
            "Summary:"; ``drop`` drops the row. ``summary()`` and the log count both.
        reserve_tokens: Tokens kept free for the longest response generated from a prompt: a decoder-only
            model's prompts are fit to its context less this many tokens (cut in the dialogue), so generation
            never cuts their start. lit-rlhf sets it from ``model.generation.max_new_tokens`` (its high - 1).
            Not used by encoder-decoder models nor with ``with_labels``.
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

    record_names = ("dialogue", "summary")

    def __init__(
        self,
        model_name: str = "embedded:tiny-t5",
        dataset: str = "bundled",
        split: str = "train",
        min_chars: int = 200,
        max_chars: int = 1000,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        max_prompt_tokens: int | None = None,
        truncation: Truncation = "content",
        reserve_tokens: int = longest_response(GenerationSettings.max_new_tokens),
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
        check_data_settings(prompt_template, min_chars, max_chars, max_prompt_tokens, test_size, batch_size,
                            eval_batch_size, num_workers, max_summary_tokens)
        super().__init__(
            model_name=model_name, dataset="bundled:dialogsum" if dataset == "bundled" else dataset, split=split,
            prompt_column=None, template=prompt_template, chat_template=False, reference_column="summary",
            completion_column="summary", filter_column="dialogue", min_chars=min_chars, max_chars=max_chars,
            max_prompt_tokens=max_prompt_tokens, truncation=truncation, reserve_tokens=reserve_tokens,
            test_size=test_size, split_seed=split_seed, shuffle_split=shuffle_split, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, shuffle=shuffle, seed=seed,
            with_labels=with_labels,
            max_completion_tokens=max_summary_tokens, group_by_length=group_by_length, predict_path=predict_path,
        )
        self.save_hyperparameters(logger=False)  # this preset's own arguments (logged: the module's; config.yaml has these)
        self.prompt_template = prompt_template
        self.max_summary_tokens = max_summary_tokens

    def held_out_description(self) -> str:
        """The recipe's held-out prompts, in words, for the toxicity report."""
        return (f"the recipe's split: the part of the filtered {self.split} split that data.test_size, "
                f"{self.test_size:.0%}, holds out of PPO rollouts; ids are DialogSum {self.split} ids")

    def required_columns(self) -> list[str]:
        return list(REQUIRED_COLUMNS)

    def read_predict_rows(self) -> datasets.Dataset:
        return load_predict_rows(self.predict_path)


def load_predict_rows(path: str | None) -> datasets.Dataset:
    """Rows to summarize from a file or a folder of files (one format), with ``id`` (added as the row number
    when absent) and ``dialogue`` columns. Errors name the file and what is wrong, in one line."""
    if path is None:
        raise ValueError("predict needs dialogues: give --data.predict_path (a jsonl, csv or parquet file or folder)")
    rows = read_data_files(path, "data.predict_path")
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
