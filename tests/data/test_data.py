"""DialogSumDataModule: the bundled data in the hub schema, the recipe's filter/prompt/split, padded batches."""

import json
import shutil
import types
from math import ceil
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from lit_rlhf.cli import config_path
from lit_rlhf.data import DEFAULT_PROMPT_TEMPLATE, DialogSumDataModule, load_bundled_dialogsum
from lit_rlhf.data.sources import load_local_directory
from lit_rlhf.models import resolve_model_path
from conftest import write_jsonl
from dialogsum_rows import hub_like_rows, raw_rows, ready, write_dialogs


@pytest.fixture
def local_dir(tmp_path, datasets_cache) -> Path:
    return write_dialogs(tmp_path / "dialogs")


@pytest.fixture(scope="module")
def bundled() -> datasets.DatasetDict:
    return load_bundled_dialogsum()


@pytest.fixture(scope="module")
def recipe() -> DialogSumDataModule:
    """The default data module: bundled DialogSum, embedded tiny T5 tokenizer, the recipe's settings."""
    dm = DialogSumDataModule()
    dm.prepare_data()
    dm.setup("fit")
    return dm


# -- the bundled copy ---------------------------------------------------------------------------------------


def test_bundled_has_the_hub_schema_and_sizes(bundled):
    assert {split: len(ds) for split, ds in bundled.items()} == {"train": 12460, "validation": 500, "test": 1500}
    for ds in bundled.values():
        assert ds.column_names == ["id", "dialogue", "summary", "topic"]
    assert bundled["train"][0]["id"] == "train_0"
    assert list(bundled["validation"]["id"]) == [r["fname"] for r in raw_rows("dev")]
    assert bundled["train"][12459]["summary"] == raw_rows("train")[12459]["summary"]


def test_bundled_test_has_each_dialogue_once_per_reference(bundled):
    test = bundled["test"]
    raw = raw_rows("test")
    assert list(test["id"])[:4] == ["test_0_1", "test_0_2", "test_0_3", "test_1_1"]
    assert list(test["id"]) == [f"{r['fname']}_{k}" for r in raw for k in (1, 2, 3)]
    for n, row in enumerate(raw):
        for k in (1, 2, 3):
            expanded = test[3 * n + k - 1]
            assert expanded["dialogue"] == row["dialogue"]
            assert (expanded["summary"], expanded["topic"]) == (row[f"summary{k}"], row[f"topic{k}"])


# -- the recipe ---------------------------------------------------------------------------------------------


def test_recipe_filter_and_split_sizes(recipe):
    raw = raw_rows("train")
    kept_ids = [r["fname"] for r in raw if 200 < len(r["dialogue"]) <= 1000]
    n_test = ceil(0.2 * len(kept_ids))  # datasets' train_test_split rounds the test part up
    n_train = len(kept_ids) - n_test
    assert recipe.summary() == {"source": 12460, "kept": len(kept_ids), "train": n_train, "test": n_test,
                            "prompts_cut": 0, "prompts_dropped": 0}
    assert (n_train, n_test) == (8017, 2005)
    # shuffle_split=False: the train part is the first 80% of the kept rows, in file order.
    assert list(recipe.train_set["id"]) == kept_ids[:n_train]
    assert list(recipe.test_set["id"]) == kept_ids[n_train:]


def test_recipe_prompt_and_query(recipe):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-t5"))
    for row in recipe.train_set.select(range(3)):
        assert row["prompt"] == DEFAULT_PROMPT_TEMPLATE.replace("{dialogue}", row["dialogue"])
        assert row["prompt"].startswith("\nSummarize the following conversation.\n\n#Person1#")
        assert row["input_ids"] == tokenizer(row["prompt"]).input_ids
        # As in the recipe, the query is the decoded ids, T5's closing </s> included.
        assert row["query"] == tokenizer.decode(row["input_ids"])
        assert row["query"].endswith("Summary:\n</s>")


def _check_padding(batch: dict, rows: datasets.Dataset, pad_id: int, side: str, tokenizer) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    lengths = mask.sum(dim=1)
    assert lengths.tolist() == [len(r["input_ids"]) for r in rows]
    assert lengths.min() < ids.shape[1]  # rows of different lengths: something was padded
    positions = torch.arange(ids.shape[1])
    if side == "right":
        expected_mask = positions[None, :] < lengths[:, None]
    else:
        expected_mask = positions[None, :] >= ids.shape[1] - lengths[:, None]
    assert torch.equal(mask.bool(), expected_mask)
    assert bool((ids[~mask.bool()] == pad_id).all())
    for i, row in enumerate(rows):
        assert ids[i][mask[i].bool()].tolist() == row["input_ids"]
        assert tokenizer.decode(ids[i][mask[i].bool()]) == batch["query"][i] == row["query"]
        assert batch["reference"][i] == row["summary"]
        assert (batch["id"][i], batch["prompt"][i]) == (row["id"], row["prompt"])


def test_t5_batches_are_right_padded(recipe):
    batch = next(iter(recipe.val_dataloader()))
    assert batch["input_ids"].shape[0] == 16
    _check_padding(batch, recipe.test_set.select(range(16)), 0, "right", recipe.tokenizer)


def test_gpt2_batches_are_left_padded(local_dir):
    dm = ready(model_name="embedded:tiny-gpt2", dataset=str(local_dir), eval_batch_size=5)
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id
    batch = next(iter(dm.val_dataloader()))
    _check_padding(batch, dm.test_set.select(range(5)), dm.tokenizer.pad_token_id, "left", dm.tokenizer)


def test_padding_side_follows_the_model_not_the_tokenizer(local_dir, tmp_path):
    # A decoder-only model whose saved tokenizer says "right" still gets left-padded batches.
    folder = tmp_path / "gpt2-right"
    shutil.copytree(resolve_model_path("embedded:tiny-gpt2"), folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "padding_side": "right"}))
    dm = ready(model_name=str(folder), dataset=str(local_dir), eval_batch_size=5)
    assert dm.tokenizer.padding_side == "right"
    batch = next(iter(dm.val_dataloader()))
    _check_padding(batch, dm.test_set.select(range(5)), dm.tokenizer.pad_token_id, "left", dm.tokenizer)


def test_train_batches_are_full_and_shuffled_by_seed(local_dir):
    dm = ready(dataset=str(local_dir), min_chars=0, max_chars=10_000, batch_size=6)
    n_train = dm.summary()["train"]
    assert n_train == 32 and n_train % 6 != 0
    batches = list(dm.train_dataloader())
    assert len(batches) == n_train // 6  # drop_last: the incomplete batch is dropped
    assert all(b["input_ids"].shape[0] == 6 and len(b["query"]) == 6 for b in batches)
    order = [i for b in batches for i in b["id"]]
    assert len(set(order)) == len(order) and set(order) <= set(dm.train_set["id"])
    assert order != dm.train_set["id"][: len(order)]
    assert order == [i for b in dm.train_dataloader() for i in b["id"]]  # same seed, same order
    other = DialogSumDataModule(dataset=str(local_dir), min_chars=0, max_chars=10_000, batch_size=6, seed=1)
    other.setup()
    assert order != [i for b in other.train_dataloader() for i in b["id"]]


def test_held_out_loaders_are_in_order_and_keep_the_last_batch(local_dir):
    dm = ready(dataset=str(local_dir), min_chars=0, max_chars=10_000, eval_batch_size=3)
    assert dm.summary()["test"] == 8
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        assert [len(b["id"]) for b in batches] == [3, 3, 2]
        assert [i for b in batches for i in b["id"]] == list(dm.test_set["id"])


def test_max_prompt_tokens_truncates(local_dir):
    dm = ready(dataset=str(local_dir), min_chars=0, max_chars=10_000, max_prompt_tokens=32)
    lengths = [len(ids) for ids in dm.train_set["input_ids"]]
    assert max(lengths) == 32
    assert all(row["input_ids"][-1] == 1 for row in dm.train_set)  # T5's </s> survives truncation


def test_the_shipped_defaults_prompts_all_end_with_the_instruction():
    """The default recipe (its config's model and 256-token limit): prompts over the limit lose the end of their
    dialogue, never "Summary:" and T5's </s>; the set of prompts is the same as with whole prompts."""
    config = yaml.safe_load(Path(config_path()).read_text())
    settings = {k: v for k, v in config["data"].items() if k in ("dataset", "max_prompt_tokens")}
    assert settings["max_prompt_tokens"] == 256
    dm = DialogSumDataModule(model_name=config["model"]["model_name"], **settings)
    dm.prepare_data()
    dm.setup("fit")
    eos = dm.tokenizer.eos_token_id
    for part in (dm.train_set, dm.test_set):
        assert max(len(ids) for ids in part["input_ids"]) <= 256
        assert all(ids[-1] == eos for ids in part["input_ids"])
        assert all(query.endswith("\n\nSummary:\n</s>") for query in part["query"])
    cut = [row for part in (dm.train_set, dm.test_set) for row in part if row["prompt_fit"] == "cut"]
    assert dm.summary()["prompts_cut"] == len(cut) > 0 and dm.summary()["prompts_dropped"] == 0
    # cut at the dialogue's end: a cut query is the start of its whole prompt (up to the tokens at the cut)
    for row in cut[:50]:
        whole = dm.tokenizer.decode(dm.tokenizer(row["prompt"]).input_ids)
        body = row["query"].removesuffix("\n\nSummary:\n</s>")
        assert len(body) > 200 and whole.startswith(body[:-20])


def test_custom_template_and_shuffled_split(local_dir):
    dm = ready(
        dataset=str(local_dir), min_chars=0, max_chars=10_000, prompt_template="Dialogue: {dialogue} TL;DR:",
        shuffle_split=True, split_seed=7,
    )
    row = dm.train_set[0]
    assert row["prompt"] == f"Dialogue: {row['dialogue']} TL;DR:"
    assert list(dm.train_set["id"]) != [r["id"] for r in hub_like_rows(32)]
    all_ids = list(dm.train_set["id"]) + list(dm.test_set["id"])
    assert sorted(all_ids) == sorted(r["id"] for r in hub_like_rows(40))


# -- sources ------------------------------------------------------------------------------------------------


def test_local_parquet_directory_and_dev_split_name(tmp_path, datasets_cache):
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_list(hub_like_rows(20)).to_parquet(str(folder / "train-00000.parquet"))
    datasets.Dataset.from_list(hub_like_rows(10, start=50)).to_parquet(str(folder / "dev.parquet"))
    dm = ready(dataset=str(folder), split="validation", min_chars=0, max_chars=10_000, batch_size=2)
    assert dm.summary() == {"source": 10, "kept": 10, "train": 8, "test": 2,
                            "prompts_cut": 0, "prompts_dropped": 0}
    assert list(dm.train_set["id"]) == [r["id"] for r in hub_like_rows(8, start=50)]


def test_hub_names_go_to_load_dataset(monkeypatch, local_dir):
    seen = []
    local = load_local_directory(str(local_dir))

    def fake_load_dataset(name, *args, **kwargs):
        seen.append(name)
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)  # data.py imports it where used
    dm = DialogSumDataModule(dataset="knkarthick/dialogsum")
    dm.setup()
    assert seen == ["knkarthick/dialogsum"]
    assert dm.summary()["source"] == 40


def test_stream_position_is_the_data_modules_own_state():
    # the position counts batches handed to training_step and comes back through state_dict, so a resumed
    # run starts at the next unused batch without reading anything from the module
    data = DialogSumDataModule(batch_size=4)
    data.prepare_data()
    data.setup("fit")
    fresh = [b["id"] for _, b in zip(range(4), data.train_dataloader())]
    data.trainer = types.SimpleNamespace(training=True, world_size=1, global_rank=0)
    for _ in range(3):
        data.on_after_batch_transfer({}, 0)
    data.trainer = types.SimpleNamespace(training=False, world_size=1, global_rank=0)
    data.on_after_batch_transfer({}, 0)  # a validation batch does not move the training stream
    assert data.state_dict() == {"consumed_batches": 3}
    resumed = DialogSumDataModule(batch_size=4)
    resumed.prepare_data()
    resumed.setup("fit")
    resumed.load_state_dict(data.state_dict())
    assert next(iter(resumed.train_dataloader()))["id"] == fresh[3]


# -- output -------------------------------------------------------------------------------------------------


def test_setup_prints_no_map_or_filter_progress_bar_and_keeps_the_users_setting(local_dir, tmp_path, capfd,
                                                                                  monkeypatch):
    import importlib

    # datasets' own default: bars on, no environment override
    for module in (datasets.config, importlib.import_module("datasets.utils.tqdm")):
        monkeypatch.setattr(module, "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    datasets.utils.enable_progress_bars()
    predict_file = tmp_path / "dialogues.jsonl"
    write_jsonl(predict_file, [{"dialogue": r["dialogue"]} for r in hub_like_rows(3)])
    capfd.readouterr()
    dm = DialogSumDataModule(dataset=str(local_dir), min_chars=0, max_chars=10_000, with_labels=True,
                             predict_path=str(predict_file))
    dm.setup("fit")
    dm.setup("predict")
    quiet = capfd.readouterr()
    assert len(dm.train_set) > 0 and len(dm.predict_set) == 3
    assert not any(bar in quiet.err + quiet.out for bar in ("Map", "Filter")), quiet.err
    # the user's setting is back: a map of their own still shows its bar (and capfd sees bars)
    assert not datasets.utils.are_progress_bars_disabled()
    datasets.Dataset.from_dict({"x": [1, 2]}).map(lambda row: row)
    assert "Map" in capfd.readouterr().err


def test_predict_prompts_are_cut_in_their_dialogue_or_dropped(tmp_path, datasets_cache):
    long = "\n".join(f"#Person{1 + k % 2}#: sentence number {k} of a long talk." for k in range(40))
    predict_file = write_jsonl(tmp_path / "dialogues.jsonl", [{"dialogue": long}, {"dialogue": "#Person1#: Hi."}])
    dm = DialogSumDataModule(predict_path=str(predict_file), max_prompt_tokens=64)
    dm.setup("predict")
    assert len(dm.predict_set) == 2 and dm.predict_set["prompt_fit"] == ["cut", "whole"]
    assert all(len(ids) <= 64 and q.endswith("\n\nSummary:\n</s>") for ids, q in
               zip(dm.predict_set["input_ids"], dm.predict_set["query"]))
    dropped = DialogSumDataModule(predict_path=str(predict_file), max_prompt_tokens=64, truncation="drop")
    dropped.setup("predict")
    assert dropped.predict_set["dialogue"] == ["#Person1#: Hi."] and dropped.prompt_counts["prompts_dropped"] == 1
