"""Policy: one seq2seq/causal interface whose log-probs, values, masks and generation are exact.

Expectations come from scoring independent of ``Policy``'s code (``policy_checks``), from ``generate``'s own
logits, or are written by hand.
"""

import torch
from torch.testing import assert_close

from lit_rlhf.models import Policy, trim_batch

from conftest import perturb_lora
from policy_checks import (
    GPT2,
    MODELS,
    T5,
    add_to_eos_logit,
    assert_rows_close,
    base_model,
    encode,
    make_policy,
    rows_alone,
    sample,
    score_alone,
)


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


# ---------------------------------------------------------------------------------- 6. prompts cut to the context


def test_the_rollouts_start_cut_names_the_setting_that_avoids_it(caplog):
    # a safety net for prompts encoded without room for the response: it says which data setting leaves that room
    policy = Policy("embedded:tiny-gpt2")
    limit = policy.max_positions()
    ids = torch.arange(limit)[None] % 500 + 10
    with caplog.at_level("WARNING", logger="lit_rlhf"):
        cut, _ = policy.fit_prompts(ids, torch.ones_like(ids), max_new_tokens=10)
    assert torch.equal(cut, ids[:, 10:])
    assert "data.reserve_tokens of at least 10" in caplog.text
