"""The cached sampling loop: samples like generate(), scores like the teacher-forced forward, drops finished rows."""

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.models import decoding
from lit_rlhf.models import inverse_cdf_sample, sample_with_cache, warpers
from lit_rlhf.models import Policy
from lit_rlhf.settings import GenerationSettings

T5, GPT2 = "embedded:tiny-t5", "embedded:tiny-gpt2"
PROMPTS = ["#Person1#: Hello there, how are you?\n#Person2#: Fine.", "#Person1#: hi",
           "#Person1#: What time is the meeting tomorrow?\n#Person2#: At noon."]


@pytest.fixture(scope="module", params=[T5, GPT2], ids=["t5", "gpt2"])
def policy(request):
    torch.manual_seed(0)
    policy = Policy(request.param).eval()
    for name, p in policy.named_parameters():  # a non-zero adapter, so the loop must go through it
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return policy


def encode(policy):
    policy.tokenizer.padding_side = "right" if policy.is_seq2seq else "left"
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def sample(policy, limits, min_new_tokens=1, **kwargs):
    ids, mask = encode(policy)
    settings = GenerationSettings(min_new_tokens=min_new_tokens, **kwargs)
    return sample_with_cache(policy.model, policy.lm, policy.value_head, ids, mask, torch.tensor(limits), settings,
                             policy.special_tokens)


def test_logprobs_and_values_equal_the_teacher_forced_forward(policy):
    torch.manual_seed(3)
    out = sample(policy, [7, 3, 12])
    ids, mask = encode(policy)
    forward = policy(ids, mask, out.response_ids, out.response_mask)
    m = out.response_mask.bool()
    assert_close(out.logprobs[m], forward.logprobs[m], atol=1e-5, rtol=1e-5)
    assert_close(out.values[m], forward.values[m], atol=1e-5, rtol=1e-5)
    assert (out.logprobs[~m] == 0).all() and (out.values[~m] == 0).all()


def test_rows_stop_at_their_own_limit_or_eos(policy):
    torch.manual_seed(4)
    out = sample(policy, [2, 5, 3], min_new_tokens=0)
    lengths = out.response_mask.sum(1)
    assert (lengths <= torch.tensor([2, 5, 3])).all()
    for row, n in zip(out.response_ids, lengths.tolist()):
        tokens = row[:n].tolist()
        # a row ends at its limit or at its first eos, never later
        assert policy.eos_token_id not in tokens[:-1]
        assert (row[n:] == policy.pad_token_id).all()
    # the mask is what Policy.response_mask derives from the tokens and limits
    assert torch.equal(out.response_mask, policy.response_mask(out.response_ids, torch.tensor([2, 5, 3])))


@pytest.mark.parametrize("warping", [{}, {"temperature": 0.7}, {"top_p": 0.8}, {"temperature": 1.3, "top_p": 0.9}])
def test_samples_exactly_like_generate_while_no_row_has_finished(policy, warping, monkeypatch):
    # eos blocked and equal limits: no row leaves the batch; with generate's multinomial draw in place of the
    # loop's inverse-CDF draw (tested on its own below), both draw the same random numbers, so the same
    # tokens show that the loop warps (temperature, nucleus, in generate's order) and blocks eos as generate does
    monkeypatch.setattr(decoding, "inverse_cdf_sample", lambda p: torch.multinomial(p, num_samples=1).squeeze(1))
    limits = torch.tensor([6, 6, 6])
    torch.manual_seed(1)
    ours = sample(policy, limits.tolist(), min_new_tokens=6, **warping)
    torch.manual_seed(1)
    ids, mask = encode(policy)
    theirs, _ = policy.generate(ids, mask, GenerationSettings(min_new_tokens=6, **warping), max_new_tokens=limits)
    assert torch.equal(ours.response_ids, theirs)
    assert len(warpers(GenerationSettings(**warping))) == len(warping)  # one warper per setting, none at defaults


def test_inverse_cdf_sample_hand_computed(monkeypatch):
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3], [0.0, 0.0, 1.0, 0.0], [1.0, 2.0, 0.0, 1.0]])  # row 3 unnormalised
    for u, expected in ((0.0, [0, 2, 0]), (0.19, [0, 2, 0]), (0.2, [2, 2, 0]), (0.69, [2, 2, 1]),
                        (0.7, [3, 2, 1]), (0.76, [3, 2, 3]), (1.0, [3, 2, 3])):  # 1.0: the rounding fallback
        monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, u, **kw))
        assert inverse_cdf_sample(probs).tolist() == expected, u


def test_inverse_cdf_sample_draws_the_distribution():
    from scipy.stats import chisquare

    probs = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3])
    torch.manual_seed(0)
    draws = inverse_cdf_sample(probs.expand(40_000, -1))
    counts = torch.bincount(draws, minlength=6)
    assert counts[1] == 0 and counts[4] == 0  # probability 0: never drawn
    nonzero = probs > 0
    assert chisquare(counts[nonzero].numpy(), (probs[nonzero] * 40_000).numpy()).pvalue > 1e-3


def test_logprobs_are_those_of_the_temperature_one_policy(policy):
    # sampling at temperature 2 still records log pi(token) of the untempered policy, as the scoring forward
    torch.manual_seed(2)
    out = sample(policy, [6, 6, 6], temperature=2.0, top_p=0.9)
    ids, mask = encode(policy)
    forward = policy(ids, mask, out.response_ids, out.response_mask)
    m = out.response_mask.bool()
    assert_close(out.logprobs[m], forward.logprobs[m], atol=1e-5, rtol=1e-5)


def test_greedy_and_top_k(policy):
    greedy_a = sample(policy, [5, 5, 5], do_sample=False)
    greedy_b = sample(policy, [5, 5, 5], do_sample=False)
    assert torch.equal(greedy_a.response_ids, greedy_b.response_ids)
    torch.manual_seed(5)
    top1 = sample(policy, [5, 5, 5], top_k=1)  # top-1 sampling is greedy decoding
    assert torch.equal(top1.response_ids, greedy_a.response_ids)


def test_in_place_cache_steps_like_the_growing_cache_and_does_not_reallocate(policy):
    """The preallocated cache gives the same logits as transformers' concatenating cache, step after step and
    across a row drop, and a decode step writes into the same buffer (no per-step copy of the cache)."""
    ids, mask = encode(policy)
    growing, in_place = (policy.lm.start(policy.model, ids, mask, horizon=h) for h in (0, 6))
    tokens = torch.tensor([5, 6, 7])
    buffers = None
    with torch.no_grad():
        for t in range(5):
            (a, ha), (b, hb) = policy.lm.step(policy.model, growing), policy.lm.step(policy.model, in_place)
            assert_close(b, a, atol=1e-5, rtol=1e-5)
            assert_close(hb, ha, atol=1e-5, rtol=1e-5)
            cache = in_place.cache.self_attention_cache if policy.is_seq2seq else in_place.cache
            layer = cache.layers[0]
            assert layer.get_seq_length() == (t + 1 if policy.is_seq2seq else ids.shape[1] + t)
            if t == 2:  # row 1 finished: both caches drop it
                keep = torch.tensor([0, 2])
                for state in (growing, in_place):
                    policy.lm.select(state, keep)
                tokens, buffers = tokens[keep], None
            elif buffers is not None:
                assert layer.key_buffer.data_ptr() == buffers  # written in place, not reallocated
            buffers = layer.key_buffer.data_ptr() if t != 2 else None
            for state in (growing, in_place):
                policy.lm.advance(state, tokens)


def test_a_decode_step_passes_the_cache_under_the_name_the_model_takes(policy, caplog):
    """transformers renamed forward's ``past_key_values`` to ``cache`` (the old name warns once per process);
    the decode loop uses whichever the installed model takes, so a run prints no deprecation warning."""
    import logging
    import warnings

    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process warnings: clear what ran before
    ids, mask = encode(policy)
    state = policy.lm.start(policy.model, ids, mask, horizon=3)
    # transformers warns through its logger or through warnings.warn, depending on the code path: watch both
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            policy.lm.step(policy.model, state)
            policy.lm.advance(state, torch.tensor([5, 6, 7]))
    assert state.cache.get_seq_length() == (2 if policy.is_seq2seq else ids.shape[1] + 1)  # the cache we passed
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [m for m in messages if "past_key_values" in m], messages


def test_a_response_is_truncated_when_its_limit_and_not_an_eos_ended_it():
    tokens = decoding.SpecialTokens(eos=(1, 2), pad=0)
    response = torch.tensor([[5, 6, 1, 0], [5, 6, 7, 8], [5, 2, 0, 0], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    limits = torch.tensor([4, 4, 2, 3])
    assert tokens.truncated(response, mask, limits).tolist() == [False, True, False, True]  # (any eos id ends one)
    # GPT-2 pads with its eos: the last real token decides, not the padding after it
    gpt2 = decoding.SpecialTokens(eos=(1,), pad=1)
    assert gpt2.truncated(torch.tensor([[5, 1, 1], [5, 6, 1]]), torch.tensor([[1, 1, 0], [1, 1, 0]]),
                          torch.tensor([3, 2])).tolist() == [False, True]
    # a forced eos (BART's) ends every response at its limit: there it is a truncation
    forced = decoding.SpecialTokens(eos=(1,), pad=0, forced_eos=1)
    assert forced.truncated(torch.tensor([[5, 6, 1], [5, 1, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                            torch.tensor([3, 3])).tolist() == [True, False]
