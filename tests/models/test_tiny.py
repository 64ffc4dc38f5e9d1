"""The embedded tiny models load and run exactly like hub models, offline and deterministically."""

import gzip
import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lit_rlhf.models.tiny import (
    EMBEDDED,
    MARKER_FILE,
    SPEAKER_TAGS,
    build_atomically,
    build_tiny_t5,
    build_tokenizer,
    resolve_model_path,
)

# the tiny test models (EMBEDDED also holds the untrained summarizer, checked in test_sft.py)
LOADERS = {"embedded:tiny-t5": AutoModelForSeq2SeqLM, "embedded:tiny-gpt2": AutoModelForCausalLM}
TINY = sorted(LOADERS)  # the tiny test models (the summarizer's untrained start is tested in test_sft.py)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lit_rlhf_cache"))


@pytest.fixture(scope="module")
def built(cache_dir) -> dict[str, str]:
    return {name: resolve_model_path(name, cache_dir=cache_dir) for name in TINY}


def _dialogsum_rows(split: str, n: int) -> list[dict]:
    source = resources.files("lit_rlhf.assets.dialogsum").joinpath(f"dialogsum.{split}.jsonl.gz")
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for _, line in zip(range(n), lines)]


@pytest.mark.parametrize("name", TINY)
def test_loads_like_a_hub_model_and_is_small(built, name):
    path = built[name]
    assert (Path(path) / MARKER_FILE).is_file()
    model = LOADERS[name].from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert AutoConfig.from_pretrained(path).is_encoder_decoder == (name == "embedded:tiny-t5")
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 1_000_000  # a few MB in fp32
    assert len(tokenizer) == model.config.vocab_size == 2000


@pytest.mark.parametrize("name", TINY)
def test_speaker_tags_are_single_tokens_that_decode(built, name):
    tokenizer = AutoTokenizer.from_pretrained(built[name])
    for tag in SPEAKER_TAGS:
        ids = tokenizer(tag, add_special_tokens=False).input_ids
        assert len(ids) == 1, tag
        assert tokenizer.decode(ids, skip_special_tokens=True) == tag
    text = "#Person1#: Hi, I ' m Tom.\n#Person2#: Nice to meet you, #Person1#."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids).count("#Person1#") == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", TINY)
def test_dialogsum_text_round_trips(built, name):
    tokenizer = AutoTokenizer.from_pretrained(built[name])
    # Validation and test text was not seen in training; the café line has characters outside the
    # training alphabet (T5's byte fallback spells them in bytes).
    texts = [row[key] for row in _dialogsum_rows("dev", 50) for key in ("dialogue", "summary")]
    texts.append("#Person1#: Un café, 你好 ☃!")
    for text in texts:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_t5_special_ids_and_eos_appended(built):
    path = built["embedded:tiny-t5"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 0)
    assert tokenizer("Hello there.").input_ids[-1] == 1
    assert tokenizer.padding_side == "right"


def test_gpt2_pads_left_with_eos(built):
    path = built["embedded:tiny-gpt2"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.padding_side == "left"
    assert config.n_positions == 1024
    # GPT-2 adds no eos of its own.
    assert tokenizer.eos_token_id not in tokenizer("Hello there.").input_ids


@pytest.mark.parametrize("name", TINY)
def test_generate_on_a_dialogsum_prompt(built, name):
    path = built[name]
    model = LOADERS[name].from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dialogues = [row["dialogue"] for row in _dialogsum_rows("train", 2)]
    prompts = [f"\nSummarize the following conversation.\n\n{d}\n\nSummary:\n" for d in dialogues]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0)
    assert out.shape[0] == 2
    new_tokens = out.shape[1] if model.config.is_encoder_decoder else out.shape[1] - batch.input_ids.shape[1]
    assert 1 <= new_tokens <= 9  # seq2seq output starts with the decoder start token
    assert all(isinstance(text, str) for text in tokenizer.batch_decode(out, skip_special_tokens=True))


def test_builds_are_deterministic(built, tmp_path):
    again = build_tiny_t5(str(tmp_path / "t5"))
    first = AutoModelForSeq2SeqLM.from_pretrained(built["embedded:tiny-t5"]).state_dict()
    second = AutoModelForSeq2SeqLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert (
        AutoTokenizer.from_pretrained(again).get_vocab()
        == AutoTokenizer.from_pretrained(built["embedded:tiny-t5"]).get_vocab()
    )
    assert build_tokenizer(kind="gpt2").get_vocab() == AutoTokenizer.from_pretrained(
        built["embedded:tiny-gpt2"]
    ).get_vocab()


def test_build_does_not_touch_the_callers_random_stream(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_t5(str(tmp_path / "t5"), vocab_size=500, d_model=16, d_ff=32, num_layers=1, d_kv=4)
    torch.testing.assert_close(torch.rand(3), expected)


def test_resolve_reuses_a_finished_build(built, cache_dir):
    path = built["embedded:tiny-t5"]
    mtime = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("embedded:tiny-t5", cache_dir=cache_dir) == path
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == mtime
    assert "-v" in Path(path).name  # the build version is part of the folder name


def test_resolve_passes_other_names_through(tmp_path):
    assert resolve_model_path("google/flan-t5-base", cache_dir=str(tmp_path)) == "google/flan-t5-base"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    # a local path that does not exist fails at once, instead of being tried as a hub id over the network
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path("./no/such/folder")
    assert not list(tmp_path.iterdir())


def test_resolve_rejects_an_unknown_embedded_name(tmp_path):
    with pytest.raises(ValueError, match="embedded:tiny-t5"):
        resolve_model_path("embedded:tiny-llama", cache_dir=str(tmp_path))


def test_resolve_uses_the_cache_env(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(EMBEDDED, "embedded:tiny-t5", lambda path: calls.append(path) or path)
    monkeypatch.setenv("LIT_RLHF_CACHE", str(tmp_path))
    path = resolve_model_path("embedded:tiny-t5")
    assert calls == [path] and Path(path).parent == tmp_path


def test_concurrent_build_keeps_the_first_finished_copy(tmp_path):
    target = tmp_path / "model"
    build = {"builder": "test", "version": "1"}

    def winner(folder: str) -> None:
        Path(folder, "weights.txt").write_text("winner")

    def loser(folder: str) -> None:
        Path(folder, "weights.txt").write_text("loser")
        # Another process (e.g. another DDP rank) publishes the same build while this one is writing.
        build_atomically(str(target), build, winner)

    assert build_atomically(str(target), build, loser) == str(target)
    assert (target / "weights.txt").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the loser's temporary copy is gone


def test_half_written_or_different_builds_are_not_reused(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=MARKER_FILE):
        build_atomically(str(half), {"builder": "test"}, lambda folder: None)

    done = tmp_path / "done"
    build_atomically(str(done), {"builder": "test", "seed": 0}, lambda folder: None)
    with pytest.raises(FileExistsError, match="another build"):
        build_atomically(str(done), {"builder": "test", "seed": 1}, lambda folder: None)


def test_failed_build_leaves_nothing_behind(tmp_path):
    def crash(folder: str) -> None:
        Path(folder, "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        build_atomically(str(tmp_path / "model"), {"builder": "test"}, crash)
    assert not list(tmp_path.iterdir())


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=100)
