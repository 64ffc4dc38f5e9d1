"""``model.ppo.logprobs_at_temperature``: PPO's log-probs are those of softmax(logits / T), the distribution the
rollout samples from, in every path that makes them (the plain and the chunked teacher-forced forward, the
reference, the cached decode loop), checked against a log-softmax of the model's own logits."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.models import Policy, ResponseBatch
from lit_rlhf.modules import PPOModule
from lit_rlhf.settings import GenerationSettings, LoraSettings

from conftest import perturb_lora

T5, GPT2 = "embedded:tiny-t5", "embedded:tiny-gpt2"
TARGETS = {T5: ["q", "v", "lm_head"], GPT2: ["c_attn", "lm_head"]}
PROMPTS = ["#Person1#: Hello there, how are you today?", "Hi", "#Person2#: I would like a cup of tea, please."]
TEMPERATURE = 0.5


def make_policy(name: str, chunk: int = 0) -> Policy:
    torch.manual_seed(0)
    policy = Policy(name, lora=LoraSettings(r=4, alpha=4, target_modules=TARGETS[name]), logprob_chunk_size=chunk)
    perturb_lora(policy.model)  # a non-zero adapter: the reference (adapter disabled) differs from the policy
    return policy.eval()


def sampled(policy: Policy, limits: list[int]) -> tuple[ResponseBatch, torch.Tensor]:
    """Responses of the cached loop at TEMPERATURE, with the log-probs it kept while sampling."""
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(3)
    out = policy.sample(enc.input_ids, enc.attention_mask, GenerationSettings(temperature=TEMPERATURE),
                        torch.tensor(limits))
    return ResponseBatch(enc.input_ids, enc.attention_mask, out.response_ids, out.response_mask), out.logprobs


def tempered_logprobs(policy: Policy, batch: ResponseBatch, temperature: float, reference: bool = False):
    """log softmax(logits / temperature)[token] from the model's own logits (``return_logits`` at temperature 1)."""
    policy.logprob_temperature = 1.0
    forward = policy.reference_forward if reference else policy
    logits = forward(*batch.tensors(), return_logits=True).logits
    chosen = torch.log_softmax(logits.float() / temperature, -1).gather(-1, batch.response_ids[..., None])
    return chosen.squeeze(-1) * batch.response_mask


@pytest.mark.parametrize("name", [T5, GPT2])
def test_every_log_prob_path_is_the_tempered_policys(name):
    policy = make_policy(name)
    policy.logprob_temperature = TEMPERATURE
    batch, kept = sampled(policy, [6, 3, 5])
    mask = batch.response_mask
    with torch.no_grad():
        want = tempered_logprobs(policy, batch, TEMPERATURE)
        want_ref = tempered_logprobs(policy, batch, TEMPERATURE, reference=True)
        untempered = tempered_logprobs(policy, batch, 1.0)
        policy.logprob_temperature = TEMPERATURE
        plain = policy(*batch.tensors(), with_values=False).logprobs * mask
        ref = policy.reference_forward(*batch.tensors()).logprobs * mask
        policy.logprob_chunk_size = 2
        chunked = policy(*batch.tensors(), with_values=False).logprobs * mask
        chunked_ref = policy.reference_forward(*batch.tensors()).logprobs * mask
    assert not torch.allclose(want, untempered, atol=1e-3)  # the temperature changes the numbers compared
    for got in (plain, chunked, kept * mask):
        assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got in (ref, chunked_ref):
        assert_close(got, want_ref, atol=1e-5, rtol=1e-5)


def test_the_module_sets_the_sampling_temperature_unless_told_not_to():
    def temperature(**settings) -> float:
        ppo = settings.pop("ppo", {})
        module = PPOModule(GPT2, generation=GenerationSettings(**settings), ppo={"logprobs_at_temperature": True, **ppo})
        module.configure_model()
        return module.policy.logprob_temperature

    assert temperature(temperature=0.7) == 0.7
    assert temperature(temperature=0.7, ppo={"logprobs_at_temperature": False}) == 1.0
    assert temperature(temperature=0.7, do_sample=False) == 1.0  # greedy rollouts: no distribution to temper
