"""The one generate -> decode -> score path: training, validation/test, prediction and the toxicity callback.

    generate_responses   prompts fitted to the context, sampled (``generate``, or the cached loop of
                         ``lit_rlhf.models.decoding`` with fast rollout) in chunks of generation.batch_size rows
                         (``decode_in_chunks``), responses decoded
    generate_episodes    with model.environment: multi-turn episodes (``lit_rlhf.models.episodes``), the whole
                         conversation after the first prompt as the response, ``action_mask`` the model's own tokens,
                         scored by the environment
    score_responses      the reward's scores, or the reason they are unusable (non-finite)
    collect              both, timed per phase
    evaluation_rng       seeded sampling for measurements, isolated from the training run's random stream

Log-probabilities of the collected responses come from ``Policy.score`` (one group loop for every caller).
Shapes: B rows, P query tokens, T response tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lit_rlhf.models import Episode, Policy, ResponseBatch, SampledRollout, episode_tensors, run_episodes
from lit_rlhf.rewards import Environment, NonFiniteRewardError, Reward
from lit_rlhf.settings import GenerationSettings, longest_response

Timer = Callable[[str], AbstractContextManager]


class PhaseTimer(dict):
    """Seconds of each named phase of the last step: ``with timer("time/ppo/generate"): ...``."""

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[name] = time.perf_counter() - start


@dataclass
class Generated:
    """Responses to one batch of prompts, decoded and (after ``score_responses``) scored."""

    rows: ResponseBatch  # query [B, P] as fitted for generation, response [B, T]
    texts: list[str]  # decoded responses
    prompts: list[str]
    references: list[Any] | None
    sampled: SampledRollout | None = None
    columns: dict[str, list[Any]] = field(default_factory=dict)  # the batch's source columns, per response  # fast rollout: log-probs and values kept while sampling
    scores: Tensor | None = None  # [B] the reward's raw scores
    reward_error: str | None = None  # why the scores are unusable (non-finite), if they are
    action_mask: Tensor | None = None  # [B, T] the model's own tokens (model.environment); None: the response mask
    episodes: list[Episode] | None = None  # model.environment: each row's conversation


@dataclass
class Rollout:
    """One PPO step's experience; tensors are [B, P] (query) or [B, T] (response)."""

    rows: ResponseBatch
    scores: Tensor  # [B] shaped (scaled, clipped) scores used for the advantages
    logprobs: Tensor
    values: Tensor
    ref_logprobs: Tensor | None  # None: no reference (init_kl_coef 0)
    groups: list[Tensor]  # mini-batch row indices of the first epoch (the rollout's scoring used the same)
    kl: Tensor | None = None  # [B, T] exact per-token KL (kl_estimator "full")
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    raw_scores: Tensor | None = None  # [B] the reward's scores before scaling/clipping
    old_from_update: bool = False  # ``logprobs`` are filled by the (on-policy) update's own forward
    loss_rows: Tensor | None = None  # [B] bool: the rows the policy loss is over (None: all; modules.ppo_filters)
    filter_stats: dict[str, Tensor] = field(default_factory=dict)  # what was left out or penalised, logged
    action_mask: Tensor | None = None  # [B, T] the model's own tokens (model.environment); None: every response token

    @property
    def loss_mask(self) -> Tensor:
        """[B, T] the tokens the loss, the KL and the statistics are over: the model's own (``action_mask``), or
        every response token."""
        return self.rows.response_mask if self.action_mask is None else self.action_mask


@torch.no_grad()
def generate_responses(
    policy: Policy, batch: dict[str, Any], settings: GenerationSettings, limits: Tensor, fast: bool = False,
    synced_gpus: bool | None = None, repeats: int = 1,
) -> Generated:
    """Sample one response per prompt of a collated batch (``input_ids``, ``attention_mask`` on the policy's
    device, ``query``, and optionally ``reference`` and ``columns``), each within its own length limit ``limits`` [B], and decode them.

    A decoder-only model's prompts are first fit to its context with the longest response (``Policy.fit_prompts``:
    a safety net; the data module's prompts already leave that room, ``data.reserve_tokens``). ``fast``: the
    cached loop that keeps the sampled tokens' log-probs and values (not with sharded weights). ``synced_gpus``:
    keep decoding until every process is done (needed when every forward is a collective, FSDP/ZeRO-3).
    ``repeats``: k responses per prompt, rows of one prompt contiguous (one batched call with distinct random
    draws; the cached loop runs a seq2seq encoder once per prompt); ``limits`` then has B x k entries.
    The rows are decoded ``settings.batch_size`` at a time (:func:`decode_in_chunks`)."""
    query_ids, query_mask = policy.fit_prompts(batch["input_ids"], batch["attention_mask"],
                                               longest_response(settings.max_new_tokens))
    response_ids, response_mask, sampled = decode_in_chunks(policy, query_ids, query_mask, settings, limits, fast,
                                                            synced_gpus, repeats)
    query_ids, query_mask = (t.repeat_interleave(repeats, 0) for t in (query_ids, query_mask))
    rows = ResponseBatch(query_ids, query_mask, response_ids, response_mask)
    texts = policy.decode(response_ids, response_mask)
    prompts, references = (_repeat(column, repeats) for column in (batch["query"], batch.get("reference")))
    return Generated(rows, texts, prompts, references, sampled, _repeat_columns(batch.get("columns") or {}, repeats))


def generate_episodes(
    policy: Policy, batch: dict[str, Any], settings: GenerationSettings, limits: Tensor, environment: Environment,
    synced_gpus: bool | None = None, repeats: int = 1, score: bool = True,
) -> Generated:
    """``generate_responses`` with an environment (``lit_rlhf.models.episodes``): k episodes per row of the batch
    (its source ``columns``), scored by the environment. The response is the whole conversation after the first
    prompt; ``action_mask`` marks the model's own tokens. ``batch``'s own prompt ids are not read: the
    environment's first messages are the prompt."""
    n = len(batch["input_ids"])
    columns = batch.get("columns") or {}
    rows = [{name: values[i] for name, values in columns.items()} for i in range(n) for _ in range(repeats)]

    def generate(query_ids: Tensor, query_mask: Tensor, turn_limits: Tensor) -> tuple[Tensor, Tensor]:
        return decode_in_chunks(policy, query_ids, query_mask, settings, turn_limits, False, synced_gpus, 1)[:2]

    if not getattr(policy.tokenizer, "chat_template", None) and policy.first_notice("plain chat template"):
        rank_zero_info("model.environment: the tokenizer has no chat template; the conversations use "
                       "lit_rlhf.models.episodes.PLAIN_CHAT_TEMPLATE (<|role|>content lines)")
    tokens, device = policy.special_tokens, batch["input_ids"].device
    episodes = run_episodes(policy.tokenizer, environment, rows, limits, generate, tokens.eos, tokens.pad,
                            policy.max_positions(), device)
    query_ids, query_mask, response_ids, response_mask, own = (t.to(device) for t in episode_tensors(episodes, tokens.pad))
    generated = Generated(ResponseBatch(query_ids, query_mask, response_ids, response_mask),
                          policy.decode(response_ids, response_mask),
                          [policy.tokenizer.decode(e.prompt_ids) for e in episodes],
                          _repeat(batch.get("reference"), repeats), None, _repeat_columns(columns, repeats),
                          action_mask=own)
    generated.episodes = episodes
    if not score:  # (predict on rows the environment's reward cannot read)
        return generated
    scores = torch.tensor([float(environment.reward(e.messages, e.row)) for e in episodes], dtype=torch.float32,
                          device=device)  # (where a reward's scores are: on the module's device)
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    generated.scores = None if bad else scores
    generated.reward_error = f"{environment.describe()} returned non-finite rewards at {bad}" if bad else None
    return generated


def _repeat_columns(columns: dict[str, list[Any]], repeats: int) -> dict[str, list[Any]]:
    return {name: _repeat(values, repeats) for name, values in columns.items()}


def _repeat(values: list[Any] | None, repeats: int) -> list[Any] | None:
    """Each value ``repeats`` times in a row (the k responses of one prompt are contiguous)."""
    return None if values is None else [x for x in values for _ in range(repeats)]


def decode_in_chunks(
    policy: Policy, query_ids: Tensor, query_mask: Tensor, settings: GenerationSettings, limits: Tensor,
    fast: bool, synced_gpus: bool | None, repeats: int,
) -> tuple[Tensor, Tensor, SampledRollout | None]:
    """Response ids and mask [B x k, T] (and the fast loop's log-probs and values), decoding at most
    ``settings.batch_size`` rows at once (whole prompts: ``batch_size`` / k of them; all when None).

    With ``fast``, each row samples from its own random numbers, [B x k, T] drawn at once from torch's global
    RNG before decoding: row i's t-th token uses number (i, t) whatever the chunk size, and whichever rows
    finished before it. ``generate`` draws for its whole chunk (``torch.multinomial``): there the tokens depend
    on the chunk size."""
    rows_per_chunk = settings.batch_size or len(limits)
    prompts_per_chunk = max(1, rows_per_chunk // repeats)
    uniforms = None
    if fast and settings.do_sample and policy.decode_blocker is None:
        # (a model the cached loop cannot serve samples with generate instead: no own streams there)
        uniforms = torch.rand(len(limits), int(limits.max()), device=query_ids.device)
    parts = []
    for start in range(0, query_ids.shape[0], prompts_per_chunk):
        prompts, rows = slice(start, start + prompts_per_chunk), slice(start * repeats, (start + prompts_per_chunk) * repeats)
        q, qm = query_ids[prompts], query_mask[prompts]
        if fast:
            parts.append(policy.sample(q, qm, settings, limits[rows], repeats=repeats,
                                       uniforms=None if uniforms is None else uniforms[rows]))
        else:
            q, qm = (t.repeat_interleave(repeats, 0) for t in (q, qm))
            ids, mask = policy.generate(q, qm, settings, max_new_tokens=limits[rows], synced_gpus=synced_gpus)
            parts.append(SampledRollout(ids, mask, torch.zeros_like(mask, dtype=torch.float),
                                        torch.zeros_like(mask, dtype=torch.float)))
    sampled = parts[0] if len(parts) == 1 else SampledRollout(*(
        pad_cat([getattr(part, name) for part in parts], policy.pad_token_id if name == "response_ids" else 0)
        for name in ("response_ids", "response_mask", "logprobs", "values")))
    return sampled.response_ids, sampled.response_mask, sampled if fast else None


def pad_cat(tensors: list[Tensor], pad: float) -> Tensor:
    """[b_i, T_i] tensors stacked into [sum b_i, max T_i], each right-padded with ``pad``."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in tensors])


def score_responses(reward: Reward, generated: Generated) -> Generated:
    """Score the responses; non-finite scores are recorded as ``reward_error`` (the caller decides to skip).
    Wrong shapes or counts still raise: they are bugs that no retry fixes."""
    try:
        generated.scores = reward(generated.prompts, generated.texts, references=generated.references,
                                  columns=generated.columns)
    except NonFiniteRewardError as err:
        generated.scores, generated.reward_error = None, str(err)
    return generated


def collect(
    policy: Policy, reward: Reward | None, batch: dict[str, Any], settings: GenerationSettings, limits: Tensor,
    fast: bool = False, synced_gpus: bool | None = None, timer: Timer | None = None, repeats: int = 1,
    environment: Environment | None = None, score: bool = True,
) -> Generated:
    """generate -> decode -> score, each phase inside ``timer(name)`` (``time/ppo/generate``, ``.../reward``).
    ``reward`` None or ``score`` false: the responses are not scored (``predict`` on prompts the reward cannot
    read). With an ``environment``: its episodes (``generate_episodes``), scored by it (``reward`` is not called)."""
    timer = timer if timer is not None else (lambda name: nullcontext())  # an empty PhaseTimer is falsy
    if environment is not None:
        with timer("time/ppo/generate"):
            return generate_episodes(policy, batch, settings, limits, environment, synced_gpus, repeats, score)
    with timer("time/ppo/generate"):
        generated = generate_responses(policy, batch, settings, limits, fast, synced_gpus, repeats)
    if reward is None or not score:
        return generated
    with timer("time/ppo/reward"):
        return score_responses(reward, generated)


@contextmanager
def evaluation_rng(seed: int, batch_size: int, settings: GenerationSettings) -> Iterator[Tensor]:
    """Seeded randomness for a measurement: inside, torch's global generators (CPU and every CUDA device)
    start from ``seed``; yields the batch's length limits [batch_size], drawn from their own generator seeded
    the same way. Every global RNG (torch, CUDA, Python, NumPy) comes back afterwards, so a measurement (a
    validation pass during fit, the toxicity callback) never shifts the training run's random stream, and the
    same seed gives the same samples before and after training, on any process."""
    low, high = settings.max_new_tokens
    limits = torch.randint(low, high, (batch_size,), generator=torch.Generator().manual_seed(seed))
    with isolate_rng(include_cuda=True):
        torch.manual_seed(seed)
        yield limits


@torch.no_grad()
def evaluate(
    policy: Policy, reward: Reward, batch: dict[str, Any], settings: GenerationSettings, seed: int,
    group_size: int, synced_gpus: bool | None = None, reference: bool = True, environment: Environment | None = None,
) -> dict[str, Tensor]:
    """Reward, KL to the reference (nats per response; not without a ``reference``) and response length of
    responses sampled on held-out prompts, with seeded randomness isolated from training (a validation pass
    leaves a resume exact). With an ``environment``: its episodes, the KL and length over the model's tokens."""
    with evaluation_rng(seed, len(batch["input_ids"]), settings) as limits:
        generated = collect(policy, reward, batch, settings, limits, synced_gpus=synced_gpus, environment=environment)
    if generated.scores is None:
        raise ValueError(f"The reward returned non-finite scores on held-out prompts: {generated.reward_error}")
    rows = generated.rows
    own = rows.response_mask if generated.action_mask is None else generated.action_mask
    stats = {"reward_mean": generated.scores.float().mean()}
    if reference:
        scores = policy.score(rows, list(torch.arange(len(generated.texts)).split(group_size)), values=False)
        kl = scores.logprobs - scores.ref_logprobs
        stats["kl"] = (kl if generated.action_mask is None else kl * own).sum(1).mean()
    return {**stats, "response_length": own.sum(1).float().mean()}


def samples_markdown(prompts: list[str], responses: list[str], scores: Tensor, n: int) -> str:
    """A markdown table of the first ``n`` prompts (their last 300 characters), responses and rewards."""
    def cell(text: str) -> str:
        return text.replace("\n", " ").replace("|", "\\|")

    rows = ["| query | response | reward |", "|---|---|---|"]
    rows += [f"| {cell(q)[-300:]} | {cell(r)} | {float(x):.4f} |" for q, r, x in zip(prompts[:n], responses[:n], scores[:n])]
    return "\n".join(rows)


def log_samples(logger: Any, rollout: Rollout, n: int, step: int) -> None:
    """Write the first ``n`` samples of ``rollout`` as a table (``samples_markdown``) to a logger that takes
    text (TensorBoard's ``add_text``); other loggers, or none, skip it."""
    experiment = getattr(logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_text"):
        table = samples_markdown(rollout.prompts, rollout.responses, rollout.raw_scores, n)
        experiment.add_text("samples", table, step)


def predict_records(generated: Generated, batch: dict[str, Any], scorer_name: str | None) -> list[dict[str, Any]]:
    """One record per response for a prediction file: ``id``, the input and the response under the batch's
    ``record_names`` (``dialogue`` and ``summary`` for DialogSum, ``prompt`` and ``response`` otherwise) and,
    when the responses were scored, ``score`` (named by ``scorer_name``)."""
    n = len(generated.texts)
    source, output = batch.get("record_names", ("dialogue", "summary"))
    ids, inputs = batch.get("id", [None] * n), batch.get(source) or [None] * n
    records = [{"id": i, source: x, output: t.strip()} for i, x, t in zip(ids, inputs, generated.texts)]
    if generated.scores is not None:
        for record, score in zip(records, generated.scores.tolist()):
            record.update(score=score, scorer=scorer_name)
    return records
