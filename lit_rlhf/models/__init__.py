"""The policy's model side: lm.py (the seq2seq/causal difference), logprobs.py (the response tokens' log-probs,
the LM head chunk by chunk), loading.py, lora.py, checkpointing.py, generation.py (generation_config, special
tokens, sampling), decoding.py (the KV-cached loop), episodes.py (multi-turn episodes with an environment),
policy.py (Policy: generate, score), export.py, tiny.py (the embedded tiny models).

Knows no module, no reward and no dataset: imports only objectives, runtime and settings.
"""

from lit_rlhf.models.decoding import SampledRollout, inverse_cdf_sample, sample_with_cache, warpers
from lit_rlhf.models.episodes import Episode, episode_tensors, pad_rows, run_episodes
from lit_rlhf.models.lm import logprobs_from_logits, position_limit, trim_batch
from lit_rlhf.models.loading import (
    build_policy, ensure_pad_token, finetune_errors, is_encoder_decoder, load_causal_or_seq2seq, model_source_errors,
)
from lit_rlhf.models.logprobs import full_kl_per_token
from lit_rlhf.models.lora import lora_wrapping, merge_adapter
from lit_rlhf.models.policy import Policy, ResponseBatch, ValueHead
from lit_rlhf.models.tiny import (
    SUMMARIZER_ARCHITECTURE,
    build_tiny_t5,
    build_tokenizer,
    default_cache_dir,
    looks_like_local_path,
    resolve_model_path,
)

__all__ = [
    "Episode",
    "Policy",
    "ResponseBatch",
    "SUMMARIZER_ARCHITECTURE",
    "SampledRollout",
    "ValueHead",
    "build_policy",
    "ensure_pad_token",
    "episode_tensors",
    "pad_rows",
    "build_tiny_t5",
    "build_tokenizer",
    "default_cache_dir",
    "full_kl_per_token",
    "inverse_cdf_sample",
    "is_encoder_decoder",
    "load_causal_or_seq2seq",
    "logprobs_from_logits",
    "looks_like_local_path",
    "lora_wrapping",
    "merge_adapter",
    "finetune_errors",
    "model_source_errors",
    "position_limit",
    "resolve_model_path",
    "run_episodes",
    "sample_with_cache",
    "trim_batch",
    "warpers",
]
