"""Memory levers: gradient checkpointing, the attention kernel, micro-batches, rollout chunks, the weight dtype,
building the models in ``configure_model``, and FSDP's wrapped blocks.

Each lever must leave the computation as it was (same loss, same gradient, same samples) up to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.models import Policy, ResponseBatch

from lit_rlhf.settings import LoraSettings

from conftest import perturb_lora
from tiny_architectures import build_tiny

T5, GPT2 = "embedded:tiny-t5", "embedded:tiny-gpt2"
SMALL_LORA = LoraSettings(r=4, alpha=4)
PROMPTS = ["#Person1#: Hello there, how are you today? #Person2#: Fine, thanks.", "Hi",
           "#Person2#: I would like a cup of tea, please."]

TINY_KINDS = {"llama": {}, "qwen2": {},
              # dropout 0.1 at every level (attention, activation, the layer's own functional dropout)
              "bart": {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1}}
"""Tiny config-built models (``tiny_architectures``) and the config fields set over their builders'."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {T5: T5, GPT2: GPT2, **{kind: build_tiny(kind, root / kind, config_fields=fields)
                                   for kind, fields in TINY_KINDS.items()}}


def make_policy(name: str, **kwargs) -> Policy:
    torch.manual_seed(0)  # the same LoRA initialisation in every policy built here
    policy = Policy(name, lora=SMALL_LORA, **kwargs)
    perturb_lora(policy.model)  # lora_B != 0: the adapter changes the function and lora_A gets a gradient
    return policy


def response_batch(policy: Policy, seed: int = 0, response_tokens: int = 5) -> ResponseBatch:
    """The three prompts, padded as the model kind needs, with random responses of different lengths."""
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    generator = torch.Generator().manual_seed(seed)
    response = torch.randint(3, 200, (len(PROMPTS), response_tokens), generator=generator)
    mask = (torch.arange(response_tokens)[None] < torch.tensor([[5], [2], [4]])).long()
    return ResponseBatch(enc.input_ids, enc.attention_mask, response, mask)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def first_block_child(policy: Policy) -> torch.nn.Module:
    """A module inside the first checkpointed block: it runs again when the block is recomputed (hooks on the
    block itself stay outside transformers' checkpoint)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    block = next(m for m in policy.model.modules() if isinstance(m, GradientCheckpointingLayer))
    return next(m for m in block.modules() if isinstance(m, torch.nn.Linear))


def update_pass(policy: Policy, batch: ResponseBatch, dropout: bool = False) -> tuple[torch.Tensor, dict]:
    """The PPO update's forward (``forward_rows``) and a backward of a loss using log-probs and values."""
    policy.zero_grad()
    out, rows, _ = policy.forward_rows(batch, torch.arange(len(PROMPTS)), dropout=dropout)
    mask = rows.response_mask
    loss = -(out.logprobs * mask).sum() / mask.sum() + (out.values * mask).square().sum() / mask.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("kind", [T5, GPT2, "qwen2", "bart"])
def test_gradient_checkpointing_recomputes_blocks_with_the_same_loss_and_gradient(kind, tiny_models):
    plain, checkpointed = (make_policy(tiny_models[kind], gradient_checkpointing=on) for on in (False, True))
    batch = response_batch(plain)
    plain_calls, checkpointed_calls = count_calls(first_block_child(plain)), count_calls(first_block_child(checkpointed))
    loss, grads = update_pass(plain, batch)
    loss_ckpt, grads_ckpt = update_pass(checkpointed, batch)
    # the update's pass (dropout off, i.e. eval mode) really checkpoints: the block ran again in backward
    assert plain_calls[0] == 1 and checkpointed_calls[0] == 2
    assert_close(loss_ckpt, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)
    # and every module is back in the mode the pass leaves without checkpointing, with its own dropout rates
    assert [m.training for m in checkpointed.modules()] == [m.training for m in plain.modules()]
    if kind == "bart":
        assert all(layer.dropout == 0.1 for layer in checkpointed.model.base_model.model.model.encoder.layers)


def test_gradient_checkpointing_with_dropout_on_checkpoints_in_train_mode():
    policy = make_policy(GPT2, gradient_checkpointing=True)
    calls = count_calls(first_block_child(policy))
    update_pass(policy, response_batch(policy), dropout=True)
    assert calls[0] == 2


# ---------------------------------------------------------------------------------- attention kernel


def test_attn_implementation_reaches_the_model_and_a_bad_one_names_the_flag(tiny_models):
    policy = Policy(tiny_models["qwen2"], lora=SMALL_LORA, attn_implementation="eager")
    assert policy.model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="model.attn_implementation='no_such_kernel'"):
        Policy(tiny_models["qwen2"], lora=SMALL_LORA, attn_implementation="no_such_kernel")


# ---------------------------------------------------------------------------------- rollout chunks


def generate(policy: Policy, fast: bool, chunk: int | None, repeats: int = 2, seed: int = 7, **settings):
    from lit_rlhf.rollout import generate_responses
    from lit_rlhf.settings import GenerationSettings

    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "query": PROMPTS}
    limits = torch.tensor([3, 9, 5, 12, 7, 4])[: len(PROMPTS) * repeats]
    settings = GenerationSettings(min_new_tokens=1, max_new_tokens=(3, 13), batch_size=chunk, **settings)
    torch.manual_seed(seed)
    return generate_responses(policy, batch, settings, limits, fast=fast, repeats=repeats)


@pytest.mark.parametrize("kind", [T5, GPT2])
def test_chunked_fast_rollout_samples_the_same_tokens_as_one_batch(kind):
    policy = make_policy(kind)
    whole = generate(policy, True, None)
    assert whole.rows.response_mask.sum(1).float().std() > 0  # rows of different lengths leave at different steps
    for chunk in (2, 4):
        chunked = generate(policy, True, chunk)
        assert torch.equal(chunked.rows.response_ids, whole.rows.response_ids), chunk
        assert torch.equal(chunked.rows.response_mask, whole.rows.response_mask)
        assert chunked.texts == whole.texts
        assert_close(chunked.sampled.logprobs, whole.sampled.logprobs, atol=1e-5, rtol=1e-5)
        assert_close(chunked.sampled.values, whole.sampled.values, atol=1e-5, rtol=1e-5)
    # a different seed samples other tokens (the numbers are drawn, not fixed)
    assert not torch.equal(generate(policy, True, 2, seed=8).rows.response_ids, whole.rows.response_ids)


@pytest.mark.parametrize("kind", [T5, GPT2])
def test_chunked_generate_keeps_rows_in_order(kind):
    # generate draws for a whole chunk, so compare greedy decoding: the same tokens, rows in the same order
    policy = make_policy(kind)
    whole = generate(policy, False, None, do_sample=False)
    chunked = generate(policy, False, 2, do_sample=False)
    assert torch.equal(chunked.rows.response_mask, whole.rows.response_mask)
    mask = whole.rows.response_mask.bool()
    assert torch.equal(chunked.rows.response_ids[mask], whole.rows.response_ids[mask])
    assert chunked.texts == whole.texts


def test_chunk_and_micro_batch_settings_name_their_flags():
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.settings import GenerationSettings

    with pytest.raises(ValueError, match=r"model.generation.batch_size=3 must be a multiple of model.samples_per_prompt=2"):
        PPOModule(GPT2, generation=GenerationSettings(batch_size=3), samples_per_prompt=2, rollout_batch_size=2)
    with pytest.raises(ValueError, match=r"model.generation.batch_size must be >= 1"):
        PPOModule(GPT2, generation=GenerationSettings(batch_size=0))
    with pytest.raises(ValueError, match=r"model.micro_batch_size=3 must be >= 1 and divide model.mini_batch_size=4"):
        PPOModule(GPT2, mini_batch_size=4, micro_batch_size=3)


# ---------------------------------------------------------------------------------- micro-batches


def ppo_module(micro: int | None, aggregation: str, estimator: str):
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.settings import PPOSettings

    critic_free = estimator != "gae"
    torch.manual_seed(0)
    module = PPOModule(GPT2, lora=SMALL_LORA, rollout_batch_size=2 if critic_free else 4, mini_batch_size=4,
                       samples_per_prompt=2 if critic_free else 1, micro_batch_size=micro,
                       ppo=PPOSettings(loss_aggregation=aggregation, advantage_estimator=estimator,
                                       kl_in_loss=critic_free, adaptive_kl=False, init_kl_coef=0.3))
    perturb_lora(module.policy.model)
    module.manual_backward = lambda loss: loss.backward()  # no trainer here
    return module


def synthetic_rollout(policy: Policy):
    """Four rows of different response lengths, old log-probs off the current ones (ratios != 1, some clipped),
    random advantages and returns."""
    from lit_rlhf.rollout import Rollout

    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer([*PROMPTS, "Bye"], return_tensors="pt", padding=True)
    g = torch.Generator().manual_seed(1)
    response = torch.randint(3, 200, (4, 6), generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([[6], [1], [4], [3]])).long()
    rows = ResponseBatch(enc.input_ids, enc.attention_mask, response, mask)
    groups = [torch.arange(4)]
    scores = policy.score(rows, groups, values=policy.has_value_head)
    noisy = lambda t: (t + 0.3 * torch.randn(t.shape, generator=g)) * mask  # noqa: E731
    values = scores.values if scores.values is not None else torch.zeros(4, 6)
    rollout = Rollout(rows, torch.zeros(4), noisy(scores.logprobs), noisy(values), noisy(scores.ref_logprobs), groups)
    return rollout, torch.randn(4, 6, generator=g) * mask, torch.randn(4, 6, generator=g) * mask


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "token_sum_norm"])
def test_micro_batches_accumulate_the_mini_batch_gradient(aggregation, estimator):
    results = {}
    for micro in (None, 1, 2):
        module = ppo_module(micro, aggregation, estimator)
        rollout, advantages, returns = synthetic_rollout(module.policy)
        finite, stats = module._accumulate_gradients(rollout, advantages, returns, torch.tensor([2, 0, 3, 1]))
        assert finite
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
        results[micro] = stats, grads
    one_shot_stats, one_shot = results[None]
    assert 0 < float(one_shot_stats["ppo/policy/clipfrac"]) < 1  # the clipped branch takes part
    for micro in (1, 2):
        stats, grads = results[micro]
        for name in one_shot:
            assert_close(grads[name], one_shot[name], atol=1e-6, rtol=1e-5, msg=f"micro {micro}: {name}")
        for name in ("ppo/loss/total", "ppo/loss/policy", "ppo/policy/ratio_mean", "ppo/policy/ratio_max",
                     "ppo/policy/approxkl", "ppo/policy/entropy"):
            assert_close(stats[name].float(), one_shot_stats[name].float().cpu(), atol=1e-6, rtol=1e-5, msg=name)


def test_the_rollout_scores_in_micro_batches(micro: int = 2):
    # micro_batch_size bounds the rollout's scoring pass as it bounds the update: each forward of the policy
    # (and of the reference) takes at most `micro` rows; the first update's forward, in the same grouping, sees
    # the same rows and padding, so its importance ratio is exactly 1
    from types import SimpleNamespace

    from lit_rlhf.modules import PPOModule
    from lit_rlhf.settings import GenerationSettings

    torch.manual_seed(0)
    module = PPOModule(GPT2, lora=SMALL_LORA, rollout_batch_size=4, mini_batch_size=4, micro_batch_size=micro,
                       fast_rollout=False, generation=GenerationSettings(max_new_tokens=(2, 6)), log_samples_every=0)
    module.trainer = SimpleNamespace(world_size=1, global_rank=0)
    module.manual_backward = lambda loss: loss.backward()  # no strategy here
    policy = module.policy
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    prompts = [*PROMPTS, "Bye"]
    enc = policy.tokenizer(prompts, return_tensors="pt", padding=True)
    rows_per_pass: list[int] = []
    hooks = [policy.register_forward_pre_hook(lambda _, args: rows_per_pass.append(len(args[0]))),
             policy.model.register_forward_pre_hook(  # the reference pass: the base with the adapter disabled
                 lambda _, args, kwargs: rows_per_pass.append(len(kwargs.get("input_ids", args[0] if args else None))),
                 with_kwargs=True)]
    rollout = module._rollout({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "query": prompts})
    for hook in hooks:
        hook.remove()
    scoring = [n for n in rows_per_pass if n]
    assert scoring and max(scoring) == micro  # (generate calls the model's generate, not its forward)
    assert rollout is not None and [len(g) for g in rollout.groups] == [4]
    ratio = module._accumulate_gradients(rollout, torch.zeros(4, rollout.logprobs.shape[1]),
                                         torch.zeros(4, rollout.logprobs.shape[1]), rollout.groups[0])[1]
    assert float(ratio["ppo/policy/ratio_max"]) == 1.0


# ---------------------------------------------------------------------------------- weight dtype


def test_auto_dtype_resolves_as_documented(monkeypatch):
    from lit_rlhf.settings import resolve_dtype

    assert resolve_dtype("auto", None)[0] == "float32"
    assert resolve_dtype("auto", torch.device("cpu"))[0] == "float32"
    assert resolve_dtype("bfloat16", "cpu") == ("bfloat16", "model.dtype=bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda", 1))[0] == "bfloat16"
    assert resolve_dtype("auto", "cuda", trains_base=True)[0] == "float32"  # a full fine-tune trains the base
    assert resolve_dtype("float32", "cuda")[0] == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert resolve_dtype("auto", "cuda")[0] == "float32"


def test_module_default_base_is_float32_on_a_cpu_and_the_choice_is_logged(caplog):
    import logging

    from lit_rlhf.modules import PPOModule

    module = PPOModule(GPT2, lora=SMALL_LORA)
    assert module.hparams.dtype == "auto"
    with caplog.at_level(logging.INFO):
        module.configure_model()
    assert module.weight_dtype == "float32"
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    assert "Frozen base weights in float32 (model.dtype=auto: float32 on cpu" in caplog.text


def test_classifier_follows_the_module_dtype_unless_given_its_own(tmp_path):
    from conftest import build_tiny_classifier
    from lit_rlhf.callbacks.evaluators import ClassifierToxicity
    from lit_rlhf.rewards import ClassifierReward

    path = str(build_tiny_classifier(tmp_path / "classifier", ["a tiny vocabulary"]))
    follower, own = ClassifierReward(path), ClassifierReward(path, dtype="float32")
    for reward in (follower, own):
        reward.follow_dtype("bfloat16")
        reward.to("cpu")
    assert follower.model.dtype == torch.bfloat16 and own.model.dtype == torch.float32
    assert follower(["p"], ["a tiny vocabulary"]).dtype == torch.float32  # scores stay float32
    evaluator = ClassifierToxicity(path, label="hate")
    evaluator.follow_dtype("bfloat16")
    assert evaluator.to("cpu").classifier.model.dtype == torch.bfloat16
    assert ClassifierReward(path).to("cpu").model.dtype == torch.float32  # nothing followed: float32
    with pytest.raises(ValueError, match="dtype"):
        ClassifierReward(path, dtype="int8")


# ---------------------------------------------------------------------------------- configure_model


def test_configure_model_builds_the_policy_once(monkeypatch):
    import lit_rlhf.models.policy as policy_lib
    from lit_rlhf.modules import PPOModule

    builds = []

    class CountingPolicy(policy_lib.Policy):
        def __init__(self, *args, **kwargs):
            builds.append(kwargs.get("dtype"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(policy_lib, "Policy", CountingPolicy)
    module = PPOModule(GPT2, lora=SMALL_LORA)
    assert builds == [] and "policy" not in module._modules  # nothing built before the strategy exists
    module.configure_model()
    policy = module.policy
    module.configure_model()  # Lightning calls it again for validate/test/predict
    assert builds == ["float32"] and module.policy is policy


def test_bad_model_name_names_the_flag_before_anything_is_built():
    from lit_rlhf.modules import PPOModule

    with pytest.raises(ValueError, match=r"Could not load model.model_name='/no/such/model'"):
        PPOModule("/no/such/model")


# ---------------------------------------------------------------------------------- FSDP blocks


@pytest.mark.parametrize("kind, blocks, count", [
    (T5, {"T5Block"}, 4), (GPT2, {"GPT2Block"}, 2), ("llama", {"LlamaDecoderLayer"}, 2),
    ("qwen2", {"Qwen2DecoderLayer"}, 2), ("bart", {"BartEncoderLayer", "BartDecoderLayer"}, 4),
])
def test_fsdp_wraps_the_blocks_the_model_declares(kind, blocks, count, tiny_models):
    from lit_rlhf.runtime import DeclaredBlocksWrapPolicy, declared_block_classes

    policy = Policy(tiny_models[kind], lora=SMALL_LORA)  # LoRA-wrapped, with a value head, as PPO holds it
    assert {cls.__name__ for cls in declared_block_classes(policy)} == blocks
    units = DeclaredBlocksWrapPolicy()._run_policy(policy, set(), {"sharding": "kwargs"})
    assert len(units) == count and all(type(m).__name__ in blocks for m in units)
    with pytest.raises(ValueError, match="trainer.strategy.init_args.auto_wrap_policy"):
        declared_block_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))
