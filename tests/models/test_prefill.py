"""What the KV-cached rollout's forwards keep: at most the last layer's hidden states (of the positions the value
head reads), none without a value head; and numbers bit-identical to the forward that returns every layer's states
(``output_hidden_states=True``, as the loop called the model before)."""

import pytest
import torch

from lit_rlhf.models import Policy, ResponseBatch, sample_with_cache
from lit_rlhf.models import lm as lm_module
from lit_rlhf.settings import GenerationSettings, LoraSettings
from tiny_architectures import build_tiny

T5, GPT2 = "embedded:tiny-t5", "embedded:tiny-gpt2"
PROMPTS = ["#Person1#: Hello there, how are you?\n#Person2#: Fine.", "#Person1#: hi",
           "#Person1#: What time is the meeting tomorrow?\n#Person2#: At noon."]
SETTINGS = GenerationSettings(min_new_tokens=1, max_new_tokens=(2, 7))
LIMITS = torch.tensor([7, 3, 6, 5, 2, 7])  # 3 prompts x 2 samples


@pytest.fixture(scope="module", params=[T5, GPT2, "llama"])
def policy(request, tmp_path_factory):
    name = build_tiny("llama", tmp_path_factory.mktemp("llama")) if request.param == "llama" else request.param
    torch.manual_seed(0)
    policy = Policy(name, lora=LoraSettings(r=4, alpha=4)).eval()
    for n, p in policy.named_parameters():  # a non-zero adapter and value head: the loop must go through them
        if "lora_B" in n or "value_head" in n:
            torch.nn.init.normal_(p, std=0.3)
    return policy


def every_layer(model, positions, with_hidden, **inputs):
    """The forward as the loop called it before: every layer's states returned, the last one read."""
    out = model(**inputs, output_hidden_states=True)
    states = out.decoder_hidden_states if getattr(out, "decoder_hidden_states", None) else out.hidden_states
    return out, states[-1][:, positions]


def rollout(policy, value_head=True):
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(7)
    out = sample_with_cache(policy.model, policy.lm, policy.value_head if value_head else None, enc.input_ids,
                            enc.attention_mask, LIMITS, SETTINGS, policy.special_tokens, repeats=2)
    return enc, out


def test_the_rollout_and_scoring_equal_the_every_layer_forward_bit_for_bit(policy, monkeypatch):
    enc, now = rollout(policy)
    rows = ResponseBatch(enc.input_ids.repeat_interleave(2, 0), enc.attention_mask.repeat_interleave(2, 0),
                         now.response_ids, now.response_mask)
    scores = policy.score(rows, [torch.arange(6)])
    with monkeypatch.context() as patch:
        patch.setattr(lm_module, "forward_with_last_hidden", every_layer)
        _, before = rollout(policy)
        scores_before = policy.score(rows, [torch.arange(6)])
    for field in ("response_ids", "response_mask", "logprobs", "values"):
        assert torch.equal(getattr(now, field), getattr(before, field)), field
    assert now.values.abs().sum() > 0
    for field in ("logprobs", "values", "ref_logprobs"):
        assert torch.equal(getattr(scores, field), getattr(scores_before, field)), field


def test_the_prefill_and_decode_steps_keep_at_most_the_last_layers_states(policy):
    outputs, hidden = [], []
    hook = policy.model.register_forward_hook(lambda _, args, out: outputs.append(out))
    step = policy.lm.step

    def recording(*args):
        logits, state = step(*args)
        hidden.append(state)
        return logits, state
    policy.lm.step = recording
    try:
        for value_head in (True, False):
            outputs.clear(), hidden.clear()
            rollout(policy, value_head)
            assert len(outputs) > 1 and len(hidden) == len(outputs)  # the prefill and each decode step
            for out in outputs:  # no forward returned per-layer states
                assert all(getattr(out, name, None) is None for name in ("hidden_states", "decoder_hidden_states"))
            if value_head:  # the newest position's state of the last layer, a [b, H] copy
                assert all(h.dim() == 2 and h.shape[1] == policy.model.config.hidden_size for h in hidden)
                assert all(h.untyped_storage().nbytes() == h.nbytes for h in hidden)
            else:
                assert all(h is None for h in hidden)
    finally:
        hook.remove()
        del policy.lm.step


@pytest.mark.parametrize("name, targets", [(T5, ["q", "v", "lm_head"]), (GPT2, ["c_attn", "lm_head"])])
def test_the_update_forward_has_the_every_layer_forwards_gradients_bit_for_bit(name, targets, monkeypatch):
    """The update's forward backpropagates through the value head and the LM head (here with LoRA) into the same
    hidden states: the gradients are summed in the same order as with ``output_hidden_states=True`` (a slicing
    node on the captured states would change that order, and so the weights after an update)."""
    torch.manual_seed(0)
    policy = Policy(name, lora=LoraSettings(r=4, alpha=4, target_modules=targets)).eval()
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    enc, now = rollout(policy)
    rows = (enc.input_ids.repeat_interleave(2, 0), enc.attention_mask.repeat_interleave(2, 0), now.response_ids,
            now.response_mask)

    def gradients():
        policy.zero_grad()
        out = policy.forward(*rows)
        ((out.logprobs + out.values) * now.response_mask).sum().backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    now_grads = gradients()
    with monkeypatch.context() as patch:
        patch.setattr(lm_module, "forward_with_last_hidden", every_layer)
        before = gradients()
    assert now_grads.keys() == before.keys() and now_grads
    for key, grad in now_grads.items():
        assert torch.equal(grad, before[key]), key
