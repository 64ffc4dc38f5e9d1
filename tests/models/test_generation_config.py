"""Generation starts from the model's own generation_config (every eos id, decoder start, forced tokens), with the
run's sampling settings on top, the same in both rollout modes and in the response mask."""

import pytest
import torch
from tiny_architectures import build_tiny
from torch.testing import assert_close

from lit_rlhf.models import decoding
from lit_rlhf.models import Policy
from lit_rlhf.settings import GenerationSettings
from lit_rlhf.settings import LoraSettings

PROMPTS = ["#Person1#: Hello there, how are you?\n#Person2#: Fine.", "#Person1#: hi",
           "#Person1#: What time is the meeting tomorrow?\n#Person2#: At noon."]
TURN_END = 7  # a second end-of-turn id, as <|im_end|> beside <|endoftext|>
LANGUAGE = 9  # mBART's target-language code, forced as the first response token


def make_policy(path: str) -> Policy:
    torch.manual_seed(0)
    policy = Policy(path, lora=LoraSettings(r=4, alpha=4, target_modules="all-linear")).eval()
    for name, p in policy.named_parameters():  # a non-zero adapter: both modes must go through it
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return policy


def encode(policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
    policy.tokenizer.padding_side = policy.lm.query_padding_side
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def rollout(policy: Policy, fast: bool, limits: list[int], **settings) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = encode(policy)
    config, limits = GenerationSettings(**settings), torch.tensor(limits)
    if fast:
        out = policy.sample(ids, mask, config, limits)
        return out.response_ids, out.response_mask
    return policy.generate(ids, mask, config, max_new_tokens=limits)


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory):
    """A Qwen2-shaped model whose generation_config lists two eos ids: the tokenizer's and an end-of-turn id."""
    path = build_tiny("qwen2", tmp_path_factory.mktemp("qwen2"), eos_token_id=[TURN_END, 0])
    return make_policy(path)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generate"])
@pytest.mark.parametrize("eos", [TURN_END, 0], ids=["turn-end", "tokenizer-eos"])
def test_a_chat_model_stops_at_any_of_its_eos_ids(chat_policy, fast, eos):
    # the lm head makes `eos` near-certain: blocked for min_new_tokens=2 steps, then every row ends with it
    hook = chat_policy.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 50.0)))
    try:
        torch.manual_seed(0)
        response, mask = rollout(chat_policy, fast, [6, 6, 6], min_new_tokens=2)
    finally:
        hook.remove()
    assert mask.sum(1).tolist() == [3, 3, 3]
    assert (response[:, 2] == eos).all()
    assert not chat_policy.special_tokens.is_eos(response[:, :2]).any()  # min_new_tokens blocks every eos id


def test_the_response_mask_ends_at_the_first_of_any_eos_id(chat_policy):
    assert chat_policy.eos_token_ids == (TURN_END, 0)  # the model's list first, then the tokenizer's eos
    response = torch.tensor([[5, TURN_END, 6, 0], [5, 6, 0, TURN_END], [5, 6, 8, 9]])
    assert chat_policy.response_mask(response).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_the_models_own_sampling_settings_do_not_change_the_rollout(tmp_path, monkeypatch):
    # a chat model's generation_config samples at its own temperature, with a repetition penalty; PPO samples
    # the policy with the run's settings, so generate and the cached loop draw the same tokens (as in
    # test_decoding, with generate's multinomial draw in the loop)
    path = build_tiny("qwen2", tmp_path, eos_token_id=[TURN_END, 0], temperature=0.3, top_k=5,
                      repetition_penalty=50.0, do_sample=True)
    policy = make_policy(path)
    monkeypatch.setattr(decoding, "inverse_cdf_sample", lambda p: torch.multinomial(p, num_samples=1).squeeze(1))
    torch.manual_seed(1)
    ours, _ = rollout(policy, True, [6, 6, 6], min_new_tokens=6)
    torch.manual_seed(1)
    theirs, _ = rollout(policy, False, [6, 6, 6], min_new_tokens=6)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generate"])
def test_the_models_own_sampling_settings_are_named_once_with_the_flags_that_replace_them(tmp_path, caplog, fast):
    # use_cache and output_*: what generate returns, not what it samples (newer transformers save them)
    path = build_tiny("qwen2", tmp_path, eos_token_id=[TURN_END, 0], temperature=0.7, top_p=0.8,
                      repetition_penalty=1.05, do_sample=True, use_cache=False, output_hidden_states=True,
                      return_dict_in_generate=True)
    policy = make_policy(path)
    with caplog.at_level("WARNING", logger="lit_rlhf"):
        for _ in range(2):
            rollout(policy, fast, [3, 3, 3], min_new_tokens=0, top_p=0.9)
    notices = [r for r in caplog.records if "generation_config" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelname == "WARNING"
    line = notices[0].getMessage()
    assert "temperature=0.7" in line and "top_p=0.8" in line
    assert "--model.generation.temperature 1.0" in line and "--model.generation.top_p 0.9" in line
    assert "repetition_penalty: no such setting here, not used" in line
    assert "use_cache" not in line and "output_hidden_states" not in line and "return_dict" not in line


@pytest.fixture(scope="module")
def mbart_policy(tmp_path_factory):
    """An mBART-shaped model: no decoder start token in its config (decoding starts from bos), a forced
    first token (the target language) and a forced eos at the length limit."""
    path = build_tiny("mbart", tmp_path_factory.mktemp("mbart"), forced_bos_token_id=LANGUAGE)
    return make_policy(path)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generate"])
def test_mbart_generates_its_forced_first_token_and_scores_it_consistently(mbart_policy, fast):
    policy = mbart_policy
    assert policy.lm.decoder_start_token_id == policy.model.config.bos_token_id
    limits = [5, 3, 4]
    torch.manual_seed(2)
    response, mask = rollout(policy, fast, limits, min_new_tokens=0)
    assert (response[:, 0] == LANGUAGE).all()
    lengths = mask.sum(1)
    for row, n, limit in zip(response, lengths.tolist(), limits):  # ends at eos: its own, or forced at the limit
        assert n <= limit and row[n - 1] == policy.eos_token_id
    ids, qmask = encode(policy)
    forward = policy(ids, qmask, response, mask)
    if fast:  # the cached loop's log-probs (the forced token's included) are the teacher-forced ones
        torch.manual_seed(2)
        sampled = policy.sample(ids, qmask, GenerationSettings(min_new_tokens=0), torch.tensor(limits))
        m = mask.bool()
        assert_close(sampled.logprobs[m], forward.logprobs[m], atol=1e-5, rtol=1e-5)
        assert_close(sampled.values[m], forward.values[m], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(forward.logprobs).all() and (forward.logprobs[:, 0] < 0).all()
