"""Policy construction: a separate reference model, parameter counts, LoRA targets, the fused tanh GELU, base biases
that ``lora.bias`` trains, and the errors and notices of loading."""

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lit_rlhf.models import Policy, resolve_model_path
from lit_rlhf.settings import LoraSettings

from conftest import perturb_lora
from policy_checks import GPT2, MODELS, T5, assert_rows_close, base_model, encode, make_policy, sample, score_alone


# ---------------------------------------------------------------------------------- 8. reference_model


@MODELS
def test_separate_reference_model(name):
    policy = make_policy(name, reference_model=resolve_model_path(name))
    assert policy.reference is not None
    assert not any(p.requires_grad for p in policy.reference.parameters())
    perturb_lora(policy.model)
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm, max_new_tokens=(4, 6, 3))

    ref = policy.reference_forward(q, qm, r, rm).logprobs
    raw_base, _ = score_alone(base_model(name), policy.is_seq2seq, q, qm, r, rm)
    assert_rows_close(ref, raw_base, rm, atol=1e-5, rtol=1e-5)  # the LoRA perturbation does not reach it
    assert not torch.allclose(policy(q, qm, r, rm).logprobs[rm.bool()], ref[rm.bool()], atol=1e-3)

    # it is the separate model that is used: changing it changes the reference, the policy stays
    with torch.no_grad():
        policy.reference.get_output_embeddings().weight.mul_(2.0)
    assert not torch.allclose(policy.reference_forward(q, qm, r, rm).logprobs[rm.bool()], ref[rm.bool()], atol=1e-3)


# ---------------------------------------------------------------------------------- 9. parameter counts


# LoRA parameters by hand, r = 4 (each adapted Linear in -> out gets A [r, in] and B [out, r]: r·(in + out)):
#   T5 (d_model 64, 4 heads × d_kv 16 = 64): q and v in 2 encoder self-, 2 decoder self- and 2 decoder
#     cross-attention layers = 12 linears 64 -> 64, each 4·(64 + 64) = 512  -> 6144
#   GPT-2 (n_embd 64): c_attn 64 -> 192 in 2 layers, each 4·(64 + 192) = 1024 -> 2048
# Value head: Linear(64, 1) = 64 + 1 = 65.
@pytest.mark.parametrize("name, lora_params", [(T5, 6144), (GPT2, 2048)], ids=["t5", "gpt2"])
def test_parameter_counts(name, lora_params):
    policy = make_policy(name)
    config = policy.model.config
    assert config.vocab_size == 2000 and getattr(config, "d_model", getattr(config, "n_embd", None)) == 64
    base_params = sum(p.numel() for p in base_model(name).parameters())
    counts = policy.parameter_counts()
    assert counts["trainable model parameters"] == lora_params
    assert counts["all model parameters"] == base_params + lora_params
    assert counts["trainable parameters with value head"] == lora_params + 65
    assert counts["all parameters with value head"] == base_params + lora_params + 65
    assert counts["percentage of trainable model parameters"] == pytest.approx(100 * lora_params / (base_params + lora_params))
    assert counts["percentage with value head"] == pytest.approx(
        100 * (lora_params + 65) / (base_params + lora_params + 65)
    )


# ---------------------------------------------------------------------------------- 10. bad target modules


@MODELS
def test_bad_target_modules_raise_a_clear_error(name):
    with pytest.raises(ValueError, match="lora.target_modules"):
        Policy(name, lora=LoraSettings(r=4, target_modules=["nonexistent"]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_lm_head_multiplies_contiguous_hidden_states_with_the_same_log_probs(dtype):
    # a causal LM hands its head a strided slice (logits_to_keep); the head must see it contiguous (a 2-D matmul
    # instead of a batched one that copies the weight per row in bfloat16), with the same log-probs
    policy = make_policy(GPT2, dtype=dtype)
    query_ids, query_mask = encode(policy)
    response_ids, response_mask = sample(policy, query_ids, query_mask)
    tensors = (query_ids, query_mask, response_ids, response_mask)
    head = policy.model.get_base_model().get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))  # runs after lit_rlhf's
    with torch.no_grad():
        ours = policy(*tensors, with_values=False).logprobs
        assert seen and all(seen)
        for key in list(head._forward_pre_hooks)[:-1]:  # without lit_rlhf's hook: the strided slice
            del head._forward_pre_hooks[key]
        seen.clear()
        plain = policy(*tensors, with_values=False).logprobs
    assert seen and not all(seen)
    assert_close(ours, plain, **({} if dtype == "float32" else {"atol": 2e-2, "rtol": 2e-2}))


@MODELS
def test_tanh_gelu_is_fused_and_computes_the_same(name):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.activations import NewGELUActivation

    policy = Policy(name).eval()
    assert not any(isinstance(m, NewGELUActivation) for m in policy.modules())
    assert any(isinstance(m, nn.GELU) and m.approximate == "tanh" for m in policy.modules())
    # the model as transformers builds it, with the original activation
    path = resolve_model_path(name)
    original = (AutoModelForSeq2SeqLM if policy.is_seq2seq else AutoModelForCausalLM).from_pretrained(path).eval()
    assert any(isinstance(m, NewGELUActivation) for m in original.modules())
    torch.manual_seed(0)
    x = torch.randn(4, 7, 5) * 3
    assert_close(nn.GELU(approximate="tanh")(x), NewGELUActivation()(x), atol=1e-6, rtol=1e-6)
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad(), policy.model.disable_adapter():
        ours = policy.model(input_ids=ids, labels=ids).logits
    theirs = original(input_ids=ids, labels=ids).logits
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- 11. trained base biases


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_reference_stays_the_initial_model_when_lora_trains_biases(bias):
    policy = make_policy(GPT2, lora=LoraSettings(r=4, alpha=4, bias=bias))
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm, max_new_tokens=(4, 6, 3))
    biases = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert biases  # peft trains base biases with this setting
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    for _ in range(3):  # a few updates that raise the sampled responses' likelihood
        loss = -(policy(q, qm, r, rm, with_values=False).logprobs * rm).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = dict(policy.model.named_parameters())
    assert all(not torch.equal(params[n], b) for n, b in biases.items())  # the biases were trained

    ref = policy.reference_forward(q, qm, r, rm).logprobs
    initial, _ = score_alone(base_model(GPT2), False, q, qm, r, rm)
    assert_rows_close(ref, initial, rm, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(policy(q, qm, r, rm).logprobs[rm.bool()], ref[rm.bool()], atol=1e-3)
    # the trained biases are back after the reference pass; the frozen copies are not saved in checkpoints
    assert all(torch.equal(params[n], p) for n, p in policy.model.named_parameters() if n in biases)
    assert not any("initial" in key for key in policy.state_dict())


# ---------------------------------------------------------------------------------- 12. loading and output noise


@MODELS
def test_a_model_folder_without_a_tokenizer_is_one_clear_error(name, tmp_path):
    base_model(name).save_pretrained(tmp_path / "weights_only")
    with pytest.raises(ValueError) as err:
        Policy(str(tmp_path / "weights_only"))
    message = str(err.value)
    assert "model.model_name" in message and str(tmp_path / "weights_only") in message and "tokenizer" in message
    assert "\n" not in message


@pytest.mark.parametrize("targets", [None, ["c_attn"], ["c_attn", "lm_head"]],
                         ids=["default", "c_attn", "c_attn+lm_head"])
def test_gpt2_conv1d_targets_build_without_peft_notices(targets):
    lora = LoraSettings(r=4, alpha=4, target_modules=targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a fresh run, then the same policy built again (a resume)
            policy = make_policy(GPT2, lora=lora)
    assert [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)] == []
    c_attn = policy.model.get_base_model().transformer.h[0].attn.c_attn
    assert c_attn.fan_in_fan_out  # Conv1D stores its weight in x out
    if targets and "lm_head" in targets:
        assert not policy.model.get_base_model().lm_head.fan_in_fan_out  # a Linear: out x in
