"""The rollout's scoring pass in micro-batches (``model.micro_batch_size``): the old log-probs, values and reference
log-probs equal those of the pass over the whole mini-batch. Each micro-batch drops the padding columns all its rows
share (as the update's forward does, so that the first update's ratio is exactly 1): that changes the float results
by rounding only; with the whole batch's padding kept, micro-batches are bit-identical on CPU."""

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.models import Policy, ResponseBatch
from lit_rlhf.settings import GenerationSettings, LoraSettings

from conftest import perturb_lora

T5, GPT2 = "embedded:tiny-t5", "embedded:tiny-gpt2"
PROMPTS = ["#Person1#: Hello there, how are you today? #Person2#: Fine, thanks.", "Hi",
           "#Person2#: I would like a cup of tea, please.", "Bye"]
SMALL_LORA = LoraSettings(r=4, alpha=4)


@pytest.mark.parametrize("name", [GPT2, T5], ids=["gpt2", "t5"])
def test_micro_batched_scores_equal_the_whole_batch(name):
    torch.manual_seed(0)
    policy = Policy(name, lora=SMALL_LORA).eval()
    perturb_lora(policy.model)
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(6)[None] < torch.tensor([[6], [1], [4], [3]])).long()
    rows = ResponseBatch(enc.input_ids, enc.attention_mask, torch.randint(3, 200, (4, 6), generator=g), mask)
    whole = policy.score(rows, [torch.arange(4)])
    micro = policy.score(rows, list(torch.arange(4).split(2)))
    for field in ("logprobs", "values", "ref_logprobs"):
        assert_close(getattr(micro, field), getattr(whole, field), atol=2e-6, rtol=1e-5, msg=field)
    with torch.no_grad():  # the same rows with the whole batch's padding: bit-identical
        one = policy(*rows.tensors())
        parts = [policy(*(t[s] for t in rows.tensors())) for s in (slice(0, 2), slice(2, 4))]
    assert torch.equal(torch.cat([p.logprobs for p in parts]), one.logprobs)
    assert torch.equal(torch.cat([p.values for p in parts]), one.values)


def rollout(micro: int | None):
    from lit_rlhf.modules import PPOModule

    torch.manual_seed(0)
    module = PPOModule(GPT2, lora=SMALL_LORA, rollout_batch_size=4, mini_batch_size=4, micro_batch_size=micro,
                       fast_rollout=False, generation=GenerationSettings(max_new_tokens=(2, 6)), log_samples_every=0)
    module.trainer = SimpleNamespace(world_size=1, global_rank=0)
    perturb_lora(module.policy.model)
    policy = module.policy
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(1)
    return module._rollout({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "query": PROMPTS})


def test_the_rollouts_old_logprobs_and_values_with_micro_batches_equal_those_without():
    whole, micro = rollout(None), rollout(2)
    assert torch.equal(micro.rows.response_ids, whole.rows.response_ids)
    assert whole.values.abs().sum() > 0 and whole.rows.response_mask.sum(1).unique().numel() > 1  # padded rows
    for field in ("logprobs", "values", "ref_logprobs"):
        assert_close(getattr(micro, field), getattr(whole, field), atol=2e-6, rtol=1e-5, msg=field)
