"""``PreferenceDataModule``: preference pairs for reward models and DPO, from any dataset.

It reads pairs as ``lit_rlhf.data.pairs`` makes them (its docstring describes the rows and the batches): load,
check, filter, split, and the resumable stream of ``PromptDataModule``; in predict, responses to score.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_rlhf.data.formats import PROMPT_FIT, ChatTemplate, PromptFormat, Truncation, with_string_ids
from lit_rlhf.data.pairs import (
    PROMPT_MESSAGES, PairColumns, PreferenceCollator, ScoringCollator, classifier_sides, encode_pairs, encode_scored,
    pair_texts,
)
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.data.sources import RowTexts, quiet_datasets_progress, read_data_files
from lit_rlhf.models import position_limit
from lit_rlhf.rewards import TextField

if TYPE_CHECKING:
    import datasets


def _pair_fits(prompt_fit: list[str], chosen: list[list[int]], rejected: list[list[int]], *cut: list[bool],
               max_response: int | None) -> list[bool]:
    """Pairs whose prompt fit (whole or cut, ``encode_prompts``), whose responses are within ``max_response`` and,
    given each side's ``cut`` flags (``classifier_sides``), whose responses a reward model reads whole (a cut
    response may lose what tells chosen from rejected)."""
    inf = float("inf")
    read_cut = [any(flags) for flags in zip(*cut)] if cut else [False] * len(chosen)
    return [how != "too_long" and max(len(c), len(r)) <= (max_response or inf) and not was_cut
            for how, c, r, was_cut in zip(prompt_fit, chosen, rejected, read_cut)]


def _usable(skip: list[str]) -> list[bool]:
    return [not reason for reason in skip]


class PreferenceDataModule(PromptDataModule):
    """Preference pairs from any dataset: text columns or chat conversations, rendered as ``PromptDataModule``
    renders prompts (chat template, system prompt), filtered by token length, split with a seeded held-out part,
    and served as a resumable seeded stream of full batches (one slice per process under DDP: the stream
    position is this module's ``state_dict``). Pairs with identical responses or an empty text are skipped and
    counted; pairs longer than the token limits are dropped and counted (``summary()``, and the log).

    Args:
        model_name: Model whose tokenizer encodes the pairs (the policy's for DPO, the reward model's for reward
            modelling): a hub name, a local ``save_pretrained`` folder or an embedded model. Its config says
            whether it is an encoder-decoder model (prompts right-padded, no chat template) or decoder-only.
        dataset: A local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a folder of such files named by split,
            or a Hugging Face hub dataset name.
        split: Source split of the training pairs.
        eval_split: Source split of the held-out pairs. None: hold out ``test_size`` of ``split``.
        prompt_column: Column of the prompt text (text pairs; not read when the responses are conversations).
        chosen_column: Column of the preferred response: a text, or a conversation ending in it.
        rejected_column: Column of the other response: a text, or a conversation ending in it.
        margin_column: Optional column of a number per pair (how much chosen is preferred), given to the loss.
        chat_template: ``auto``: the tokenizer's chat template (generation prompt included) for a decoder-only
            model that has one; ``true``: always; ``false``: plain text.
        system_prompt: A system message put before each prompt.
        max_prompt_tokens: The longest prompt in tokens; a decoder-only model's context must also hold the prompt
            and the longer response together. A prompt over its limit is cut in its content or its pair dropped
            (``truncation``; both counted). None: no limit but the context.
        truncation: ``content`` (default): cut an over-long prompt's content (the oldest turns, then the start
            of the last user message), never the chat template's frame; ``drop``: drop the pair.
        max_response_tokens: Pairs with a response longer than this many tokens (the end-of-turn token included:
            eos, or the chat template's own) are dropped (counted); never cut, since a cut response is another
            answer. None: no limit but the model's context.
        classifier_inputs: Whether a reward model reads the batches (``lit-rlhf-rm`` sets it; a
            ``RewardModelModule`` needs it): each side then also gets the classifier's ids (``classifier_text``,
            ``classifier_max_length``). False (DPO): no classifier reads the pairs, so its limit drops none.
        classifier_text: What a reward model reads of each pair's side: ``prompt+response`` (the query, a
            newline, the response) or the ``response`` alone; give ``ClassifierReward`` the same ``text``.
        classifier_max_length: The most tokens a reward model reads of a pair's side (training and predict): the
            response whole, the prompt cut from its start, as ``ClassifierReward(max_length=...)`` reads them in
            PPO (give it the same number). With ``classifier_inputs``, pairs with a response longer than this alone
            are dropped (counted as too long). None: the model's own limit (its tokenizer's ``model_max_length``,
            its positions).
        predict_path: ``lit-rlhf-rm predict``: rows to score, a .jsonl/.json(.gz), .csv or .parquet file or a
            folder of them, with ``response_column`` and (unless ``classifier_text`` is ``response``)
            ``prompt_column`` text; ``id`` optional.
        response_column: The column of the responses to score in ``predict_path``.
        test_size: With no ``eval_split``: the fraction of ``split`` held out (rounded up).
        split_seed: Seed of the held-out draw.
        batch_size: Pairs per training batch (full batches only).
        eval_batch_size: Pairs per validation/test batch.
        num_workers: DataLoader worker processes.
        shuffle: Shuffle the training pairs each pass.
        seed: Seed of the training shuffle.
    """

    def __init__(
        self,
        model_name: str = "embedded:tiny-gpt2",
        dataset: str = "preferences.jsonl",
        split: str = "train",
        eval_split: str | None = None,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        margin_column: str | None = None,
        chat_template: ChatTemplate = "auto",
        system_prompt: str | None = None,
        max_prompt_tokens: int | None = None,
        truncation: Truncation = "content",
        max_response_tokens: int | None = None,
        classifier_inputs: bool = False,
        classifier_text: TextField = "prompt+response",
        classifier_max_length: int | None = None,
        test_size: float = 0.1,
        split_seed: int = 42,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        predict_path: str | None = None,
        response_column: str = "response",
    ) -> None:
        if max_response_tokens is not None and max_response_tokens < 1:
            raise ValueError(f"data.max_response_tokens must be None or a positive number of tokens, got "
                             f"{max_response_tokens}")
        if classifier_max_length is not None and classifier_max_length < 1:
            raise ValueError(f"data.classifier_max_length must be None or a positive number of tokens, got "
                             f"{classifier_max_length}")
        if classifier_text not in ("prompt+response", "response"):
            raise ValueError(f"data.classifier_text must be prompt+response or response, got {classifier_text!r}")
        named = [c for c in (prompt_column, chosen_column, rejected_column, margin_column) if c is not None]
        if len(set(named)) < len(named):
            raise ValueError("data.prompt_column, data.chosen_column, data.rejected_column and data.margin_column "
                             "must name different columns")
        super().__init__(
            model_name=model_name, dataset=dataset, split=split, eval_split=eval_split, prompt_column=prompt_column,
            chat_template=chat_template, system_prompt=system_prompt, max_prompt_tokens=max_prompt_tokens,
            truncation=truncation, test_size=test_size, split_seed=split_seed, shuffle_split=True,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, shuffle=shuffle, seed=seed,
            predict_path=predict_path, reserve_tokens=0,  # a pair's prompt leaves room for its own responses
        )
        self.save_hyperparameters(logger=False)  # this module's own arguments (config.yaml has these)
        self.columns = PairColumns(prompt_column, chosen_column, rejected_column, margin_column)
        self.max_response_tokens = max_response_tokens
        self.classifier_inputs = classifier_inputs
        self.classifier_text = classifier_text
        self.classifier_max_length = classifier_max_length
        self.response_column = response_column
        self._skipped: Counter[str] = Counter()

    def text_columns(self, predict: bool = False) -> RowTexts:
        """The prompt's and responses' columns (a null or empty one skips its row): in predict the response and,
        when the classifier reads it, the prompt; a conversation's prompt is checked once split off (``pair_texts``)."""
        cols = self.columns
        if predict:
            prompt = (cols.prompt,) if self.classifier_text == "prompt+response" else ()
            return RowTexts((self.response_column, *prompt))
        return RowTexts((cols.prompt, cols.chosen, cols.rejected))

    def required_columns(self) -> list[str]:
        """The response columns and the margin's; the prompt column is checked per format in ``encode_rows``."""
        cols = self.columns
        return [c for c in (cols.chosen, cols.rejected, cols.margin) if c is not None]

    def _is_conversations(self, rows: datasets.Dataset) -> bool:
        """Whether the responses are conversations (lists of messages) rather than texts; text pairs need the
        prompt column."""
        conversations = isinstance(rows[0][self.columns.chosen], list)
        if not conversations and self.columns.prompt not in rows.column_names:
            raise ValueError(f"data.prompt_column={self.columns.prompt!r} is not a column of data.dataset={self.dataset!r} "
                             f"(its columns: {rows.column_names}); text pairs need the prompt")
        return conversations

    @quiet_datasets_progress()
    def encode_rows(self, rows: datasets.Dataset) -> datasets.Dataset:
        """Pair texts, skip unusable pairs, encode, drop long pairs; the counts go to ``summary()``."""
        texts = rows.map(pair_texts, batched=True,
                         fn_kwargs={"cols": self.columns, "conversations": self._is_conversations(rows)})
        self._skipped.update(reason for reason in texts["skip"] if reason and reason != "empty")
        self.empty_rows.add([i for i, reason in zip(texts["id"], texts["skip"]) if reason == "empty"])
        usable = texts.filter(_usable, input_columns="skip", batched=True)
        encoded = usable.map(encode_pairs, batched=True,
                             fn_kwargs={"tokenizer": self.tokenizer, "fmt": self._pair_prompt_format()})
        checked = [PROMPT_FIT, "chosen_ids", "rejected_ids"]
        if self.classifier_inputs:  # only a classifier's limit may drop a pair for being too long to read
            encoded = encoded.map(classifier_sides, batched=True, fn_kwargs={
                "tokenizer": self.tokenizer, "classifier_text": self.classifier_text,
                "classifier_limit": self.classifier_limit()})
            checked += ["chosen_cut", "rejected_cut"]
        kept = encoded.filter(_pair_fits, input_columns=checked, batched=True,
                              fn_kwargs={"max_response": self._response_limit()})
        self._skipped["too_long"] += len(encoded) - len(kept)
        self.prompt_counts["prompts_cut"] += sum(how == "cut" for how in kept[PROMPT_FIT])
        if len(kept) == 0:
            raise ValueError(
                f"no pair of data.dataset={self.dataset!r} is left ({len(rows)} rows; skipped: {dict(self._skipped)}): "
                "check data.chosen_column/rejected_column, or raise data.max_prompt_tokens/max_response_tokens")
        return kept

    def build_splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        self._skipped = Counter()
        train, test = super().build_splits()
        skipped = {"identical": self._skipped["identical"], "empty": self.empty_rows.count,
                   "too_long": self._skipped["too_long"]}
        self.row_counts.update({f"skipped_{k}": v for k, v in skipped.items()})
        if any(skipped.values()):
            read = (f", or with a response longer than the {self.classifier_limit()} tokens a reward model reads "
                    "(data.classifier_max_length)") if self.classifier_inputs else ""
            rank_zero_info(
                f"Preference pairs of data.dataset={self.dataset!r}: skipped {skipped['identical']} with identical chosen "
                f"and rejected responses, {skipped['empty']} with a null or empty prompt or response (the first: row "
                f"{self.empty_rows.first_id!r}), and "
                f"{skipped['too_long']} too long for {self.limits_in_words()} and "
                f"data.max_response_tokens={self.max_response_tokens} (data.truncation={self.truncation}){read}")
        return train, test

    def classifier_limit(self) -> int | None:
        """The most tokens a reward model reads of a pair's side: ``classifier_max_length``, or the model's own
        limit; a setting beyond the model's limit is an error."""
        self.load_tokenizer()
        limit = position_limit(self.model_config, self.tokenizer)
        if self.classifier_max_length is None:
            return limit
        if limit is not None and self.classifier_max_length > limit:
            raise ValueError(f"data.classifier_max_length={self.classifier_max_length} but model.model_name="
                             f"{self.model_name!r} reads at most {limit} tokens; set it to {limit} or less")
        return self.classifier_max_length

    def _response_limit(self) -> int | None:
        """A response's token limit: ``max_response_tokens``, and an encoder-decoder model's decoder positions (a
        decoder-only model's context is shared with the prompt: ``encode_prompts`` fits the prompt beside it)."""
        limits = (self.max_response_tokens, self.max_context_tokens if self.is_encoder_decoder else None)
        return min((n for n in limits if n is not None), default=None)

    def _pair_prompt_format(self) -> PromptFormat:
        """How a pair's (or a scored row's) prompt messages become the prompt: chat template, system prompt, the
        token limits and ``truncation`` as for any prompt."""
        return PromptFormat(messages_column=PROMPT_MESSAGES, chat=self.use_chat_template(),
                            system_prompt=self.system_prompt, max_prompt_tokens=self.max_prompt_tokens,
                            truncation=self.truncation, max_context_tokens=self.max_context_tokens,
                            decoder_only=not self.is_encoder_decoder)

    def make_collator(self, columns: tuple[str, ...], labels: bool) -> PreferenceCollator:
        return PreferenceCollator(
            pad_token_id=self.tokenizer.pad_token_id, padding_side="right" if self.is_encoder_decoder else "left",
            classifier=self.classifier_inputs, classifier_padding_side=self.tokenizer.padding_side,
            margin_column=self.columns.margin)

    # -- predict: responses to score (lit-rlhf-rm predict) ------------------------------------------------

    @quiet_datasets_progress()
    def read_predict_rows(self) -> datasets.Dataset:
        """The rows of ``predict_path``, with string ids (row numbers where absent)."""
        rows = read_data_files(self.predict_path, "data.predict_path")
        needed = [self.response_column] + ([self.columns.prompt] if self.classifier_text == "prompt+response" else [])
        missing = [c for c in needed if c not in rows.column_names]
        if missing:
            raise ValueError(f"data.predict_path={self.predict_path!r} lacks the column(s) {missing} (its columns: "
                             f"{rows.column_names}): scoring reads data.response_column={self.response_column!r}"
                             + (f" and data.prompt_column={self.columns.prompt!r}" if len(needed) > 1 else ""))
        return with_string_ids(rows)

    @quiet_datasets_progress()
    def encode_predict_rows(self, rows: datasets.Dataset) -> datasets.Dataset:
        return rows.map(encode_scored, batched=True, fn_kwargs={
            "tokenizer": self.tokenizer, "fmt": self._pair_prompt_format(), "prompt_column": self.columns.prompt,
            "response_column": self.response_column, "classifier_text": self.classifier_text,
            "classifier_limit": self.classifier_limit()})

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            raise RuntimeError("call setup('predict') before asking for the predict data loader")
        collate = ScoringCollator(self.tokenizer.pad_token_id, self.tokenizer.padding_side)
        return DataLoader(self.predict_set, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def summary(self) -> dict[str, int]:
        """Row counts after ``setup``: ``source``, ``kept``, ``train``, ``test``, ``prompts_cut`` (pairs whose prompt
        was cut in its content to fit), and the pairs skipped as ``skipped_identical``, ``skipped_empty`` (a null or
        empty prompt or response; ``first_skipped_empty``: the first one's id) and ``skipped_too_long``
        (``prompts_dropped`` is 0 here: a dropped pair counts as ``skipped_too_long``)."""
        return super().summary()
