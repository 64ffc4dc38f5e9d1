"""LoRA on an ``lm_head`` that is tied to the input embedding (the embedded summarizer's T5, GPT-2).

The adapter must reach the output layer only, in training and once merged: the policy gives ``lm_head`` its own
copy of the weight before peft wraps it, and :func:`merge_adapter` does the same before a merge. Expectations
come from the base model loaded as saved (tied), scored row by row without padding (``score_alone``).
"""

import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lit_rlhf.models import Policy, load_causal_or_seq2seq, merge_adapter

from lit_rlhf.settings import LoraSettings
from lit_rlhf.models import resolve_model_path

from conftest import perturb_lora
from policy_checks import assert_rows_close, encode, sample, score_alone

SUMMARIZER, GPT2 = "embedded:summarizer", "embedded:tiny-gpt2"
HEAD_TARGETS = {SUMMARIZER: ["q", "v", "lm_head"], GPT2: ["c_attn", "lm_head"]}  # the shipped configs' targets
TIED = pytest.mark.parametrize("name", [SUMMARIZER, GPT2], ids=["t5-summarizer", "gpt2"])


def tied_base(name: str):
    model = load_causal_or_seq2seq(resolve_model_path(name)).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied as saved
    return model


def head_policy(name: str, **kwargs) -> Policy:
    return Policy(name, lora=LoraSettings(r=4, alpha=4, target_modules=HEAD_TARGETS[name]), **kwargs).eval()


def peft_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)
            or "fan_in_fan_out" in str(w.message) or "save_embedding_layers" in str(w.message)]


@TIED
def test_merged_export_reproduces_the_trained_policy(name, tmp_path):
    policy = head_policy(name)
    perturb_lora(policy.model, scale=0.05)
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm, max_new_tokens=(4, 6, 3))
    logprobs = policy(q, qm, r, rm).logprobs
    directory = policy.export(tmp_path / "adapter")

    base = tied_base(name)
    embedding = base.get_input_embeddings().weight.detach().clone()
    merged = merge_adapter(base, str(directory)).eval()
    expected, _ = score_alone(merged, policy.is_seq2seq, q, qm, r, rm)
    assert_rows_close(logprobs, expected, rm, atol=1e-4, rtol=1e-4)
    assert torch.equal(merged.get_input_embeddings().weight, embedding)  # the adapter stayed in lm_head
    # deployed: saved and loaded back with transformers alone, it is still the trained policy
    merged.save_pretrained(tmp_path / "merged")
    reloaded, _ = score_alone(load_causal_or_seq2seq(str(tmp_path / "merged")).eval(), policy.is_seq2seq,
                              q, qm, r, rm)
    assert_rows_close(logprobs, reloaded, rm, atol=1e-4, rtol=1e-4)
    # the adapter applied by plain peft (no merge) is the policy as well
    applied, _ = score_alone(PeftModel.from_pretrained(tied_base(name), directory).eval(), policy.is_seq2seq,
                             q, qm, r, rm)
    assert_rows_close(logprobs, applied, rm, atol=1e-5, rtol=1e-5)


@TIED
def test_init_adapter_on_a_tied_lm_head_is_merged_into_lm_head_only(name, tmp_path):
    sft = head_policy(name)
    perturb_lora(sft.model, seed=3, scale=0.05)
    directory = sft.save_adapter(tmp_path / "sft")
    q, qm = encode(sft)
    r, rm = sample(sft, q, qm, max_new_tokens=(4, 6, 3))

    policy = head_policy(name, init_adapter=str(directory))
    ref = policy.reference_forward(q, qm, r, rm).logprobs
    fine_tuned, _ = score_alone(PeftModel.from_pretrained(tied_base(name), directory).eval(), policy.is_seq2seq,
                                q, qm, r, rm)
    assert_rows_close(ref, fine_tuned, rm, atol=1e-4, rtol=1e-4)
    embeddings = policy.model.get_input_embeddings().weight
    assert torch.equal(embeddings, tied_base(name).get_input_embeddings().weight)


@TIED
def test_untying_keeps_the_models_function_and_peft_has_nothing_to_warn(name, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = head_policy(name)
        q, qm = encode(policy)
        r, rm = sample(policy, q, qm)
        directory = policy.save_adapter(tmp_path / "adapter")
    assert peft_warnings(caught) == []
    model = policy.model.get_base_model()
    assert model.get_output_embeddings().base_layer.weight is not model.get_input_embeddings().weight
    # the copy holds the same values: policy, reference and the tied base model score alike
    logprobs = policy(q, qm, r, rm).logprobs
    assert torch.equal(logprobs, policy.reference_forward(q, qm, r, rm).logprobs)
    assert_rows_close(logprobs, score_alone(tied_base(name), policy.is_seq2seq, q, qm, r, rm)[0], rm,
                      atol=1e-5, rtol=1e-5)
    # the export holds the adapter only: lm_head's base weight is the base model's own
    assert all("lora_" in key for key in load_file(directory / "adapter_model.safetensors"))
