"""Where prompts come from and how they become batches: sources.py, formats.py (prompt formats and their
truncation), batching.py (padding, collators, the seeded prompt stream), rows.py (the row pipeline), the data
modules prompts.py (PromptDataModule), dialogsum.py (DialogSumDataModule), preferences.py and pairs.py
(PreferenceDataModule), and sampled_pairs.py (a command: preference pairs sampled from a policy).

Knows no LightningModule: may import rollout, models, rewards, objectives, runtime and settings.
"""

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
