"""ClassifierReward, and the rewards built around one (composite, empty batches, devices, YAML): a tiny RoBERTa
classifier saved locally stands in for the hub model; the profanity model is the installed package's own."""

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from conftest import build_tiny_classifier

from lit_rlhf.rewards import (
    ClassifierReward,
    CompositeReward,
    ProfanityReward,
    ReferenceSimilarityReward,
    Reward,
    classifier_input_ids,
    special_tokens_around,
)


SENTENCES = [
    "you are a wonderful friend and i like you",
    "i hate you and your stupid ideas",
    "the meeting is moved to tuesday at noon",
    "person1 asks person2 about the weather today",
]
MAX_TOKENS = 16  # the tiny model's position limit, so long texts must be truncated to be scored at all


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RoBERTa sequence classifier (labels nothate / hate) and its tokenizer, saved like a hub model."""
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny_classifier"), SENTENCES, MAX_TOKENS)


@pytest.fixture(scope="module")
def hf_classifier(classifier_path: Path):
    """The saved classifier loaded directly through transformers, to compute expected scores independently."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier_path).eval()
    return AutoTokenizer.from_pretrained(classifier_path), model


def direct_logits(hf_classifier, texts: list[str]) -> torch.Tensor:
    tokenizer, model = hf_classifier
    with torch.no_grad():
        return torch.cat(
            [
                model(**tokenizer([t], truncation=True, max_length=MAX_TOKENS, return_tensors="pt")).logits
                for t in texts  # one text at a time: no padding in the expected values
            ]
        )  # [B, 2]


# --- ClassifierReward --------------------------------------------------------------------------------------------


def test_classifier_reward_is_the_label_logit(classifier_path, hf_classifier):
    reward = ClassifierReward(str(classifier_path), label="nothate", max_length=MAX_TOKENS)
    prompts = ["summarize:"] * len(SENTENCES)
    scores = reward(prompts, SENTENCES)
    assert scores.dtype == torch.float32 and scores.shape == (len(SENTENCES),)
    assert_close(scores, direct_logits(hf_classifier, SENTENCES)[:, 0], rtol=1e-5, atol=1e-5)
    hate = ClassifierReward(str(classifier_path), label="hate", max_length=MAX_TOKENS)(prompts, SENTENCES)
    assert_close(hate, direct_logits(hf_classifier, SENTENCES)[:, 1], rtol=1e-5, atol=1e-5)
    assert reward.model_id == str(classifier_path) and reward.uses_model(str(classifier_path))


def test_classifier_reward_probability_is_the_softmax(classifier_path, hf_classifier):
    reward = ClassifierReward(str(classifier_path), output="probability", max_length=MAX_TOKENS)
    scores = reward([""] * len(SENTENCES), SENTENCES)
    assert_close(scores, direct_logits(hf_classifier, SENTENCES).softmax(-1)[:, 0], rtol=1e-5, atol=1e-6)


def test_classifier_reward_small_batches_match_one_batch(classifier_path):
    texts = SENTENCES + ["i like tuesday", "stupid weather", "noon"]  # different lengths: padding differs
    one = ClassifierReward(str(classifier_path), batch_size=len(texts), max_length=MAX_TOKENS)
    small = ClassifierReward(str(classifier_path), batch_size=3, max_length=MAX_TOKENS)
    assert_close(small([""] * len(texts), texts), one([""] * len(texts), texts), rtol=1e-5, atol=1e-5)


def test_classifier_reward_truncates_long_texts(classifier_path, hf_classifier):
    long_text = " ".join(SENTENCES * 20)  # ~150 tokens; the model has positions for 16
    reward = ClassifierReward(str(classifier_path), max_length=MAX_TOKENS)
    scores = reward(["", ""], [long_text, "noon"])
    assert_close(scores, direct_logits(hf_classifier, [long_text, "noon"])[:, 0], rtol=1e-5, atol=1e-5)


def test_classifier_reward_max_length_beyond_the_model_is_rejected(classifier_path):
    with pytest.raises(ValueError, match=rf"^--model.reward.max_length is 512 but .* reads at most {MAX_TOKENS} "
                                         rf"tokens; set --model.reward.max_length to {MAX_TOKENS} or less"):
        ClassifierReward(str(classifier_path), max_length=512).setup()
    # a part of a composite reward names where it is set
    composite = CompositeReward([ReferenceSimilarityReward(), ClassifierReward(str(classifier_path), max_length=512)])
    with pytest.raises(ValueError, match=r"^--model.reward.rewards\[1\].max_length is 512"):
        composite.setup()


def test_classifier_reward_unknown_label_lists_the_labels(classifier_path):
    with pytest.raises(ValueError, match=r"^--model.reward.label 'toxic'.*\['nothate', 'hate'\]"):
        ClassifierReward(str(classifier_path), label="toxic", max_length=MAX_TOKENS).setup()
    # Case-insensitive when there is no exact match.
    assert ClassifierReward(str(classifier_path), label="NotHate", max_length=MAX_TOKENS).to("cpu").label_index == 0


def test_classifier_reward_prompt_and_response_text(classifier_path, hf_classifier):
    prompts = ["i hate you and your stupid ideas", "the meeting is moved"]
    responses = ["you are a wonderful friend", "i like you"]
    reward = ClassifierReward(str(classifier_path), text="prompt+response", max_length=MAX_TOKENS)
    joined = [p + "\n" + r for p, r in zip(prompts, responses)]
    assert_close(reward(prompts, responses), direct_logits(hf_classifier, joined)[:, 0], rtol=1e-5, atol=1e-5)
    response_only = ClassifierReward(str(classifier_path), max_length=MAX_TOKENS)(prompts, responses)
    assert not torch.allclose(reward(prompts, responses), response_only)


def test_classifier_reward_reads_the_whole_response_after_a_long_prompt(classifier_path, hf_classifier):
    """Cut on the right, prompt + newline + response of a long prompt is the prompt alone: every response scored
    the same. The prompt is cut from its start instead, the response read whole."""
    long_prompt = " ".join(SENTENCES * 5)  # ~100 tokens; the classifier reads 16
    kind, rude = "you are a wonderful friend", "i hate you and your stupid ideas"
    reward = ClassifierReward(str(classifier_path), text="prompt+response", max_length=MAX_TOKENS).to("cpu")
    read = []
    reward.model.register_forward_pre_hook(lambda _, args, kwargs: read.append(kwargs["input_ids"]), with_kwargs=True)
    scores = reward([long_prompt, long_prompt], [kind, rude])
    tokenizer, _ = hf_classifier
    texts = [tokenizer.convert_ids_to_tokens(ids) for ids in read[0]]
    # <s>, the prompt's last words, the response whole, </s>: 16 tokens
    assert [len(t) for t in texts] == [MAX_TOKENS, MAX_TOKENS]
    assert texts[0][-6:] == ["you", "are", "a", "wonderful", "friend", "</s>"]
    assert texts[1][-8:] == ["i", "hate", "you", "and", "your", "stupid", "ideas", "</s>"]
    assert texts[1][:8] == ["<s>", "person1", "asks", "person2", "about", "the", "weather", "today"]
    assert scores[0] != scores[1]
    kept = "person1 asks person2 about the weather today\n" + rude
    assert_close(scores[1:], direct_logits(hf_classifier, [kept])[:, 0], rtol=0, atol=1e-6)


def test_classifier_input_ids_keep_the_response_and_cut_the_prompt_from_its_start(classifier_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(classifier_path)  # <s> text </s>
    ids, cut = classifier_input_ids(tokenizer, "prompt+response", ["i like you and your ideas"],
                                    ["you are a wonderful friend"], max_length=9)
    assert tokenizer.convert_ids_to_tokens(ids[0]) == ["<s>", "your", "ideas", "you", "are", "a", "wonderful",
                                                       "friend", "</s>"]
    assert cut == [False]
    # a response longer than the limit alone: its start, no prompt, and flagged as cut
    ids, cut = classifier_input_ids(tokenizer, "prompt+response", ["i like you"], ["you are a wonderful friend"], 5)
    assert tokenizer.convert_ids_to_tokens(ids[0]) == ["<s>", "you", "are", "a", "</s>"] and cut == [True]
    ids, cut = classifier_input_ids(tokenizer, "response", ["i like you"], ["you are a wonderful friend"], None)
    assert tokenizer.convert_ids_to_tokens(ids[0]) == ["<s>", "you", "are", "a", "wonderful", "friend", "</s>"]


def llama_style_tokenizer():
    """The embedded T5 tokenizer's SentencePiece-style pieces (``▁`` starts a text) with <s> first, as Llama's."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lit_rlhf.models import resolve_model_path

    backend = Tokenizer.from_str(AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-t5")).backend_tokenizer
                                 .to_str())
    backend.add_special_tokens([AddedToken("<s>", special=True)])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tokenizer_of(kind: str, classifier_path: Path):
    from transformers import AutoTokenizer, ByT5Tokenizer

    from lit_rlhf.models import resolve_model_path

    if kind == "llama":
        return llama_style_tokenizer()
    if kind == "byt5":  # a slow (Python) tokenizer: no character offsets
        return ByT5Tokenizer()
    name = {"t5": "embedded:tiny-t5", "gpt2": "embedded:tiny-gpt2"}.get(kind)
    return AutoTokenizer.from_pretrained(classifier_path if name is None else resolve_model_path(name))


@pytest.mark.parametrize("kind", ["t5", "gpt2", "roberta", "llama", "byt5"])
def test_classifier_input_ids_are_the_joined_texts_tokens(classifier_path, kind):
    """A classifier reads prompt + newline + response as the one text it was trained on: a SentencePiece
    tokenizer gives the response after the newline other tokens than alone (the tiny T5: ``y ou``, not ``▁you``)."""
    tokenizer = tokenizer_of(kind, classifier_path)
    prompts = ["i like you and your ideas", "person1 asks person2 about the weather today"]
    responses = ["you are a wonderful friend", "i hate you and your stupid ideas"]
    full = [tokenizer(p + "\n" + r).input_ids for p, r in zip(prompts, responses)]
    ids, cut = classifier_input_ids(tokenizer, "prompt+response", prompts, responses, None)
    assert ids == full and cut == [False, False]
    # two tokens fewer: the prompt's first two go, the joined text's response tokens stay as they are
    n = len(special_tokens_around(tokenizer)[0])
    for row in range(2):
        ids, cut = classifier_input_ids(tokenizer, "prompt+response", prompts[row:row + 1], responses[row:row + 1],
                                        len(full[row]) - 2)
        assert ids == [full[row][:n] + full[row][n + 2:]] and cut == [False]


def test_a_decoded_query_that_starts_with_bos_gets_one_bos(tmp_path):
    """A Llama-style tokenizer puts <s> first; a rollout's query decoded with its special tokens already has it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<s>", "</s>", "<unk>", "hello", "there", "kind", "reply"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    query = tokenizer.decode(tokenizer("hello there").input_ids)
    assert query.startswith("<s>")
    ids = classifier_input_ids(tokenizer, "prompt+response", [query], ["kind reply"], None).input_ids[0]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "hello", "there", "kind", "reply"]


def test_classifier_reward_arguments_are_checked():
    with pytest.raises(ValueError, match=r"^--model.reward.output must be one of \['logit', 'probability'\]"):
        ClassifierReward(output="softmax")
    with pytest.raises(ValueError, match="^--model.reward.batch_size must be at least 1"):
        ClassifierReward(batch_size=0)


# --- with other rewards --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profanity() -> ProfanityReward:
    return ProfanityReward().to("cpu")


def test_composite_reward_is_the_weighted_sum(classifier_path, profanity):
    classifier = ClassifierReward(str(classifier_path), max_length=MAX_TOKENS)
    similarity = ReferenceSimilarityReward()
    composite = CompositeReward([classifier, profanity, similarity], weights=[1.0, 0.5, 2.0])
    prompts, responses = ["", ""], ["i like you", "you stupid idiot"]
    references = ["i like you a lot", "the meeting is at noon"]
    expected = (
        classifier(prompts, responses)
        + 0.5 * profanity(prompts, responses)
        + 2.0 * similarity(prompts, responses, references=references)
    )
    assert_close(composite(prompts, responses, references=references), expected)
    assert list(composite.last_components) == ["classifier_nothate", "profanity", "rouge1_fmeasure"]
    assert_close(composite.last_components["profanity"], profanity(prompts, responses))
    assert composite.uses_model("alt-profanity-check") and not composite.uses_model("gpt2")
    assert "0.5 × [logit of 'not offensive'" in composite.describe()


def test_empty_batches_give_empty_scores(classifier_path, profanity):
    for reward in (ClassifierReward(str(classifier_path), max_length=MAX_TOKENS), profanity):
        scores = reward([], [])
        assert scores.shape == (0,) and scores.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rewards_move_to_the_module_device(classifier_path, profanity):
    classifier = ClassifierReward(str(classifier_path), max_length=MAX_TOKENS)
    cpu_scores = classifier(["", ""], SENTENCES[:2])
    composite = CompositeReward([classifier, profanity]).to("cuda")
    assert next(classifier.model.parameters()).device.type == "cuda"
    assert composite(["", ""], SENTENCES[:2]).device.type == "cuda"
    assert_close(classifier(["", ""], SENTENCES[:2]).cpu(), cpu_scores, rtol=1e-4, atol=1e-4)
    # A classifier pinned to the CPU still answers on the module's device.
    pinned = ClassifierReward(str(classifier_path), max_length=MAX_TOKENS, device="cpu").to("cuda")
    assert next(pinned.model.parameters()).device.type == "cpu"
    assert pinned(["", ""], SENTENCES[:2]).device.type == "cuda"
    profanity.to("cpu")  # the module-scoped fixture is shared


def test_rewards_are_built_from_lightning_cli_style_config(classifier_path):
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward)
    config = parser.parse_object(
        {
            "reward": {
                "class_path": "lit_rlhf.rewards.CompositeReward",
                "init_args": {
                    "rewards": [
                        {
                            "class_path": "lit_rlhf.rewards.ClassifierReward",
                            "init_args": {"model_name": str(classifier_path), "max_length": MAX_TOKENS},
                        },
                        {"class_path": "lit_rlhf.rewards.ReferenceSimilarityReward"},
                    ],
                    "weights": [1.0, 0.5],
                },
            }
        }
    )
    # `instantiate` replaced `instantiate_classes` in jsonargparse 4.49.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    reward = instantiate(config).reward
    assert isinstance(reward, CompositeReward) and isinstance(reward.rewards[0], ClassifierReward)
    assert reward.weights == [1.0, 0.5] and reward.rewards[0].max_length == MAX_TOKENS
    with pytest.raises(ArgumentError, match="output"):  # Literal choices are enforced by the parser
        parser.parse_object(
            {"reward": {"class_path": "lit_rlhf.rewards.ClassifierReward", "init_args": {"output": "softmax"}}}
        )
