"""Rewards without a classifier (profanity, reference similarity, composite), the checks around every reward's
scores, and the package's exports; the profanity model is the installed package's own."""

import importlib
import inspect
import math
import pkgutil

import pytest
import torch
from torch.testing import assert_close

import lit_rlhf.rewards
from lit_rlhf.rewards import CompositeReward, ProfanityReward, ReferenceSimilarityReward, Reward


# --- ProfanityReward -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profanity() -> ProfanityReward:
    return ProfanityReward().to("cpu")


def test_profanity_reward_prefers_neutral_text(profanity):
    neutral, offensive = "the meeting is moved to tuesday at noon", "you are a fucking stupid idiot"
    scores = profanity(["", ""], [neutral, offensive])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert scores[0] > 0 > scores[1]


def test_profanity_reward_is_the_logit_of_not_offensive(profanity):
    from profanity_check import predict_prob

    texts = ["have a good day", "what the hell", "damn it", "you idiot", "person1 is late for work again"]
    p = torch.from_numpy(predict_prob(texts))  # float64: 1 - p keeps its digits where p is close to 1
    assert ((p > 1e-7) & (p < 1 - 1e-7)).all()  # not saturated, so log((1-p)/p) is a fair reference
    assert_close(profanity.probability(texts), p.float())
    assert_close(profanity([""] * 5, texts).double(), torch.log((1 - p) / p), rtol=1e-4, atol=1e-4)
    clamped = ProfanityReward(method="clamped", eps=1e-4)
    p = p.clamp(1e-4, 1 - 1e-4)  # "you idiot" has p > 1 - 1e-4
    assert_close(clamped([""] * 5, texts).double(), torch.log((1 - p) / p), rtol=1e-5, atol=1e-5)


def test_profanity_reward_is_finite_and_ordered_on_extreme_texts(profanity):
    worst = "fuck shit bitch asshole " * 50
    texts = [worst, "fuck you", "", "@@@ ###", "日本語のテキスト", "the " * 2000]
    scores = profanity([""] * len(texts), texts)
    assert torch.isfinite(scores).all()
    # predict_prob rounds the worst text to P(offensive) = 1; the exact logit still ranks it below "fuck you".
    assert scores[0] < scores[1] < 0
    eps = 1e-4
    clamped = ProfanityReward(method="clamped", eps=eps)([""] * len(texts), texts)
    assert torch.isfinite(clamped).all() and clamped.abs().max() <= math.log((1 - eps) / eps) + 1e-4


# --- ReferenceSimilarityReward --------------------------------------------------------------------------------------


def test_similarity_reward_is_rouge1_f():
    reward = ReferenceSimilarityReward()
    references = ["Person1 asks Person2 about the weather.", "The meeting is on Tuesday."]
    responses = ["person1 asks person2 about the weather", "dogs bark at cats"]
    scores = reward(["", ""], responses, references=references)
    assert_close(scores, torch.tensor([1.0, 0.0]))
    # "the meeting" of 2 words vs 5 reference words: precision 1, recall 2/5, F = 2·1·0.4 / 1.4.
    partial = reward([""], ["the meeting"], references=["The meeting is on Tuesday."])
    assert_close(partial, torch.tensor([2 * 0.4 / 1.4]))


def test_similarity_reward_needs_references():
    with pytest.raises(ValueError, match="references="):
        ReferenceSimilarityReward()([""], ["a"])


# --- CompositeReward -----------------------------------------------------------------------------------------------


def test_composite_reward_checks_weights(profanity):
    with pytest.raises(ValueError, match=r"^--model.reward.weights has 1 values for 2 rewards \(--model.reward."
                                         r"rewards\)"):
        CompositeReward([profanity, ReferenceSimilarityReward()], weights=[1.0])
    with pytest.raises(ValueError, match="^--model.reward.rewards must hold at least one"):
        CompositeReward([])


def test_composite_reward_names_repeated_parts_apart(profanity):
    composite = CompositeReward([profanity, profanity])
    composite([""], ["hello"])
    assert list(composite.last_components) == ["profanity", "profanity_1"]


# --- boundary checks -----------------------------------------------------------------------------------------------


class FixedReward(Reward):
    """Returns whatever it was given, to exercise the checks around compute."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores

    def compute(self, prompts, responses, references):
        return self.scores


def test_non_finite_scores_are_rejected_with_their_positions():
    with pytest.raises(ValueError, match=r"FixedReward returned non-finite scores at positions \[1, 2\]"):
        FixedReward(torch.tensor([0.0, float("nan"), float("inf")]))(["a"] * 3, ["b"] * 3)
    with pytest.raises(ValueError, match="FixedReward returned non-finite"):  # 1e300 overflows float32
        FixedReward(torch.tensor([1e300], dtype=torch.float64))(["a"], ["b"])


def test_wrong_shapes_and_types_are_rejected():
    with pytest.raises(ValueError, match=r"FixedReward.compute returned shape \(2, 1\), expected \(2,\)"):
        FixedReward(torch.zeros(2, 1))(["a", "a"], ["b", "b"])
    with pytest.raises(ValueError, match="dtype torch.int64"):
        FixedReward(torch.zeros(2, dtype=torch.long))(["a", "a"], ["b", "b"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        FixedReward(torch.zeros(1))(["a", "a"], ["b"])
    with pytest.raises(ValueError, match="`responses` must be a list"):
        FixedReward(torch.zeros(1))(["a"], "b")


def test_scores_are_float32_plain_tensors_on_the_reward_device():
    scores = FixedReward(torch.tensor([1.0, 2.0], dtype=torch.float64))(["a", "a"], ["b", "b"])
    assert scores.dtype == torch.float32 and scores.device == torch.device("cpu")
    assert not scores.is_inference()  # usable in place and in autograd by the PPO step
    scores.add_(1.0)


# --- the package ---------------------------------------------------------------------------------------------------


def test_every_reward_class_is_exported_by_the_package():
    """``lit_rlhf.rewards.<Class>`` is the path configs write, whichever file of the package defines the class."""
    for info in pkgutil.iter_modules(lit_rlhf.rewards.__path__):
        module = importlib.import_module(f"lit_rlhf.rewards.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Reward) and cls.__module__ == module.__name__:
                assert getattr(lit_rlhf.rewards, name, None) is cls, name
                assert name in lit_rlhf.rewards.__all__, name
