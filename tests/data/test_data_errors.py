"""DialogSumDataModule's errors: each names the setting (or the file, the column, the tokenizer) that is wrong."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.models import resolve_model_path
from conftest import write_jsonl
from dialogsum_rows import hub_like_rows, ready, write_dialogs


@pytest.fixture
def local_dir(tmp_path, datasets_cache) -> Path:
    return write_dialogs(tmp_path / "dialogs")


def test_missing_column_is_named(tmp_path, datasets_cache):
    folder = tmp_path / "no_summary"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"id": r["id"], "dialogue": r["dialogue"]} for r in hub_like_rows(5)])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['summary'\].*it has \['id', 'dialogue'\]"):
        DialogSumDataModule(dataset=str(folder)).setup()


def test_filter_that_keeps_nothing_reports_the_lengths(local_dir):
    lengths = [len(r["dialogue"]) for r in hub_like_rows(40)]
    dm = DialogSumDataModule(dataset=str(local_dir), min_chars=50_000, max_chars=60_000)
    expected = f"data.min_chars=50000, data.max_chars=60000.*from {min(lengths)} to {max(lengths)}"
    with pytest.raises(ValueError, match=expected):
        dm.setup()


def test_template_without_dialogue_is_rejected():
    with pytest.raises(ValueError, match="prompt_template"):
        DialogSumDataModule(prompt_template="Summarize this:")


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"min_chars": 500, "max_chars": 500}, "min_chars"),
        ({"test_size": 1.0}, "test_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        DialogSumDataModule(**kwargs)


def test_unknown_dataset_path_and_split(tmp_path, local_dir):
    with pytest.raises(ValueError, match="dataset=.*is not a directory"):
        DialogSumDataModule(dataset=str(tmp_path / "missing")).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="dataset=.*has no data files"):
        DialogSumDataModule(dataset=str(empty)).setup()
    with pytest.raises(ValueError, match=r"split='test' is not in .*\['train', 'validation'\]"):
        DialogSumDataModule(dataset=str(local_dir), split="test").setup()


def test_an_empty_training_file_is_one_line_naming_the_setting_and_the_file(tmp_path, datasets_cache):
    folder = tmp_path / "dialogs"
    folder.mkdir()
    (folder / "train.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^data\.dataset='.*dialogs': .*/dialogs/train\.jsonl is empty") as info:
        DialogSumDataModule(dataset=str(folder)).setup()
    assert "\n" not in str(info.value)


def test_too_few_rows_for_the_split_or_the_batch(local_dir):
    with pytest.raises(ValueError, match="test_size"):
        DialogSumDataModule(dataset=str(local_dir), split="validation", min_chars=0, max_chars=10_000,
                            test_size=0.9).setup()
    dm = ready(dataset=str(local_dir), min_chars=0, max_chars=10_000, batch_size=64)
    with pytest.raises(ValueError, match="batch_size=64"):
        dm.train_dataloader()


def _tokenizer_copy(tmp_path: Path, drop: tuple[str, ...]) -> Path:
    """The tiny GPT-2's config and tokenizer, saved without the given special tokens."""
    folder = tmp_path / f"gpt2-without-{'-'.join(drop)}"
    folder.mkdir()
    source = Path(resolve_model_path("embedded:tiny-gpt2"))
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, folder / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))
    return folder


def test_causal_tokenizer_without_pad_uses_eos_and_says_so(tmp_path, local_dir, caplog):
    folder = _tokenizer_copy(tmp_path, drop=("pad_token",))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(caplog.handler)  # Lightning's logger does not propagate to the root logger
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            dm = ready(model_name=str(folder), dataset=str(local_dir))
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert dm.tokenizer.pad_token == dm.tokenizer.eos_token == "<|endoftext|>"
    assert "no pad token: using its eos token" in caplog.text


def test_tokenizer_without_pad_or_eos_is_rejected(tmp_path, local_dir):
    folder = _tokenizer_copy(tmp_path, drop=("pad_token", "eos_token", "bos_token", "unk_token"))
    with pytest.raises(ValueError, match="model_name=.*neither a pad nor an eos token"):
        DialogSumDataModule(model_name=str(folder), dataset=str(local_dir)).setup()
