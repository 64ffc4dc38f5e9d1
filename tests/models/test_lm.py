"""Token ops and the seq2seq/causal adapter (lit_rlhf/lm.py), and the policy's exact KL."""

import math

import torch
from torch.testing import assert_close

from lit_rlhf.models import lm
from lit_rlhf.models import full_kl_per_token


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


# ------------------------------------------------------------------ position limit


def test_position_limit_reads_learnt_positions_the_roberta_offset_and_a_real_tokenizer_limit():
    from types import SimpleNamespace

    from transformers import GPT2Config, RobertaConfig, T5Config

    gpt2 = GPT2Config(n_positions=64)
    assert lm.position_limit(gpt2) == 64
    # RoBERTa's positions start after the pad id (1): 514 embeddings read 512 tokens
    assert lm.position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert lm.position_limit(RobertaConfig(max_position_embeddings=40, pad_token_id=0)) == 39
    # T5's relative positions have no limit, even with a stray n_positions from an old config.json
    assert lm.position_limit(T5Config()) is None
    assert lm.position_limit(T5Config(n_positions=512)) is None
    # a tokenizer's real model_max_length below the positions wins; transformers' unknown int(1e30) does not count
    assert lm.position_limit(gpt2, SimpleNamespace(model_max_length=24)) == 24
    assert lm.position_limit(gpt2, SimpleNamespace(model_max_length=int(1e30))) == 64
    assert lm.position_limit(T5Config(), SimpleNamespace(model_max_length=24)) == 24
    # a stated million-token context is a real limit
    assert lm.position_limit(GPT2Config(n_positions=2_000_000), SimpleNamespace(model_max_length=1_010_000)) == 1_010_000


def test_every_position_limit_is_the_one_function(tmp_path):
    """The prompt context, the policy's positions and a classifier's limit read one function."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from lit_rlhf.data import context_tokens
    from lit_rlhf.models import resolve_model_path

    folder = shutil.copytree(resolve_model_path("embedded:tiny-gpt2"), tmp_path / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(folder, model_max_length=24)
    config = AutoConfig.from_pretrained(folder)
    assert context_tokens(config, tokenizer) == lm.position_limit(config, tokenizer) == 24
    assert lm.CausalLM(config).max_positions() == lm.position_limit(config) == config.n_positions
    t5 = AutoConfig.from_pretrained(resolve_model_path("embedded:tiny-t5"))
    assert context_tokens(t5, tokenizer) is None  # a seq2seq prompt is not held to a T5 tokenizer's stated limit
