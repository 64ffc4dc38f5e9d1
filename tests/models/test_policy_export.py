"""Policy exports: a saved adapter loads with plain peft and scores as the policy did; as ``init_adapter`` it
becomes the reference of a new policy."""

import json

import torch
from peft import PeftModel
from torch.testing import assert_close

from lit_rlhf.models import ValueHead

from conftest import perturb_lora
from policy_checks import MODELS, SMALL_LORA, assert_rows_close, base_model, encode, make_policy, sample, score_alone


# ---------------------------------------------------------------------------------- 6. save_adapter


@MODELS
def test_saved_adapter_loads_with_plain_peft(name, tmp_path):
    policy = make_policy(name)
    perturb_lora(policy.model)
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm, max_new_tokens=(4, 6, 3))
    logprobs = policy(q, qm, r, rm).logprobs

    directory = policy.save_adapter(tmp_path / "adapter")
    for file in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "value_head.pt"):
        assert (directory / file).is_file(), file
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == SMALL_LORA.r

    loaded = PeftModel.from_pretrained(base_model(name), directory).eval()
    expected, _ = score_alone(loaded, policy.is_seq2seq, q, qm, r, rm)
    assert_rows_close(logprobs, expected, rm, atol=1e-5, rtol=1e-5)
    # the perturbed adapter really is in the file: the base model alone scores differently
    base_rows, _ = score_alone(base_model(name), policy.is_seq2seq, q, qm, r, rm)
    assert not torch.allclose(torch.cat(base_rows), torch.cat(expected), atol=1e-3)

    head = ValueHead(policy.model.config.hidden_size)
    head.load_state_dict(torch.load(directory / "value_head.pt"))
    assert_close(head.summary.weight, policy.value_head.summary.weight)
    assert_close(head.summary.bias, policy.value_head.summary.bias)


# ---------------------------------------------------------------------------------- 7. init_adapter


@MODELS
def test_init_adapter_becomes_the_reference(name, tmp_path):
    sft = make_policy(name)
    perturb_lora(sft.model, seed=3)
    directory = sft.save_adapter(tmp_path / "sft")
    q, qm = encode(sft)
    r, rm = sample(sft, q, qm, max_new_tokens=(4, 6, 3))

    policy = make_policy(name, init_adapter=str(directory))
    ref = policy.reference_forward(q, qm, r, rm).logprobs
    fine_tuned, _ = score_alone(PeftModel.from_pretrained(base_model(name), directory).eval(),
                                policy.is_seq2seq, q, qm, r, rm)
    raw_base, _ = score_alone(base_model(name), policy.is_seq2seq, q, qm, r, rm)
    assert_rows_close(ref, fine_tuned, rm, atol=1e-5, rtol=1e-5)  # merged adapter == adapter on top
    assert not torch.allclose(torch.cat(raw_base), torch.cat(fine_tuned), atol=1e-3)
    # the new adapter starts at zero on top of the fine-tuned weights
    assert torch.equal(policy(q, qm, r, rm).logprobs, ref)
