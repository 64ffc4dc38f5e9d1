"""The architectures users bring, as tiny random models built from configs (``tiny_architectures``): in both
rollout modes the rollout's log-probs equal teacher forcing, KL is 0 at the first step, two PPO updates move
the policy, and the export loads with plain peft and reproduces the policy's log-probs. LoRA target modules are
checked name by name; a model the cached loop cannot serve falls back to exact mode with one notice."""

import logging

import pytest
import torch
from peft import PeftModel
from tiny_architectures import CONFIGS, build_tiny, build_tiny_mamba
from torch.testing import assert_close

from lit_rlhf import objectives
from lit_rlhf import rollout as ro
from lit_rlhf.models import logprobs_from_logits
from lit_rlhf.models import Policy, load_causal_or_seq2seq
from lit_rlhf.settings import GenerationSettings
from lit_rlhf.settings import LoraSettings
from lit_rlhf.models import resolve_model_path

ARCHITECTURES = [*CONFIGS, "t5", "gpt2"]
EMBEDDED = {"t5": "embedded:tiny-t5", "gpt2": "embedded:tiny-gpt2"}
NO_PEFT_DEFAULT = {"phi3", "pegasus", "mbart"}  # peft has no default LoRA targets for these model types
PROMPTS = ["#Person1#: Hello there, how are you?\n#Person2#: Fine, thanks. And you?", "#Person1#: hi",
           "#Person1#: What time is the meeting tomorrow?\n#Person2#: At noon."]
# responses of up to 8 tokens after prompts of 5-20: past Mistral's and Gemma-2's 8-token sliding window
SETTINGS = GenerationSettings(min_new_tokens=2, max_new_tokens=(3, 9))
LIMITS = torch.tensor([8, 3, 6])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The folder of each architecture's tiny model, built once per module on first use."""
    paths = {}

    def path(arch: str) -> str:
        if arch not in paths:
            paths[arch] = (resolve_model_path(EMBEDDED[arch]) if arch in EMBEDDED
                           else build_tiny(arch, tmp_path_factory.mktemp(arch)))
        return paths[arch]
    return path


def make_policy(path: str, arch: str) -> Policy:
    target = "all-linear" if arch in NO_PEFT_DEFAULT else None
    torch.manual_seed(0)
    return Policy(path, lora=LoraSettings(r=4, alpha=4, target_modules=target))


def prompt_batch(policy: Policy) -> dict:
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "query": PROMPTS}


def fit_two_steps(policy: Policy, rows: ro.ResponseBatch, old_logprobs: torch.Tensor, old_values: torch.Tensor) -> None:
    """Two PPO updates on one rollout, as the module makes them (clipped policy and value losses, GAE over
    a shortness score), without Lightning."""
    mask = rows.response_mask
    scores = -mask.sum(1).float() / 4
    rewards, _ = objectives.compute_rewards(scores, torch.zeros_like(old_logprobs), mask, 0.0)
    advantages, returns = objectives.compute_gae(rewards, old_values, mask, 1.0, 0.95)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    everything = torch.arange(len(mask))
    for _ in range(2):
        out, _, _ = policy.forward_rows(rows, everything)
        loss = (objectives.policy_loss(out.logprobs, old_logprobs, advantages, mask, 0.2)
                + 0.1 * objectives.value_loss(out.values, old_values, returns, mask, 0.2))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generate"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rollout_scores_fits_and_exports(arch, fast, model_path, tmp_path):
    path = model_path(arch)
    policy = make_policy(path, arch)
    torch.manual_seed(1)
    generated = ro.generate_responses(policy, prompt_batch(policy), SETTINGS, LIMITS, fast=fast)
    rows = generated.rows
    m = rows.response_mask.bool()
    assert (rows.response_mask.sum(1) <= LIMITS).all() and m[:, 0].all()
    scores = policy.score(rows, [torch.arange(len(m))])
    # 1) the rollout's log-probs and values are the teacher-forced ones (the cached loop's, in fast mode)
    old_logprobs, old_values = (generated.sampled.logprobs, generated.sampled.values) if fast else \
        (scores.logprobs, scores.values)
    assert_close(old_logprobs[m], scores.logprobs[m], atol=1e-5, rtol=1e-5)
    assert_close(old_values[m], scores.values[m], atol=1e-5, rtol=1e-5)
    # 2) KL at step 1: the adapter starts at zero, the policy is its reference
    assert (old_logprobs - scores.ref_logprobs)[m].abs().max() < 1e-5
    if not fast:  # the update and the export do not depend on the rollout mode: once per architecture
        return
    # 3) two PPO updates move the policy
    fit_two_steps(policy, rows, old_logprobs, old_values)
    policy.eval()
    trained = policy(*rows.tensors()).logprobs
    assert (trained - old_logprobs)[m].abs().max() > 1e-4
    # 4) the export loads with plain peft on a fresh base and gives the trained policy's log-probs
    folder = policy.export(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_causal_or_seq2seq(path), folder).eval()
    logits, _ = policy.lm.teacher_forced(loaded, *rows.tensors())
    assert_close(logprobs_from_logits(logits, rows.response_ids)[m], trained[m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, listed, missing, choice", [
    ("qwen2", ["c_attn", "lm_head"], "['c_attn']", "q_proj"),  # configs/embedded_gpt2.yaml's list on Qwen2
    ("bart", ["q", "v", "lm_head"], "['q', 'v']", "q_proj"),  # configs/embedded_t5.yaml's list on BART
])
def test_every_listed_target_module_must_match(arch, listed, missing, choice, model_path):
    # peft alone refuses a list only when none of it matches: it would adapt lm_head and nothing else
    with pytest.raises(ValueError, match="model.lora.target_modules") as err:
        Policy(model_path(arch), lora=LoraSettings(r=4, target_modules=listed))
    assert missing in str(err.value) and choice in str(err.value) and "all-linear" in str(err.value)


@pytest.mark.parametrize("arch, choice", [("phi3", "qkv_proj"), ("pegasus", "q_proj")])
def test_without_a_peft_default_the_error_names_the_choices(arch, choice, model_path):
    with pytest.raises(ValueError, match=f"no default LoRA target modules for model type '{arch}'") as err:
        Policy(model_path(arch), lora=LoraSettings(r=4))
    assert choice in str(err.value) and "all-linear" in str(err.value)


def test_target_modules_takes_a_list_all_linear_or_nothing():
    assert LoraSettings(target_modules="all-linear").errors() == []
    assert LoraSettings(target_modules=["q_proj"]).errors() == []
    assert any("model.lora.target_modules" in e for e in LoraSettings(target_modules="q_proj").errors())


def test_a_model_the_cached_loop_cannot_serve_falls_back_to_exact_mode(tmp_path, caplog):
    # Mamba's layers are state-space layers, not attention: no KV cache of the loop's can hold their state
    policy = Policy(build_tiny_mamba(tmp_path), lora=LoraSettings(r=4, alpha=4, target_modules=["in_proj", "x_proj"]))
    batch = prompt_batch(policy)
    with caplog.at_level(logging.WARNING, logger="lit_rlhf"):
        for seed in (1, 2):
            torch.manual_seed(seed)
            generated = ro.generate_responses(policy, batch, SETTINGS, LIMITS, fast=True)
    notices = [r.getMessage() for r in caplog.records if "exact mode" in r.getMessage()]
    assert len(notices) == 1 and "MambaForCausalLM" in notices[0]
    rows, sampled = generated.rows, generated.sampled
    m = rows.response_mask.bool()
    scores = policy.score(rows, [torch.arange(len(m))])
    assert_close(sampled.logprobs[m], scores.logprobs[m], atol=1e-5, rtol=1e-5)
    assert_close(sampled.values[m], scores.values[m], atol=1e-5, rtol=1e-5)
    assert (sampled.logprobs[~m] == 0).all()
