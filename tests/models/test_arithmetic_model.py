"""The embedded arithmetic model: its character tokenizer, its untrained shape, and the shipped trained model."""

import torch
import transformers

from lit_rlhf.models import resolve_model_path
from lit_rlhf.models.arithmetic import ARITHMETIC_CHARACTERS, build_arithmetic_tokenizer


def test_tokenizer_one_token_per_character_round_trip():
    tokenizer = build_arithmetic_tokenizer()
    assert len(tokenizer) == 1 + len(ARITHMETIC_CHARACTERS) and tokenizer.eos_token_id == 0
    ids = tokenizer("12+345=")["input_ids"]
    assert len(ids) == 7 and tokenizer.decode(ids) == "12+345="
    assert tokenizer.decode(tokenizer("357")["input_ids"] + [0], skip_special_tokens=True) == "357"
    batch = tokenizer(["1+1=", "12+345="], padding=True)  # left padding with eos, as a decoder-only model needs
    assert batch["input_ids"][0][:3] == [0, 0, 0] and batch["attention_mask"][0][:3] == [0, 0, 0]


def test_untrained_shape_builds(tmp_path):
    path = resolve_model_path("embedded:arithmetic-untrained", str(tmp_path))
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.model_type, config.n_layer, config.n_embd, config.vocab_size) == ("gpt2", 3, 128, 15)


def test_shipped_model_answers_in_greedy_decoding():
    # the shipped model is trained but stopped early (PROVENANCE.md: 30.2% of the 500 test problems): numbers
    # then end-of-sequence, right on some of the first 100 test problems and wrong on many
    from lit_rlhf.data.arithmetic import arithmetic_splits

    path = resolve_model_path("embedded:arithmetic")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    rows = arithmetic_splits()["test"][:100]
    batch = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(a.isdigit() for a in answers), answers  # a number, then end-of-sequence
    right = sum(a == r["answer"] for a, r in zip(answers, rows))
    assert 15 <= right <= 50, right  # an untrained model gets ~0, a fully trained one most
