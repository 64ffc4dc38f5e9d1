"""Typed settings groups: the docstring under each field becomes its ``--help`` text in LightningCLI.

Each group validates itself (``errors()``, a list of messages that name the flag to change), and
:func:`check` raises one ``ValueError`` listing every problem, before anything is loaded or written. Choice
lists have one source: the ``Literal`` type, read with ``typing.get_args``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import torch

from lit_rlhf.objectives import (
    CRITIC_FREE_ESTIMATORS, GROUP_ESTIMATORS, AdaptiveKLController, AdvantageEstimator, FixedKLController,
    ImportanceSampling, KLEstimator, LossAggregation, Overlong, PolicyLossType, PolicyVariant,
)

LoraBias = Literal["none", "all", "lora_only"]
WeightDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""``model.dtype``: the dtype the frozen base weights are stored and computed in. The trainable weights (LoRA
adapter, value head) and the optimizer state stay float32 in every case (peft upcasts the adapter). ``auto``:
see :func:`resolve_dtype`."""


@dataclass
class LoraSettings:
    """The LoRA adapter trained by PPO (peft)."""

    r: int = 32
    """Rank of the LoRA update matrices."""
    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input (active only when dropout is on in the PPO update, see ``train_dropout``)."""
    target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names that get an adapter: each must name modules of the model (the last part of their names,
    or a dotted suffix; lm_head included), else the error lists the model's linear layers. ``all-linear``:
    every linear layer but the output one (peft's shortcut). None: peft's default for the architecture (T5:
    q, v; GPT-2: c_attn; Llama, Qwen, Mistral: q_proj, v_proj); architectures peft has none for (Phi-3,
    Pegasus, mBART) need a list or ``all-linear``. A targeted lm_head that is tied to the input embedding gets
    its own copy of the weight first, so that the adapter changes the output layer only (also once merged)."""
    bias: LoraBias = "none"
    """Which biases are trained with the adapter: none, all, or lora_only (those of the adapted layers). Trained
    biases change the base model in place; the KL reference puts their initial values back."""

    def errors(self, prefix: str = "model.lora") -> list[str]:
        errors = []
        if self.r < 1 or self.alpha <= 0:
            errors.append(f"{prefix}.r and {prefix}.alpha must be > 0, got {self.r}, {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"{prefix}.dropout must lie in [0, 1), got {self.dropout}")
        errors += _choice(self.bias, f"{prefix}.bias", LoraBias)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            errors.append(f"{prefix}.target_modules must be a list of module names, all-linear or null, "
                          f"got {self.target_modules!r}")
        return errors


def longest_response(max_new_tokens: int | tuple[int, int] | list[int]) -> int:
    """The most tokens one response may take under ``max_new_tokens``: n itself, or a [low, high) range's
    ``high - 1`` (each response's limit is drawn from it, high excluded)."""
    if isinstance(max_new_tokens, int):
        return max_new_tokens
    return int(max_new_tokens[1]) - 1


@dataclass
class GenerationSettings:
    """How responses are sampled in the rollout (one batched call per PPO step)."""

    min_new_tokens: int = 4
    """End-of-sequence is blocked until this many tokens were generated. The FLAN-T5 recipe's
    ``min_length=5`` counts T5's decoder start token, i.e. 4 new tokens."""
    max_new_tokens: tuple[int, int] = (100, 400)
    """Each response's maximum length is drawn per sample, uniformly from [low, high) as the recipe's
    length sampler does; a response stops at its own draw or at end-of-sequence. (n, n + 1) fixes it at n.
    A decoder-only model's prompts leave room for the longest, high - 1 (data.reserve_tokens, linked)."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False)."""
    top_k: int = 0
    """Top-k filtering; 0 disables it (the recipe samples from the full distribution)."""
    top_p: float = 1.0
    """Nucleus filtering; 1.0 disables it."""
    temperature: float = 1.0
    """Softmax temperature for sampling. The PPO log-probabilities are those of the policy at this temperature
    (model.ppo.logprobs_at_temperature; false: the temperature-1 policy's, off-policy when this is not 1.0)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size within a response (``generate``'s option); 0 disables it.
    For greedy evaluation summaries of small models, which otherwise loop; it makes a PPO rollout off-policy
    and is not available with fast_rollout."""
    batch_size: int | None = None
    """Rows decoded at once (prompts x samples per prompt); the rollout decodes its rows in chunks of this many,
    which bounds the KV cache. None: all rows at once. With fast_rollout each row samples from its own stream of
    random numbers, so the tokens do not depend on the chunk size; generate (fast_rollout=false) draws for the
    whole chunk, so there the same chunk size and seed give the same tokens. A multiple of
    model.samples_per_prompt."""

    def __post_init__(self) -> None:
        self.max_new_tokens = tuple(self.max_new_tokens)  # a YAML list or a checkpoint's list

    def errors(self, prefix: str = "model.generation") -> list[str]:
        errors = []
        if len(self.max_new_tokens) != 2 or not (0 < self.max_new_tokens[0] < self.max_new_tokens[1]):
            errors.append(
                f"{prefix}.max_new_tokens must be [low, high) with 0 < low < high, got {list(self.max_new_tokens)}"
            )
        if self.min_new_tokens < 0:
            errors.append(f"{prefix}.min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.top_k < 0:
            errors.append(f"{prefix}.top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"{prefix}.top_p must lie in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            errors.append(f"{prefix}.temperature must be > 0, got {self.temperature}")
        if self.no_repeat_ngram_size < 0:
            errors.append(f"{prefix}.no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        if self.batch_size is not None and self.batch_size < 1:
            errors.append(f"{prefix}.batch_size must be >= 1 (or null: all rows at once), got {self.batch_size}")
        return errors


@dataclass
class PPOSettings:
    """PPO hyperparameters (defaults: the FLAN-T5 detoxification recipe, i.e. TRL 0.11's defaults)."""

    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    init_kl_coef: float = 0.2
    """Initial KL penalty coefficient beta. 0: no reference at all (none loaded, none scored; beta stays 0, and the
    KL to the initial policy is not logged)."""
    adaptive_kl: bool = True
    """Adapt beta towards ``kl_target`` (Ziegler et al. 2019); False keeps it fixed at ``init_kl_coef``."""
    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in samples."""
    kl_estimator: KLEstimator = "kl"
    """Per-token KL estimator in the reward penalty: kl (k1), abs, mse (k2), full (exact over the vocabulary)."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clipping epsilon."""
    cliprange_value: float = 0.2
    """Value clipping epsilon."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    max_grad_norm: float | None = None
    """Clip the gradient norm of the trainable parameters to this value (None: no clipping)."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch whose mean importance ratio exceeds this (guards against policy collapse)."""
    whiten_advantages: bool = True
    """Whiten advantages over the whole (global) rollout batch."""
    score_scale: float = 1.0
    """Multiply rewards from the reward model by this before use."""
    score_clip: float | None = None
    """Clip scaled rewards to [-score_clip, score_clip] (None: no clipping)."""
    sort_by_length: bool = True
    """Group responses of similar length into mini-batches (less padding, faster); the mini-batch order is
    still shuffled."""
    advantage_estimator: AdvantageEstimator = "gae"
    """gae: PPO with a value head (GAE). Critic-free, no value head built: grpo (group-relative, k >= 2
    samples per prompt), rloo (leave-one-out baseline, k >= 2), reinforce_pp (REINFORCE++: KL-shaped
    returns whitened over the batch). k is model.samples_per_prompt."""
    grpo_scale_rewards: bool = True
    """grpo: divide by the group's reward std (GRPO); False: only subtract the group mean (Dr. GRPO)."""
    kl_in_loss: bool = False
    """Put the KL in the loss (GRPO's k3 per token, coefficient beta = init_kl_coef, adapted when
    adaptive_kl) instead of in the reward. The KL is reported either way."""
    loss_aggregation: LossAggregation = "token_mean"
    """How a mini-batch's per-token policy loss becomes one number: token_mean (every token weighs the same,
    DAPO; the PPO default), sequence_mean (mean per response, then over responses, GRPO), token_sum_norm (sum
    divided by batch x longest response, Dr. GRPO)."""
    cliprange_high: float | None = None
    """Upper clipping epsilon of the ratio: it is clipped to [1 - cliprange, 1 + cliprange_high] (DAPO's
    clip-higher, e.g. 0.28 with cliprange 0.2). None: 1 + cliprange (symmetric). With policy_loss=cispo: the
    importance weight's upper bound."""
    importance_sampling: ImportanceSampling = "token"
    """Level of the importance ratio: token (PPO, one ratio per token), sequence (GSPO: one ratio per
    response, exp of the mean token log-ratio, on every token, clipped), sequence_token (GSPO-token: the
    sequence ratio's value, each token's own gradient). GSPO uses far smaller clip ranges (e.g. 3e-4/4e-4)."""
    policy_loss: PolicyLossType = "ppo"
    """ppo: the clipped surrogate. cispo (MiniMax-M1): -sg[min(ratio, 1 + cliprange_high)] * A * log-prob,
    every token keeps its gradient (no lower bound; cliprange_high null: 1 + cliprange; TRL's epsilon_high=5
    is cliprange_high=4)."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss loses entropy_coef x the policy's mean token entropy over the response tokens
    (aggregated like the loss, from the update's forward pass). ppo/policy/entropy is logged either way."""
    drop_zero_std_groups: bool = False
    """grpo, rloo: leave out of the policy loss the responses of groups whose scores (before the KL penalty) are all
    equal, which carry no signal (DAPO's dynamic sampling, without resampling: the step trains on fewer responses,
    the loss a mean over the kept ones; a step that keeps none makes no update and still logs). Logged:
    env/dropped_group_frac."""
    overlong: Overlong = "none"
    """Truncated responses (at their length limit, max_new_tokens' draw, without end-of-sequence): none (trained like
    the others); mask (left out of the policy loss, TRL's mask_truncated_completions); penalty (DAPO's soft overlong
    punishment added to the scaled score before the advantages: 0 up to limit - overlong_buffer tokens, then
    linear down to -1 at the limit). Logged: env/truncated_frac (and env/overlong_penalty_mean)."""
    overlong_buffer: int = 50
    """overlong=penalty: the punishment buffer L_cache, in tokens before each response's limit."""
    entropy_after_update: bool = False
    """Also log ppo/policy/entropy_after: the policy's mean token entropy on the rollout's responses after the
    step's optimizer steps (ppo/policy/entropy: in the update's forwards, before each mini-batch's step). Costs one
    more forward without gradients over the rollout batch per step, about a third of the update's compute."""

    logprobs_at_temperature: bool = True
    """The log-probabilities of PPO (old, new and reference: the ratio, the KL, the entropy) are those of the
    distribution the rollout samples from, softmax(logits / model.generation.temperature), as TRL, verl and OpenRLHF
    compute them. false: the temperature-1 policy's. Nothing changes at temperature 1 or with greedy rollouts."""

    def kl_controller(self) -> AdaptiveKLController | FixedKLController:
        """A fresh KL controller for these settings (adaptive towards ``kl_target``, or fixed)."""
        if self.adaptive_kl:
            return AdaptiveKLController(self.init_kl_coef, self.kl_target, self.kl_horizon)
        return FixedKLController(self.init_kl_coef)

    def policy_variant(self) -> PolicyVariant:
        """The policy term these settings ask for (``objectives.ppo_objective``'s ``variant``)."""
        return PolicyVariant(self.cliprange_high, self.importance_sampling, self.policy_loss, self.entropy_coef)

    def errors(self, prefix: str = "model.ppo") -> list[str]:
        errors = []
        if self.ppo_epochs <= 0:
            errors.append(f"{prefix}.ppo_epochs must be > 0, got {self.ppo_epochs}")
        errors += _choice(self.kl_estimator, f"{prefix}.kl_estimator", KLEstimator)
        if not (0.0 <= self.gamma <= 1.0) or not (0.0 <= self.lam <= 1.0):
            errors.append(f"{prefix}.gamma and {prefix}.lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            errors.append(f"{prefix}.cliprange and {prefix}.cliprange_value must be > 0")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0):
            errors.append(f"{prefix}.kl_target and {prefix}.kl_horizon must be > 0 with adaptive_kl")
        if self.init_kl_coef < 0:
            errors.append(f"{prefix}.init_kl_coef must be >= 0, got {self.init_kl_coef}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            errors.append(f"{prefix}.max_grad_norm must be > 0 (or null), got {self.max_grad_norm}")
        if self.score_clip is not None and not self.score_clip > 0:
            errors.append(f"{prefix}.score_clip must be > 0 (or null), got {self.score_clip}")
        if not self.ratio_threshold > 0:
            errors.append(f"{prefix}.ratio_threshold must be > 0, got {self.ratio_threshold}")
        errors += _choice(self.advantage_estimator, f"{prefix}.advantage_estimator", AdvantageEstimator)
        errors += _choice(self.loss_aggregation, f"{prefix}.loss_aggregation", LossAggregation)
        return errors + self._variant_errors(prefix)

    def _variant_errors(self, prefix: str) -> list[str]:
        errors = _choice(self.importance_sampling, f"{prefix}.importance_sampling", ImportanceSampling)
        errors += _choice(self.policy_loss, f"{prefix}.policy_loss", PolicyLossType)
        if self.cliprange_high is not None and not (self.cliprange_high > 0 and math.isfinite(self.cliprange_high)):
            errors.append(f"{prefix}.cliprange_high must be > 0 (or null: cliprange), got {self.cliprange_high}")
        if not (self.entropy_coef >= 0 and math.isfinite(self.entropy_coef)):
            errors.append(f"{prefix}.entropy_coef must be >= 0, got {self.entropy_coef}")
        errors += _choice(self.overlong, f"{prefix}.overlong", Overlong)
        if self.overlong_buffer < 1:
            errors.append(f"{prefix}.overlong_buffer must be >= 1, got {self.overlong_buffer}")
        if self.drop_zero_std_groups and self.advantage_estimator not in GROUP_ESTIMATORS:
            errors.append(f"{prefix}.drop_zero_std_groups needs a group estimator ({prefix}.advantage_estimator one of "
                          f"{list(GROUP_ESTIMATORS)}), got {self.advantage_estimator!r}")
        return errors

    @property
    def uses_reference(self) -> bool:
        """A reference policy enters the step: False at ``init_kl_coef: 0``, where beta stays 0 (the adaptive
        controller multiplies it) and no reference is loaded or scored."""
        return self.init_kl_coef != 0

    @property
    def critic_free(self) -> bool:
        """No value head: the advantages come from the rewards alone."""
        return self.advantage_estimator in CRITIC_FREE_ESTIMATORS


def _choice(value: Any, flag: str, choices_type: Any) -> list[str]:
    choices = get_args(choices_type)
    return [] if value in choices else [f"{flag} must be one of {list(choices)}, got {value!r}"]


def as_settings(cls: type, value: Any) -> Any:
    """A settings object from itself or from the plain dict a checkpoint's hyperparameters hold."""
    return cls(**value) if isinstance(value, dict) else value


def lora_settings(value: LoraSettings | dict[str, Any] | None, flag: str = "model.lora") -> LoraSettings:
    """The LoRA settings every module and the policy take from their ``lora`` argument: a ``LoraSettings``, a
    plain dict (a Python caller's, or a checkpoint's hyperparameters) or None (the defaults). Checked here, the
    one place for every module: a bad value is a ValueError naming its flag (``model.lora.r``), not a failure
    inside peft once the model is loaded."""
    if isinstance(value, dict):
        known = [f.name for f in fields(LoraSettings)]
        unknown = [k for k in value if k not in known]
        if unknown:
            raise ValueError(f"{flag} has no setting {', '.join(map(repr, unknown))}; its settings: {', '.join(known)}")
    elif value is not None and not isinstance(value, LoraSettings):
        raise ValueError(f"{flag} must be LoRA settings ({{r: ..., alpha: ...}}), got {type(value).__name__}")
    lora = LoraSettings() if value is None else as_settings(LoraSettings, value)
    check(lora.errors(flag))
    return lora


def plain(settings: Any) -> dict[str, Any]:
    """A settings object as a plain dict (checkpoints then load with ``torch.load(weights_only=True)``)."""
    return asdict(settings)


def run_errors(
    ppo_steps: int | None, learning_rate: float, rollout_batch_size: int, mini_batch_size: int,
    max_consecutive_skips: int, samples_per_prompt: int = 1, estimator: str = "gae",
) -> list[str]:
    """Problems with the module-level run settings; messages name the flag."""
    errors = []
    responses = rollout_batch_size * samples_per_prompt
    if samples_per_prompt < 1:
        errors.append(f"model.samples_per_prompt must be >= 1, got {samples_per_prompt}")
    elif estimator in GROUP_ESTIMATORS and samples_per_prompt < 2:
        errors.append(f"model.ppo.advantage_estimator={estimator} compares the samples of one prompt: it needs "
                      f"model.samples_per_prompt >= 2, got {samples_per_prompt}")
    if mini_batch_size <= 0 or rollout_batch_size <= 0:
        errors.append(f"model.mini_batch_size ({mini_batch_size}) and data.batch_size ({rollout_batch_size}) must be > 0")
    elif samples_per_prompt >= 1 and responses % mini_batch_size:
        per_step = f"data.batch_size={rollout_batch_size}" + (
            f" x model.samples_per_prompt={samples_per_prompt}" if samples_per_prompt > 1 else "")
        errors.append(f"model.mini_batch_size={mini_batch_size} must divide the rollout batch {per_step}")
    if ppo_steps is not None and ppo_steps <= 0:
        errors.append(f"model.ppo_steps must be > 0 (or null), got {ppo_steps}")
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        errors.append(f"model.learning_rate must be a positive number, got {learning_rate}")
    if max_consecutive_skips < 1:
        errors.append(f"model.max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
    return errors


def memory_errors(generation_batch_size: int | None, samples_per_prompt: int, mini_batch_size: int,
                  micro_batch_size: int | None = None, logprob_chunk_size: int = 0) -> list[str]:
    """Problems with the memory settings (rollout chunk, micro-batch, log-prob chunk); messages name the flag."""
    errors = [] if logprob_chunk_size >= 0 else [f"model.logprob_chunk_size must be >= 0, got {logprob_chunk_size}"]
    if generation_batch_size is not None and samples_per_prompt >= 1 and generation_batch_size % samples_per_prompt:
        errors.append(f"model.generation.batch_size={generation_batch_size} must be a multiple of "
                      f"model.samples_per_prompt={samples_per_prompt} (a prompt's samples are decoded together)")
    if micro_batch_size is not None and (micro_batch_size < 1 or mini_batch_size % micro_batch_size):
        errors.append(f"model.micro_batch_size={micro_batch_size} must be >= 1 and divide "
                      f"model.mini_batch_size={mini_batch_size} (or be null: one pass per mini-batch)")
    return errors


def check(errors: list[str]) -> None:
    """Raise one ValueError that lists every problem (none: return)."""
    if errors:
        raise ValueError("Invalid settings:\n  - " + "\n  - ".join(errors))


def resolve_dtype(setting: str, device: Any = None, trains_base: bool = False, flag: str = "model.dtype") -> tuple[str, str]:
    """The weight dtype ``setting`` stands for on ``device`` (a torch device or its name; None: the CPU), and why.

    ``auto``: bfloat16 on a CUDA device that supports it (half the memory of the frozen base, and faster); float32
    everywhere else. A CPU stays float32: bfloat16 pays there only with AVX512-BF16/AMX and a model of tens of
    millions of parameters or more (1.5-1.6x per PPO step on a 40M T5; no gain on the embedded tiny models,
    benchmarks/README.md), and float32 keeps CPU results as they were. ``trains_base`` (a full fine-tune, trained
    LoRA biases): float32, as :func:`dtype_errors` requires. Any other setting is returned as it is."""
    if setting != "auto":
        return setting, f"{flag}={setting}"
    if trains_base:
        return "float32", f"{flag}=auto: float32, as the base model's weights are trained"
    kind = str(getattr(device, "type", device or "cpu")).split(":")[0]
    if kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16", f"{flag}=auto: bfloat16 on a CUDA device with bfloat16"
    return "float32", f"{flag}=auto: float32 on {kind} (bfloat16 is chosen only on a CUDA device with bfloat16)"


def resolve_base_dtype(setting: str, device: Any, finetune: str, lora_bias: str, weights: str) -> str:
    """:func:`resolve_dtype` for a model's base weights (trained under ``finetune=full`` or LoRA biases other
    than ``none``), logged once (rank zero) as ``<weights> in <dtype> (<reason>)``."""
    from lightning.pytorch.utilities import rank_zero_info

    resolved, reason = resolve_dtype(setting, device, trains_base=finetune == "full" or lora_bias != "none")
    rank_zero_info(f"{weights} in {resolved} ({reason})")
    return resolved


def dtype_errors(dtype: str, finetune: str = "lora", lora_bias: str = "none", prefix: str = "model") -> list[str]:
    """Problems with ``model.dtype``: half-precision (bfloat16, float16) weights are only for the frozen base.

    Trained weights stored in half precision would make AdamW update half-precision master weights, where an
    update smaller than about 2**-8 of the weight (bfloat16's rounding) is lost."""
    errors = _choice(dtype, f"{prefix}.dtype", WeightDtype)
    if dtype == "auto":  # resolves to float32 where the base is trained
        return errors
    if dtype != "float32" and finetune == "full":
        errors.append(f"{prefix}.finetune=full trains every weight, which {prefix}.dtype={dtype} would store (and "
                      f"update) in {dtype}: use {prefix}.dtype=float32 with trainer.precision=bf16-mixed, or "
                      f"{prefix}.finetune=lora")
    if dtype != "float32" and lora_bias != "none":
        errors.append(f"{prefix}.lora.bias={lora_bias} trains the base model's biases, which {prefix}.dtype={dtype} "
                      f"stores in {dtype}: use {prefix}.lora.bias=none or {prefix}.dtype=float32")
    return errors
