"""Where prompts come from and how they become batches: sources, prompt formats, the data modules."""

from lit_rlhf.data.dialogsum import (
    DEFAULT_PROMPT_TEMPLATE,
    DialogSumDataModule,
    apply_prompt_and_tokenize,
    load_bundled_dialogsum,
    load_predict_rows,
    tokenize_summary,
)
from lit_rlhf.data.batching import PromptCollator, PromptStreamSampler, pad
from lit_rlhf.data.formats import context_tokens, end_of_turn
from lit_rlhf.data.pairs import PairColumns, pair_texts
from lit_rlhf.data.preferences import PreferenceDataModule
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.data.sources import is_blank, load_source

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "DialogSumDataModule",
    "PairColumns",
    "PreferenceDataModule",
    "PromptCollator",
    "PromptDataModule",
    "PromptStreamSampler",
    "apply_prompt_and_tokenize",
    "context_tokens",
    "end_of_turn",
    "is_blank",
    "load_bundled_dialogsum",
    "load_predict_rows",
    "load_source",
    "pad",
    "pair_texts",
    "tokenize_summary",
]
