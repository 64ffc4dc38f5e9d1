"""Shared by the Policy tests (test_policy.py, test_policy_export.py, test_policy_loading.py): tiny policies, their
prompts and sampled responses, and scoring independent of ``Policy``'s code.

Expectations are computed independently of ``Policy``'s scoring code: each row is run alone through the
plain Hugging Face model, with no padding at all (so default position ids), and scored with
``log_softmax``; or they come from ``generate``'s own logits; or they are written by hand.
"""

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.models import Policy, load_causal_or_seq2seq, resolve_model_path
from lit_rlhf.settings import GenerationSettings, LoraSettings

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
