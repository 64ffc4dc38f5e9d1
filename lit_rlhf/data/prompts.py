"""Prompts for PPO from any source: a column of text, a template over columns, or chat messages.

    PromptDataModule     load, filter, format, split and batch; its stream position is its own state_dict

How a row becomes a prompt is ``lit_rlhf.data.formats`` (``PromptFormat``, ``encode_prompts``), the row pipeline
``lit_rlhf.data.rows`` and the batches ``lit_rlhf.data.batching`` (``PromptCollator``, ``PromptStreamSampler``).
``lit_rlhf.data.DialogSumDataModule`` is this module with the DialogSum recipe's settings. Batches hold
``input_ids``/``attention_mask`` (LongTensor [B, P], right-padded for encoder-decoder models, left-padded for
decoder-only ones), lists ``query`` (the decoded prompt ids), ``prompt``, ``id``, ``reference`` (None when the
data has no references) and ``columns`` (every source column by name: what ``FunctionReward`` receives).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from lit_rlhf.data.batching import PromptCollator, PromptStreamSampler
from lit_rlhf.data.formats import (
    DERIVED_COLUMNS, ChatTemplate, PromptFormat, Truncation, check_prompt_settings, context_tokens, template_fields,
)
from lit_rlhf.data.rows import PromptRows
from lit_rlhf.data.sources import RowTexts, SkippedRows, first_null
from lit_rlhf.models import ensure_pad_token, resolve_model_path
from lit_rlhf.settings import GenerationSettings, longest_response


class PromptDataModule(PromptRows, L.LightningDataModule):
    """Prompts for PPO rollouts (and SFT pairs) from any dataset: a text column, a template over columns, or
    chat messages, with optional references and every other column carried to the rewards.

    ``prepare_data`` loads, filters and tokenizes once (datasets caches each step on disk); ``setup`` reads
    the cached result on every process. The training loader is a seeded stream of full rollout batches whose
    position is this module's ``state_dict`` (a resumed run sees the prompts an uninterrupted one would), one
    slice per process under DDP. Validation and test read the held-out part in order.

    Args:
        model_name: Model whose tokenizer encodes the prompts: a hub name, a local folder saved with
            ``save_pretrained``, or an embedded model (``embedded:tiny-gpt2``). Its config says whether it is an
            encoder-decoder (right padding, never a chat template) or decoder-only model (left padding). Linked
            from ``model.model_name``.
        dataset: Where the rows come from: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (one split,
            ``train``), a directory of such files named by split (``train*``, ``validation*`` or ``dev*``,
            ``test*``), ``bundled:<name>`` (a copy shipped with lit_rlhf: ``bundled:dialogsum``), or a Hugging
            Face hub dataset name.
        split: Source split of the training prompts.
        eval_split: Source split of the held-out prompts (validation, test, the toxicity report). None: hold out
            ``test_size`` of ``split`` instead.
        prompt_column: Column holding each prompt's text (used when neither ``template`` nor
            ``messages_column`` is given).
        template: Prompt text with ``{column}`` placeholders filled from the row, e.g.
            ``"Summarize: {dialogue}"`` (any columns; ``{{``/``}}`` for literal braces).
        messages_column: Column holding a conversation, a list of ``{role, content}`` dicts; the prompt is the
            conversation rendered by the tokenizer's chat template (see ``chat_template``), or, without one, the
            contents one per line.
        chat_template: ``auto``: apply the tokenizer's chat template (with the generation prompt) when it has
            one and the model is decoder-only; ``true``: always (an error when the tokenizer has none or the
            model is an encoder-decoder); ``false``: never (plain text prompts).
        system_prompt: A system message put before each prompt (as a system turn with a chat template; as the
            first line without).
        reference_column: Column of reference texts (ROUGE in the report, reference-based rewards such as
            ``ReferenceSimilarityReward``). None: the data has no references.
        completion_column: With ``with_labels``: the column of responses to learn. None with
            ``messages_column``: each conversation's last assistant turn.
        filter_column: Keep only rows whose value in this column is ``min_chars < length <= max_chars``
            characters long. None: no length filter.
        min_chars: See ``filter_column``.
        max_chars: See ``filter_column``; None: no upper bound.
        max_prompt_tokens: The longest prompt, in tokens (see ``truncation``). None: no limit but the model's
            context (with labels, prompt and completion together must fit a decoder-only model's positions).
        truncation: What a prompt over its limit becomes. ``content`` (default): its content is cut, never its
            frame: the oldest turns of a conversation go first, then the template's longest field (the
            dialogue) loses its end, or a plain prompt or last user message its start; the template's
            instruction ("Summary:"), the system prompt and the chat template's generation prompt stay whole.
            ``drop``: the row is dropped. Either way ``summary()`` and the log count the rows cut and dropped.
        reserve_tokens: Tokens kept free for the longest response generated from a prompt (rollouts,
            validation, predict): a decoder-only model's prompts are fit to its context less this many tokens
            (cut in their content, see ``truncation``), so generation never has to cut their start (BOS, system
            prompt, chat header). lit-rlhf sets it from ``model.generation.max_new_tokens`` (its high - 1); the
            default is that of the default generation settings. Not used by encoder-decoder models (the decoder
            has its own positions) nor with ``with_labels`` (the completion's own length is reserved).
        test_size: With no ``eval_split``: the fraction of ``split`` held out (rounded up, as datasets'
            ``train_test_split``).
        split_seed: Seed of the held-out draw (with ``shuffle_split``).
        shuffle_split: Draw the held-out rows at random (seeded); False: the last ``test_size`` of the rows.
        batch_size: Prompts per training batch, i.e. the rollout batch of one PPO step (full batches only).
        eval_batch_size: Prompts per validation/test/predict batch.
        num_workers: DataLoader worker processes (0: load in the main process).
        shuffle: Shuffle the training prompts each pass over them.
        seed: Seed of the training-prompt shuffle.
        with_labels: Supervised fine-tuning: batches also hold ``summary_ids``/``summary_mask`` (the
            completion tokenized, eos last, right-padded); each pass over the training pairs is a new order.
            Without a ``reference_column`` the completion is the reference.
        max_completion_tokens: With ``with_labels``: cut completions to this many tokens (eos included).
        group_by_length: With ``with_labels``: batch prompts of similar length together.
        predict_path: Rows to answer in ``predict``: a .jsonl/.json(.gz), .csv or .parquet file or a folder of
            them, with the columns the prompt needs (``id`` optional: row numbers otherwise). No length filter.
    """

    record_names: tuple[str, str] = ("prompt", "response")
    """A prediction record's input and output field names."""

    def __init__(
        self,
        model_name: str = "embedded:tiny-gpt2",
        dataset: str = "prompts.jsonl",
        split: str = "train",
        eval_split: str | None = None,
        prompt_column: str | None = "prompt",
        template: str | None = None,
        messages_column: str | None = None,
        chat_template: ChatTemplate = "auto",
        system_prompt: str | None = None,
        reference_column: str | None = None,
        completion_column: str | None = None,
        filter_column: str | None = None,
        min_chars: int = 0,
        max_chars: int | None = None,
        max_prompt_tokens: int | None = None,
        truncation: Truncation = "content",
        reserve_tokens: int = longest_response(GenerationSettings.max_new_tokens),
        test_size: float = 0.2,
        split_seed: int = 42,
        shuffle_split: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        with_labels: bool = False,
        max_completion_tokens: int | None = None,
        group_by_length: bool = False,
        predict_path: str | None = None,
    ) -> None:
        super().__init__()
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_prompt_settings(settings)
        if type(self) is PromptDataModule:  # a preset saves its own arguments
            self.save_hyperparameters(logger=False)  # logged settings are the module's; config.yaml has these
        for name, value in settings.items():  # every argument is also an attribute of the same name
            setattr(self, name, value)
        self.consumed_batches = 0  # rollout batches training has taken from the prompt stream (state_dict)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.is_encoder_decoder: bool | None = None
        self.train_set: datasets.Dataset | None = None
        """Prompts for PPO rollouts."""
        self.test_set: datasets.Dataset | None = None
        """Held-out prompts, served by both ``val_dataloader`` and ``test_dataloader``."""
        self.predict_set: datasets.Dataset | None = None
        self.source_columns: tuple[str, ...] = ()
        """The source's columns (carried to rewards under ``batch["columns"]``), known after setup."""
        self.row_counts: dict[str, int | str] = {}
        """Rows read, kept, split and skipped by the last build (``summary()``)."""
        self.empty_rows = SkippedRows()
        """Rows skipped for a null or empty prompt or response (``text_columns``)."""
        self.max_context_tokens: int | None = None
        """The model's context (``context_tokens``), known once the tokenizer is loaded."""
        self.model_config: Any = None
        """The model's config (its ``AutoConfig``), loaded with the tokenizer."""
        self.prompt_counts: Counter[str] = Counter(prompts_cut=0, prompts_dropped=0)
        """Prompts cut in their content and dropped as too long, by the last encoding (``summary()``)."""

    # -- loading ------------------------------------------------------------------------------------------

    def load_tokenizer(self) -> None:
        """Load ``model_name``'s tokenizer and config once (``tokenizer``, ``model_config``, ``max_context_tokens``)."""
        if self.tokenizer is not None:
            return
        path = resolve_model_path(self.model_name)
        config = AutoConfig.from_pretrained(path)
        self.model_config = config
        self.is_encoder_decoder = bool(config.is_encoder_decoder)
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_context_tokens = context_tokens(config, tokenizer)
        ensure_pad_token(tokenizer, f"model.model_name={self.model_name!r}")
        self.tokenizer = tokenizer

    def use_chat_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template (``chat_template`` resolved)."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.is_encoder_decoder:
            if self.chat_template is True:
                raise ValueError(f"data.chat_template=true: model.model_name={self.model_name!r} is an encoder-decoder "
                                 "model, which takes plain prompts; set data.chat_template to auto or false")
            return False
        if self.chat_template is True and not has_template:
            raise ValueError(f"data.chat_template=true: the tokenizer of model.model_name={self.model_name!r} has no "
                             "chat template; set data.chat_template to auto or false, or save a tokenizer with one")
        return has_template if self.chat_template == "auto" else bool(self.chat_template)

    def prompt_format(self) -> PromptFormat:
        """How rows become prompts, with the chat template resolved against the tokenizer (after loading it)."""
        self.load_tokenizer()
        return PromptFormat(
            prompt_column=self.prompt_column, template=self.template, messages_column=self.messages_column,
            chat=self.use_chat_template(), system_prompt=self.system_prompt, max_prompt_tokens=self.max_prompt_tokens,
            completion_column=self.completion_column, with_labels=self.with_labels,
            max_completion_tokens=self.max_completion_tokens, truncation=self.truncation,
            max_context_tokens=self.max_context_tokens, decoder_only=not self.is_encoder_decoder,
            response_tokens=self._response_tokens(),
        )

    def _response_tokens(self) -> int:
        """The tokens a prompt leaves free for its generated response: ``reserve_tokens`` for a decoder-only
        model's prompts without labels (an error when that leaves no room for a prompt), else none."""
        if self.is_encoder_decoder or self.with_labels:
            return 0
        if self.max_context_tokens is not None and self.reserve_tokens >= self.max_context_tokens:
            raise ValueError(
                f"data.reserve_tokens={self.reserve_tokens} (the longest response, from "
                f"model.generation.max_new_tokens) leaves no room for a prompt in the {self.max_context_tokens}-token "
                f"context of model.model_name={self.model_name!r}; lower model.generation.max_new_tokens"
            )
        return self.reserve_tokens

    def required_columns(self) -> list[str]:
        """The source columns the settings name (prompt, template fields, messages, reference, filter)."""
        names = [*self.prompt_format().needed_columns(), self.reference_column, self.filter_column]
        return list(dict.fromkeys(n for n in names if n is not None))

    def text_columns(self, predict: bool = False) -> RowTexts:
        """What every row must hold (``sources.RowTexts``): the prompt (a plain prompt column, a conversation, or
        a template whose fields are not null, though one may be empty) and in training the completion; a row that
        breaks it is skipped and counted (``summary()``), never trained on as the text "None"."""
        fmt = self.prompt_format()
        completion = [fmt.completion_column] if fmt.with_labels and fmt.completion_column and not predict else []
        if fmt.messages_column is not None:
            return RowTexts(texts=(fmt.messages_column, *completion))
        if fmt.template is not None:
            return RowTexts(texts=tuple(completion), template=fmt.template, fields=tuple(template_fields(fmt.template)))
        return RowTexts(texts=(fmt.prompt_column, *completion))

    # -- Lightning hooks ----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and tokenizes, leaving datasets' cache files for setup().
        self.build_splits()

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self.load_tokenizer()
            if self.predict_set is None:
                self.predict_set = self.predict_rows()
            return
        if self.train_set is None:
            self.train_set, self.test_set = self.build_splits()
            # logged here, not in build_splits: prepare_data builds too
            self.log_prompt_counts(f"Prompts of data.dataset={self.dataset!r}")

    def make_collator(self, columns: tuple[str, ...], labels: bool) -> PromptCollator:
        """The collator of batches that carry ``columns`` to the rewards (``labels``: with the completion)."""
        side = "right" if self.is_encoder_decoder else "left"
        reference = self.reference_column or ("completion" if labels else None)
        return PromptCollator(pad_token_id=self.tokenizer.pad_token_id, padding_side=side,
                              reference_column=reference, columns=columns, record_names=self.record_names)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            raise RuntimeError("call setup('predict') before asking for the predict data loader")
        columns = tuple(c for c in self.predict_set.column_names if c not in DERIVED_COLUMNS)
        return DataLoader(self.predict_set, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.make_collator(columns, labels=False), num_workers=self.num_workers)

    def held_out_description(self) -> str:
        """Where the held-out prompts come from, in words, for the toxicity report (ids are the source's)."""
        if self.eval_split is not None:
            return f"split {self.eval_split!r} of data.dataset={self.dataset!r}; ids are that split's"
        return (f"the {self.test_size:.0%} of split {self.split!r} of data.dataset={self.dataset!r} that data.test_size "
                f"holds out of PPO rollouts; ids are that split's")

    def reward_inputs(self, stage: str) -> tuple[list[str], bool, Callable[[str], str | None]]:
        """What a reward can read in ``stage`` (after ``setup``): the source columns, whether there are
        references, and a function giving the id of the first row with no value in a column (None: every row has
        one). ``PPOModule`` checks its reward against these before the first step."""
        if stage == "predict":
            columns = [c for c in self.predict_set.column_names if c not in DERIVED_COLUMNS]
            has_references = self.reference_column is not None and self.reference_column in columns
            return columns, has_references, lambda column: first_null(self.predict_set, column)

        def first_missing(column: str) -> str | None:
            return first_null(self.train_set, column) or first_null(self.test_set, column)

        return list(self.source_columns), self.reference_column is not None, first_missing

    def summary(self) -> dict[str, int | str]:
        """Row counts after ``setup``: ``source`` (the source split), ``kept`` (after the empty rows and the
        length filter), ``train`` and ``test`` (the two parts of the split), ``prompts_cut`` (cut in their content to
        their token limit) and ``prompts_dropped`` (over it and dropped: ``truncation=drop``, or a frame alone too
        long); when rows with a null or empty prompt
        or completion were skipped, ``skipped_empty`` (how many) and ``first_skipped_empty`` (the first one's id)."""
        if not self.row_counts:
            raise RuntimeError("call setup() before summary()")
        return dict(self.row_counts)

    @property
    def collator(self) -> PromptCollator:
        """The collator of the training and held-out batches."""
        if self.tokenizer is None or self.train_set is None:
            raise RuntimeError("call setup() before asking for data loaders")
        return self.make_collator(self.source_columns, labels=self.with_labels)

    def train_dataloader(self) -> DataLoader:
        """The seeded, resumable stream of training batches (:class:`PromptStreamSampler`): rollout prompts, or
        with ``with_labels`` (prompt, completion) pairs, a new order each pass over them."""
        collate = self.collator
        if len(self.train_set) < self.batch_size:
            # drop_last would leave no batch at all, and training would silently do nothing.
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} training prompts; "
                "lower data.batch_size or keep more rows (data.min_chars/max_chars, data.test_size)"
            )
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(self.train_set) < self.batch_size * world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} x {world_size} processes is more than the "
                f"{len(self.train_set)} training prompts; lower data.batch_size"
            )
        grouped = self.with_labels and self.group_by_length
        sampler = PromptStreamSampler(
            len(self.train_set), self.batch_size, num_replicas=world_size, rank=rank, seed=self.seed,
            shuffle=self.shuffle, position_fn=self._consumed_batches,
            lengths=[len(ids) for ids in self.train_set["input_ids"]] if grouped else None,
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

    def _consumed_batches(self) -> int:
        """Training batches already used: counted as they are handed to ``training_step`` and
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
