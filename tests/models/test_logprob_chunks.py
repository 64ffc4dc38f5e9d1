"""``model.logprob_chunk_size``: the LM head applied a chunk of positions at a time (``lit_rlhf.models.logprobs``).

The log-probs, entropies, values and gradients must equal the whole-logits path's up to float rounding (seq2seq and
causal, LoRA on the LM head, tied heads, T5's scaled decoder output, soft-capped or scaled logits), and no tensor of
[rows, tokens, vocab] may be created."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from lit_rlhf.models import Policy, ResponseBatch
from lit_rlhf.models.lm import lm_kind
from lit_rlhf.models.logprobs import ChosenLogSoftmax, chunked_logprobs, logit_transform, token_logprobs
from lit_rlhf.settings import LoraSettings, memory_errors

from conftest import perturb_lora

T5, GPT2 = "embedded:tiny-t5", "embedded:tiny-gpt2"
TARGETS = {T5: ["q", "v", "lm_head"], GPT2: ["c_attn", "lm_head"]}
PROMPTS = ["#Person1#: Hello there, how are you today? #Person2#: Fine, thanks.", "Hi",
           "#Person2#: I would like a cup of tea, please."]
LENGTHS = [[5], [2], [4]]
TOL = dict(atol=1e-5, rtol=1e-5)


def make_policy(name: str, chunk: int) -> Policy:
    torch.manual_seed(0)
    policy = Policy(name, lora=LoraSettings(r=4, alpha=4, target_modules=TARGETS[name]), logprob_chunk_size=chunk)
    perturb_lora(policy.model)
    with torch.no_grad():
        torch.nn.init.normal_(policy.value_head.summary.weight, generator=torch.Generator().manual_seed(1))
    return policy


def response_batch(policy: Policy, tokens: int = 5) -> ResponseBatch:
    """The prompts padded as the model kind needs, random responses of 5, 2 and 4 tokens (right-padded)."""
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    response = torch.randint(3, 200, (len(PROMPTS), tokens), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(tokens)[None] < torch.tensor(LENGTHS)).long()
    return ResponseBatch(enc.input_ids, enc.attention_mask, response, mask)


def update_pass(policy: Policy, batch: ResponseBatch) -> tuple[dict, dict]:
    """The update's forward with an entropy bonus and a value loss, its backward; outputs and gradients."""
    policy.zero_grad()
    out, rows, _ = policy.forward_rows(batch, torch.arange(len(PROMPTS)), with_entropy=True, entropy_grad=True)
    mask = rows.response_mask
    loss = (-(out.logprobs * mask).sum() - 0.1 * (out.entropy * mask).sum() + (out.values * mask).square().sum())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return {"logprobs": out.logprobs, "entropy": out.entropy, "values": out.values}, grads


@pytest.mark.parametrize("name", [T5, GPT2])
def test_chunked_log_probs_entropy_values_and_gradients_equal_the_whole_logits(name):
    plain = make_policy(name, 0)
    batch = response_batch(plain)
    outputs, grads = update_pass(plain, batch)
    scores = plain.score(batch, [torch.arange(3)])
    assert any("lm_head.lora_A" in n for n in grads) and all(g.abs().sum() > 0 for g in grads.values())
    for chunk in (4, 1, 64):  # 4 and 1 divide nothing (3 rows x 5 tokens), 64 is more than all
        chunked = make_policy(name, chunk)
        chunked_outputs, chunked_grads = update_pass(chunked, batch)
        for field in outputs:
            assert_close(chunked_outputs[field], outputs[field], **TOL, msg=f"{field}, chunk {chunk}")
        assert grads.keys() == chunked_grads.keys()
        for n in grads:
            scale = float(grads[n].abs().max())  # (T5's value-loss gradients are in the hundreds)
            assert_close(chunked_grads[n], grads[n], atol=1e-5 * scale, rtol=1e-4, msg=f"{n}, chunk {chunk}")
        chunked_scores = chunked.score(batch, [torch.arange(3)])  # policy, values, adapter-disabled reference
        for field in ("logprobs", "values", "ref_logprobs"):
            assert_close(getattr(chunked_scores, field), getattr(scores, field), **TOL, msg=field)
    # the exact KL needs both distributions' logits: it takes the whole-logits path and gets them
    full = chunked.score(batch, [torch.arange(3)], full_kl=True)
    assert_close(full.kl, plain.score(batch, [torch.arange(3)], full_kl=True).kl, **TOL)


class LargestLogits(TorchDispatchMode):
    """The most positions x vocabulary of any tensor an op creates (not a view: the head's transposed weight is one)
    whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab and not func.is_view:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", [T5, GPT2])
def test_the_chunked_update_and_scoring_never_create_rows_x_tokens_x_vocab(name):
    largest, kept = {}, {}
    for chunk in (0, 4):
        policy = make_policy(name, chunk)
        batch = response_batch(policy)
        vocab = policy.model.get_output_embeddings().weight.shape[0]
        saved = [0]  # positions x vocabulary that autograd keeps for the backward (outside a checkpoint)

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() // vocab if t.dim() and t.shape[-1] == vocab and not t._is_view() else 0
            return t
        with LargestLogits(vocab) as recorded, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            update_pass(policy, batch)
            policy.score(batch, [torch.arange(3)])
        largest[chunk], kept[chunk] = recorded.largest // vocab, saved[0]
    # the whole-logits path: every row's every position, created and kept (the recorders see them)
    assert largest[0] >= 3 * 5 and kept[0] >= 3 * 5
    # chunked: at most a chunk's positions at once, forward and backward (its recompute), and none kept
    assert largest[4] <= 4 and kept[4] == 0


def tied_t5():
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        tie_word_embeddings=True, scale_decoder_outputs=True))


def causal(config_class, **fields):
    return lambda: tf.AutoModelForCausalLM.from_config(config_class(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **fields))


MODELS = {
    "t5 tied, scaled decoder output": tied_t5,
    "qwen2 tied": causal(tf.Qwen2Config, tie_word_embeddings=True),
    "gemma2 soft-capped": causal(tf.Gemma2Config, head_dim=8, final_logit_softcapping=0.5),
    "cohere logit scale": causal(tf.CohereConfig, logit_scale=3.0),
    "granite logits scaling": causal(tf.GraniteConfig, logits_scaling=0.2),
}


@pytest.mark.parametrize("kind", MODELS)
def test_heads_that_scale_their_input_or_logits_give_the_same_log_probs(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    lm = lm_kind(model.config)
    g = torch.Generator().manual_seed(0)
    query, response = torch.randint(2, 300, (2, 6), generator=g), torch.randint(2, 300, (2, 5), generator=g)
    query_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])  # a causal query is left-padded
    if lm.is_seq2seq:
        query_mask = query_mask.flip(1)
    tensors = (query, query_mask, response, torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]))
    plain = token_logprobs(lm, model, tensors, with_entropy=True)
    chunked = token_logprobs(lm, model, tensors, with_entropy=True, chunk_size=3)
    assert plain.logits is None and chunked.logits is None
    assert_close(chunked.logprobs, plain.logprobs, **TOL)
    assert_close(chunked.entropy, plain.entropy, **TOL)


def test_logit_transforms_and_the_chunk_size_check():
    x = torch.tensor([[-4.0, 0.5, 8.0]])
    assert logit_transform(tf.GPT2Config()) is None and logit_transform(tf.Gemma3TextConfig()) is None
    assert_close(logit_transform(tf.Gemma2Config(final_logit_softcapping=2.0))(x), torch.tanh(x / 2) * 2)
    assert_close(logit_transform(tf.CohereConfig(logit_scale=0.5))(x), x * 0.5)
    assert_close(logit_transform(tf.GraniteConfig(logits_scaling=4.0))(x), x / 4)
    # one position's log-softmax by hand, a chunk of 2 over 3 positions
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    states, labels = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 0.0]]), torch.tensor([0, 2, 1])
    logprobs, entropy = chunked_logprobs(head, states, labels, 2, with_entropy=True)
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 0.0, 2.0]])
    expected = torch.stack([z[i, y] - z[i].exp().sum().log() for i, y in enumerate(labels)])
    assert_close(logprobs, expected)
    assert_close(entropy[0], torch.log(torch.tensor(3.0)))
    assert memory_errors(None, 1, 4, None, 256) == []
    assert memory_errors(None, 1, 4, None, -1) == ["model.logprob_chunk_size must be >= 0, got -1"]


def test_the_chosen_log_softmax_gradient_is_autograds():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.tensor([0, 6, 3, 3])
    assert torch.autograd.gradcheck(ChosenLogSoftmax.apply, (logits, labels))
    logprobs, lse = ChosenLogSoftmax.apply(logits, labels)
    weights = torch.randn(2, 4, generator=g, dtype=torch.float64)
    (mine,) = torch.autograd.grad((weights[0] * logprobs + weights[1] * lse).sum(), logits)
    lse_ = torch.logsumexp(logits, -1)
    plain = weights[0] * (logits.gather(-1, labels[:, None]).squeeze(-1) - lse_) + weights[1] * lse_
    (expected,) = torch.autograd.grad(plain.sum(), logits)
    assert_close(mine, expected)
