"""Policy: one seq2seq/causal interface whose log-probs, values, masks and saved adapters are exact.

Expectations are computed independently of ``Policy``'s scoring code: each row is run alone through the
plain Hugging Face model, with no padding at all (so default position ids), and scored with
``log_softmax``; or they come from ``generate``'s own logits; or they are written by hand.
"""

import json
import warnings

import pytest
import torch
from peft import PeftModel
from torch import nn
from torch.testing import assert_close

from lit_rlhf.models import Policy, ValueHead, load_causal_or_seq2seq, trim_batch

from lit_rlhf.settings import GenerationSettings, LoraSettings
from lit_rlhf.models import resolve_model_path

from conftest import perturb_lora

T5, GPT2 = "embedded:tiny-t5", "embedded:tiny-gpt2"
MODELS = pytest.mark.parametrize("name", [T5, GPT2], ids=["t5", "gpt2"])

# Three prompts of clearly different lengths, so that one batch has real padding on the query side.
PROMPTS = [
    "#Person1#: Hello there, how are you today? #Person2#: Fine, thanks. And you?",
    "Hi",
    "#Person2#: I would like a cup of tea, please.",
]
# lora.alpha == lora.r: the LoRA update is scaled by 1, so perturb_lora's scale is the update's scale.
SMALL_LORA = LoraSettings(r=4, alpha=4)


def make_policy(name: str, **kwargs) -> Policy:
    kwargs.setdefault("lora", SMALL_LORA)
    return Policy(name, **kwargs).eval()  # eval: no LoRA / value-head dropout, so comparisons are exact


def encode(policy: Policy, texts=PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = policy.tokenizer
    # the layout each model kind needs: right padding for the T5 encoder, left padding for a causal LM
    tokenizer.padding_side = "right" if policy.is_seq2seq else "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def sample(policy: Policy, query_ids, query_mask, max_new_tokens=(6, 6, 6), seed: int = 0, **settings):
    settings = GenerationSettings(**{"min_new_tokens": 0, **settings})
    torch.manual_seed(seed)
    return policy.generate(query_ids, query_mask, settings, max_new_tokens=torch.tensor(max_new_tokens))


def rows_alone(query_ids, query_mask, response_ids, response_mask):
    """Each row without any padding: (query [1, P_i], response [1, T_i])."""
    for i in range(query_ids.shape[0]):
        n = int(response_mask[i].sum())
        yield query_ids[i][query_mask[i].bool()][None], response_ids[i, :n][None]


@torch.no_grad()
def score_alone(model, is_seq2seq: bool, query_ids, query_mask, response_ids, response_mask):
    """Independent scoring with the plain HF model: per row, unpadded. Returns per-row lists of
    log-probs [T_i] and last hidden states [T_i, H] at the positions that predict each response token."""
    logprobs, hiddens = [], []
    for q, r in rows_alone(query_ids, query_mask, response_ids, response_mask):
        if is_seq2seq:
            start = torch.full_like(r[:, :1], model.config.decoder_start_token_id)
            out = model(input_ids=q, decoder_input_ids=torch.cat([start, r[:, :-1]], 1), output_hidden_states=True)
            logits, hidden = out.logits[0], out.decoder_hidden_states[-1][0]
        else:
            out = model(input_ids=torch.cat([q, r], 1), output_hidden_states=True)
            p = q.shape[1]  # position p - 1 + t predicts response token t
            logits, hidden = out.logits[0, p - 1 : -1], out.hidden_states[-1][0, p - 1 : -1]
        logprobs.append(torch.log_softmax(logits, -1).gather(-1, r[0, :, None])[:, 0])
        hiddens.append(hidden)
    return logprobs, hiddens


def assert_rows_close(batched, rows, response_mask, **tol):
    for i, expected in enumerate(rows):
        n = int(response_mask[i].sum())
        assert n == expected.shape[0]
        assert_close(batched[i, :n], expected, **tol)


def base_model(name: str):
    return load_causal_or_seq2seq(resolve_model_path(name)).eval()


def add_to_eos_logit(policy: Policy, amount: float):
    """Hook on the LM head that makes eos near-certain (amount > 0) or impossible (amount < 0)."""

    def hook(module, args, output):
        output = output.clone()
        output[..., policy.eos_token_id] += amount
        return output

    return policy.model.get_output_embeddings().register_forward_hook(hook)


# ---------------------------------------------------------------------------------- 1. policy == reference


@MODELS
def test_policy_equals_reference_at_construction(name):
    policy = make_policy(name)
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm)
    logprobs = policy(q, qm, r, rm).logprobs
    ref_logprobs = policy.reference_forward(q, qm, r, rm).logprobs
    # LoRA B starts at zero: the adapter adds exactly 0, so KL is exactly 0, not just small.
    assert torch.equal(logprobs, ref_logprobs)
    # ...and it is the base model's function (independent per-row scoring)
    assert_rows_close(logprobs, score_alone(base_model(name), policy.is_seq2seq, q, qm, r, rm)[0], rm,
                      atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- 2. teacher forcing == generation


@MODELS
def test_forward_logprobs_equal_generation_logits(name):
    policy = make_policy(name)
    perturb_lora(policy.model)  # the adapter must take part in both generate and forward
    q, qm = encode(policy)
    assert (qm == 0).any()  # different prompt lengths: padding in one batch (left for GPT-2, right for T5)
    torch.manual_seed(1)
    out = policy.model.generate(
        input_ids=q, attention_mask=qm, do_sample=True, top_k=0, max_new_tokens=7, min_new_tokens=7,
        output_logits=True, return_dict_in_generate=True, pad_token_id=policy.pad_token_id,
        eos_token_id=policy.eos_token_id,
    )
    # seq2seq sequences start with the decoder start token, which is not a response token
    start = 1 if policy.is_seq2seq else q.shape[1]
    response = out.sequences[:, start:]  # [B, 7]
    assert response.shape == (3, 7)
    gen_logprobs = torch.stack(
        [torch.log_softmax(step_logits, -1).gather(-1, response[:, t : t + 1])[:, 0]
         for t, step_logits in enumerate(out.logits)], dim=1,
    )  # [B, 7]; raw logits, before min_new_tokens masking
    mask = torch.ones_like(response)
    logprobs = policy(q, qm, response, mask).logprobs
    # every position, the first response token included (after T5's decoder start / GPT-2's last prompt token)
    assert_close(logprobs, gen_logprobs, atol=1e-5, rtol=1e-5)


@MODELS
def test_forward_equals_independent_scoring_and_is_batch_invariant(name):
    policy = make_policy(name)
    perturb_lora(policy.model)
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm, max_new_tokens=(5, 8, 3))
    out = policy(q, qm, r, rm)
    expected, _ = score_alone(policy.model, policy.is_seq2seq, q, qm, r, rm)
    assert_rows_close(out.logprobs, expected, rm, atol=1e-5, rtol=1e-5)
    # a row scored alone (no padding) through Policy gives the same log-probs and values as in the batch
    for i, (q_i, r_i) in enumerate(rows_alone(q, qm, r, rm)):
        alone = policy(q_i, torch.ones_like(q_i), r_i, torch.ones_like(r_i))
        n = r_i.shape[1]
        assert_close(out.logprobs[i, :n], alone.logprobs[0], atol=1e-5, rtol=1e-5)
        assert_close(out.values[i, :n], alone.values[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- 3. response mask


def test_response_mask_from_first_eos_when_pad_is_eos():
    policy = make_policy(GPT2)
    eos = policy.eos_token_id
    assert policy.pad_token_id == eos  # GPT-2: padding is made of eos tokens
    response = torch.tensor([
        [5, 7, eos, eos, eos],  # eos then padding: mask through the first eos
        [eos, eos, eos, eos, eos],  # eos as the first token: a one-token response
        [5, 6, 7, 8, 9],  # no eos: whole row
        [5, eos, 3, eos, eos],  # tokens after the first eos are not part of the response
    ])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert_close(policy.response_mask(response), expected)
    # per-row limits cut a row without eos (row 2 at 3 tokens) and never extend one
    limits = torch.tensor([5, 5, 3, 1])
    expected_limited = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert_close(policy.response_mask(response, limits), expected_limited)


def test_decode_uses_only_each_rows_response_tokens():
    policy = make_policy(GPT2)
    # token id 0 is a real token in many vocabularies; masked positions must not decode as it
    response = torch.tensor([[5, 6, 0, 0], [7, 0, 8, 9]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = [policy.tokenizer.decode([5, 6], skip_special_tokens=True),
                policy.tokenizer.decode([7, 0, 8, 9], skip_special_tokens=True)]
    assert policy.decode(response, mask) == expected


def test_response_mask_seq2seq_stops_at_eos_not_pad():
    policy = make_policy(T5)
    eos, pad = policy.eos_token_id, policy.pad_token_id  # 1, 0
    # row 1: a non-pad token after eos is still outside the response
    response = torch.tensor([[5, eos, pad, pad], [5, eos, 7, pad], [5, 6, 7, 8], [eos, pad, pad, pad]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert_close(policy.response_mask(response), expected)


@MODELS
def test_generate_honours_per_row_max_new_tokens(name):
    policy = make_policy(name)
    q, qm = encode(policy)
    limits = (2, 5, 3)
    handle = add_to_eos_logit(policy, -1e4)  # no eos: each row must run exactly to its own limit
    try:
        policy.train()
        r, rm = sample(policy, q, qm, max_new_tokens=limits)
    finally:
        handle.remove()
    assert policy.training  # generate samples in eval mode and restores the caller's mode
    policy.eval()
    assert r.shape == (3, max(limits))
    assert rm.sum(1).tolist() == list(limits)
    assert_close(rm, torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    # a row stopped at its limit: the generator filled it with padding afterwards (for GPT-2, pad == eos:
    # only the limit keeps these eos tokens out of the mask)
    for i, limit in enumerate(limits):
        assert (r[i, limit:] == policy.pad_token_id).all()
        assert (r[i, :limit] != policy.eos_token_id).all()


@MODELS
def test_min_new_tokens_blocks_eos(name):
    policy = make_policy(name)
    q, qm = encode(policy)
    handle = add_to_eos_logit(policy, 1e4)  # eos is sampled as soon as it is allowed
    try:
        r0, rm0 = sample(policy, q, qm, max_new_tokens=(6, 6, 6), min_new_tokens=0)
        r3, rm3 = sample(policy, q, qm, max_new_tokens=(6, 6, 6), min_new_tokens=3)
        # a short limit on one row must not lift min_new_tokens for the others
        r_mixed, rm_mixed = sample(policy, q, qm, max_new_tokens=(1, 6, 6), min_new_tokens=3)
    finally:
        handle.remove()
    assert_close(rm0, torch.ones(3, 1, dtype=torch.long))  # eos first: one-token responses
    assert (r0 == policy.eos_token_id).all()
    # eos blocked for 3 tokens, then taken: 3 tokens + eos
    assert r3.shape == (3, 4)
    assert (r3[:, :3] != policy.eos_token_id).all() and (r3[:, 3] == policy.eos_token_id).all()
    assert rm3.sum(1).tolist() == [4, 4, 4]
    # row 0 stops at its limit of 1 (no eos); rows 1, 2 still get 3 tokens + eos
    assert rm_mixed.sum(1).tolist() == [1, 4, 4]
    assert (r_mixed[1:, :3] != policy.eos_token_id).all() and (r_mixed[1:, 3] == policy.eos_token_id).all()


# ---------------------------------------------------------------------------------- 4. trim_batch


def test_trim_batch_removes_only_all_padding_columns():
    ids = torch.arange(1, 13).view(2, 6)
    # left-padded queries: columns 0, 1 are padding in both rows; column 2 is real in row 1 only
    left_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    # right-padded queries: columns 4, 5 are padding in both rows
    right_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    response = torch.arange(20, 30).view(2, 5)
    response_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])  # longest response: 3 tokens

    q, qm, r, rm = trim_batch(ids, left_mask, response, response_mask, left_padded_query=True)
    assert_close(q, ids[:, 2:])
    assert_close(qm, left_mask[:, 2:])
    assert_close(r, response[:, :3])
    assert_close(rm, response_mask[:, :3])

    q, qm, r, rm = trim_batch(ids, right_mask, response, response_mask, left_padded_query=False)
    assert_close(q, ids[:, :4])
    assert_close(qm, right_mask[:, :4])
    assert_close(r, response[:, :3])

    # nothing to trim: everything stays
    full = torch.ones_like(ids)
    q, qm, r, rm = trim_batch(ids, full, response, torch.ones_like(response), left_padded_query=True)
    assert q.shape == ids.shape and r.shape == response.shape


@MODELS
def test_trimmed_batch_scores_like_untrimmed(name):
    policy = make_policy(name)
    perturb_lora(policy.model)
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm, max_new_tokens=(2, 5, 3))
    left = not policy.is_seq2seq
    # add 3 extra all-padding columns on the query's padding side and 4 after the responses
    pad_q = torch.full((3, 3), policy.pad_token_id)
    q_pad = torch.cat([pad_q, q], 1) if left else torch.cat([q, pad_q], 1)
    qm_pad = torch.cat([torch.zeros_like(pad_q), qm], 1) if left else torch.cat([qm, torch.zeros_like(pad_q)], 1)
    r_pad = torch.cat([r, torch.full((3, 4), policy.pad_token_id)], 1)
    rm_pad = torch.cat([rm, torch.zeros(3, 4, dtype=rm.dtype)], 1)

    q_t, qm_t, r_t, rm_t = trim_batch(q_pad, qm_pad, r_pad, rm_pad, left_padded_query=left)
    # exactly the tokenizer's (minimal) padding and the generated length come back
    assert_close(q_t, q)
    assert_close(qm_t, qm)
    assert_close(r_t, r)
    assert_close(rm_t, rm)

    full = policy(q_pad, qm_pad, r_pad, rm_pad)
    trimmed = policy(q_t, qm_t, r_t, rm_t)
    t = r_t.shape[1]
    real = rm_t.bool()
    assert_close(trimmed.logprobs[real], full.logprobs[:, :t][real], atol=1e-5, rtol=1e-5)
    assert_close(trimmed.values[real], full.values[:, :t][real], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- 5. value head


@MODELS
def test_values_are_the_value_head_of_the_hidden_states(name):
    policy = make_policy(name)
    perturb_lora(policy.model)
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm, max_new_tokens=(4, 6, 2))
    _, hiddens = score_alone(policy.model, policy.is_seq2seq, q, qm, r, rm)

    def expected_values(head):
        w, b = head.summary.weight[0], head.summary.bias[0]  # [H], scalar
        return [h @ w + b for h in hiddens]

    values = policy(q, qm, r, rm).values
    assert values.shape == r.shape  # [B, T]
    assert_rows_close(values, expected_values(policy.value_head), rm, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        policy.value_head.summary.weight.copy_(torch.randn(policy.value_head.summary.weight.shape))
    new_values = policy(q, qm, r, rm).values
    assert not torch.allclose(new_values, values)
    assert_rows_close(new_values, expected_values(policy.value_head), rm, atol=1e-5, rtol=1e-5)


@MODELS
def test_gradients_reach_only_lora_and_value_head(name):
    policy = make_policy(name)
    perturb_lora(policy.model)  # with lora_B == 0, lora_A's gradient would be exactly zero
    q, qm = encode(policy)
    r, rm = sample(policy, q, qm)
    out = policy(q, qm, r, rm)
    ((out.logprobs * rm).sum() + (out.values * rm).sum()).backward()

    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert {"value_head.summary.weight", "value_head.summary.bias"} <= trainable
    assert all("lora_" in n or n.startswith("value_head.") for n in trainable)
    for n, p in policy.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert len(policy.trainable_parameters()) == len(trainable)


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



def test_the_rollouts_start_cut_names_the_setting_that_avoids_it(caplog):
    # a safety net for prompts encoded without room for the response: it says which data setting leaves that room
    policy = Policy("embedded:tiny-gpt2")
    limit = policy.max_positions()
    ids = torch.arange(limit)[None] % 500 + 10
    with caplog.at_level("WARNING", logger="lit_rlhf"):
        cut, _ = policy.fit_prompts(ids, torch.ones_like(ids), max_new_tokens=10)
    assert torch.equal(cut, ids[:, 10:])
    assert "data.reserve_tokens of at least 10" in caplog.text
