"""Token ops and the seq2seq/causal adapter (lit_rlhf/lm.py), and the policy's exact KL."""

import math

import torch
from torch.testing import assert_close

from lit_rlhf import lm
from lit_rlhf.policy import full_kl_per_token


# ------------------------------------------------------------------ log-probs and entropy


def test_logprobs_match_log_softmax_and_chunking_is_exact():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    labels = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert_close(lm.logprobs_from_logits(logits, labels), expected)
    # 11 logits per row, 13 elements per chunk -> one row per chunk: same numbers
    assert_close(lm.logprobs_from_logits(logits, labels, chunk_elements=13), expected)


def test_logprobs_hand_computed():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; log-probs of labels 1 then 0
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    out = lm.logprobs_from_logits(logits, torch.tensor([[1, 0]]))
    assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))


def test_logprobs_gradient_matches_log_softmax():
    torch.manual_seed(1)
    a = torch.randn(2, 3, 7, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    labels = torch.randint(0, 7, (2, 3))
    lm.logprobs_from_logits(a, labels).sum().backward()
    torch.log_softmax(b, -1).gather(-1, labels[..., None]).sum().backward()
    assert_close(a.grad, b.grad)


def test_logprobs_half_precision_upcast():
    logits = torch.randn(1, 2, 5).bfloat16()
    assert lm.logprobs_from_logits(logits, torch.zeros(1, 2, dtype=torch.long)).dtype == torch.float32




def test_full_kl_per_token_hand_computed():
    # p = [1/2, 1/2], q = [1/4, 3/4]: KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3); identical distributions give 0
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75], [0.25, 0.75]]]))
    expected = torch.tensor([[0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0), 0.0]])
    # logits up to a constant shift per position give the same distributions
    assert_close(full_kl_per_token(p + 3.0, q - 1.0), expected)


def test_entropy_from_the_same_logsumexp_matches_categorical_entropy_and_chunks_exactly():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 9) * 3
    labels = torch.randint(0, 9, (2, 4))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    for chunk in (2**24, 9, 20):  # one chunk; one row per chunk; two rows per chunk
        logprobs, entropy = lm.logprobs_from_logits(logits, labels, chunk_elements=chunk, with_entropy=True)
        assert_close(entropy, expected)
        assert_close(logprobs, lm.logprobs_from_logits(logits, labels))
    # hand-computed: uniform over 4 -> ln 4; a near one-hot distribution -> ~0
    logits = torch.stack([torch.zeros(4), torch.tensor([100.0, 0, 0, 0])])[None]  # [1, 2, 4]
    _, entropy = lm.logprobs_from_logits(logits, torch.zeros(1, 2, dtype=torch.long), with_entropy=True)
    assert_close(entropy, torch.tensor([[math.log(4.0), 0.0]]), atol=1e-5, rtol=0)
