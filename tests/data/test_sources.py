"""Null and empty rows: one policy for prompt data, SFT rows, preference pairs and predict rows (skipped, counted,
the first one's id in the warning and in ``summary()``); a column a reward reads must have a value in every row."""

import pytest

from lit_rlhf.data import PairColumns, PreferenceDataModule, pair_texts
from lit_rlhf.data import PromptDataModule
from lit_rlhf.data import is_blank
from conftest import write_jsonl

# small files are converted into each test's folder, not the user's datasets cache
pytestmark = pytest.mark.usefixtures("datasets_cache")


def rows_with_holes(n: int, column: str, holes: dict[str, object]) -> list[dict]:
    """``n`` good rows (ids g0...), then one row per hole: its id and the value of ``column`` there."""
    good = [{"id": f"g{i}", "prompt": f"tell me about item {i}", "answer": f"item {i}"} for i in range(n)]
    holes = [{"id": id_, "prompt": "tell me more", "answer": "more", column: value} for id_, value in holes.items()]
    return good + holes


def ready(module: type = PromptDataModule, **kwargs):
    dm = module(**{"batch_size": 2, "eval_batch_size": 2, "test_size": 0.2, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_blank_values():
    assert is_blank(None) and is_blank("") and is_blank(" \n") and is_blank([])
    assert is_blank([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}])
    assert is_blank([{"role": "user", "content": None}, {"role": "assistant", "content": "a"}])
    assert not is_blank("0") and not is_blank(0) and not is_blank([{"role": "user", "content": "hi"}])


def test_null_and_empty_prompts_are_skipped_counted_and_named(tmp_path):
    """A null prompt trained as the text "None", an empty one was a prompt: both are skipped now."""
    source = write_jsonl(tmp_path / "p.jsonl", rows_with_holes(10, "prompt", {"n1": None, "n2": "", "n3": "  "}))
    with pytest.warns(UserWarning, match=r"skipped 3 rows with a null or empty 'prompt' \(the first: row 'n1'\)"):
        dm = ready(dataset=str(source))
    summary = dm.summary()
    assert (summary["source"], summary["kept"], summary["skipped_empty"], summary["first_skipped_empty"]) == (
        13, 10, 3, "n1")
    prompts = list(dm.train_set["prompt"]) + list(dm.test_set["prompt"])
    assert len(prompts) == 10 and "None" not in prompts and all(p.strip() for p in prompts)


def test_sft_completions_follow_the_same_rule(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", rows_with_holes(10, "answer", {"x": None, "y": ""}))
    with pytest.warns(UserWarning, match="'answer'.*first: row 'x'"):
        dm = ready(dataset=str(source), with_labels=True, completion_column="answer")
    assert dm.summary()["skipped_empty"] == 2 and dm.summary()["first_skipped_empty"] == "x"
    assert not {"x", "y"} & {*dm.train_set["id"], *dm.test_set["id"]}


def test_an_empty_template_field_is_a_prompt_a_null_one_is_skipped(tmp_path):
    """Alpaca-style rows: ``input`` empty in half of them is no reason to skip any; a null field would render as
    "None" (skipped), and a prompt that renders blank is skipped. Before, every empty field skipped its row."""
    rows = [{"id": f"r{i}", "instruction": f"name item {i}", "input": "" if i % 2 else f"item {i}"} for i in range(20)]
    rows += [{"id": "null", "instruction": "name it", "input": None}]
    template = "Instruction: {instruction}\nInput: {input}\nAnswer:"
    with pytest.warns(UserWarning, match=r"skipped 1 rows with a null 'instruction' or 'input' or a blank prompt "
                                         r"\(the first: row 'null'\)"):
        dm = ready(dataset=str(write_jsonl(tmp_path / "alpaca.jsonl", rows)), template=template)
    summary = dm.summary()
    assert (summary["kept"], summary["skipped_empty"], summary["first_skipped_empty"]) == (20, 1, "null")
    prompts = [*dm.train_set["prompt"], *dm.test_set["prompt"]]
    assert sum(p.endswith("Input: \nAnswer:") for p in prompts) == 10 and not any("None" in p for p in prompts)
    # only a template of fields alone can render blank: then the row has no prompt
    rows = [{"id": f"g{i}", "a": f"item {i}", "b": ""} for i in range(10)] + [{"id": "blank", "a": " ", "b": ""}]
    with pytest.warns(UserWarning, match="row 'blank'"):
        dm = ready(dataset=str(write_jsonl(tmp_path / "fields.jsonl", rows)), template="{a}{b}")
    assert (dm.summary()["kept"], dm.summary()["first_skipped_empty"]) == (10, "blank")


def test_pairs_and_predict_rows_follow_the_same_rule(tmp_path):
    pairs = [{"id": f"g{i}", "prompt": f"about {i}", "chosen": f"{i} is good", "rejected": f"{i} is bad"}
             for i in range(10)]
    pairs += [{"id": "np", "prompt": None, "chosen": "a", "rejected": "b"},
              {"id": "er", "prompt": "p", "chosen": "a", "rejected": ""}]
    with pytest.warns(UserWarning, match="first: row 'np'"):
        dm = ready(PreferenceDataModule, dataset=str(write_jsonl(tmp_path / "pairs.jsonl", pairs)))
    assert dm.summary()["skipped_empty"] == 2 and dm.summary()["first_skipped_empty"] == "np"
    # predict rows: a null response is skipped (and named), not scored as ""
    rows = [{"id": "a", "prompt": "p", "response": "r"}, {"id": "b", "prompt": "p", "response": None}]
    dm = PreferenceDataModule(predict_path=str(write_jsonl(tmp_path / "score.jsonl", rows)))
    with pytest.warns(UserWarning, match=r"data.predict_path.*skipped 1 rows .* 'response'.*row 'b'"):
        dm.setup("predict")
    assert list(dm.predict_set["id"]) == ["a"]
    # prompts to answer: the same
    rows = [{"prompt": None}, {"prompt": "hello"}]
    dm = PromptDataModule(predict_path=str(write_jsonl(tmp_path / "ask.jsonl", rows)))
    with pytest.warns(UserWarning, match=r"'prompt' \(the first: row '0'\)"):
        dm.setup("predict")
    assert list(dm.predict_set["prompt"]) == ["hello"]
    # nothing left: one error naming the column and the first row
    dm = PromptDataModule(predict_path=str(write_jsonl(tmp_path / "none.jsonl", [{"id": "z", "prompt": " "}])))
    with pytest.raises(ValueError, match=r"data.predict_path=.*every row has a null or empty 'prompt'.*row 'z'"):
        dm.setup("predict")


def test_a_changed_lit_rlhf_does_not_reuse_what_an_older_one_cached(tmp_path, monkeypatch):
    """datasets keys a cached map by the name of an importable function, not its code: the cache key of every
    transform of a source must cover lit_rlhf's own code, or an upgraded lit_rlhf trains on old encodings."""
    import importlib
    import sys

    import lit_rlhf.data.sources as sources

    encoder = tmp_path / "encoder_module.py"
    encoder.write_text("def encode(batch):\n    return {'out': [p + ' (old rule)' for p in batch['prompt']]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("encoder_module")
    data = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "bye"}])

    def encoded() -> list[str]:
        return sources.load_source(str(data))["train"].map(module.encode, batched=True)["out"]

    assert encoded() == ["hello (old rule)", "bye (old rule)"]
    encoder.write_text("def encode(batch):\n    return {'out': [p + ' (new rule)' for p in batch['prompt']]}\n")
    module = importlib.reload(sys.modules["encoder_module"])
    monkeypatch.setattr(sources, "code_digest", lambda: "the digest of the changed code")
    assert encoded() == ["hello (new rule)", "bye (new rule)"]


def test_conversation_pairs_follow_the_same_rule():
    """A conversation pair's prompt is checked as a conversation prompt is: its last turn (the question) must hold
    text, whatever the turns before it hold."""
    def pair(question: str) -> dict:
        head = [{"role": "system", "content": "be kind"}, {"role": "user", "content": question}]
        return {"chosen": head + [{"role": "assistant", "content": "yes"}],
                "rejected": head + [{"role": "assistant", "content": "no"}]}

    rows = [pair("which?"), pair(" ")]
    batch = {k: [r[k] for r in rows] for k in ("chosen", "rejected")}
    assert pair_texts(batch, PairColumns(), conversations=True)["skip"] == ["", "empty"]


def test_the_code_digest_covers_every_file_of_the_package(tmp_path, monkeypatch):
    """Encoding reads models/ (the context limit) and rewards/ (classifier inputs) besides data/: an edit to any
    file of lit_rlhf changes the digest that keys the datasets cache."""
    import shutil
    from pathlib import Path

    import lit_rlhf
    import lit_rlhf.data.sources as sources

    package = Path(lit_rlhf.__file__).parent
    copy = tmp_path / "lit_rlhf"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    monkeypatch.setattr(sources, "__file__", str(copy / "data" / "sources.py"))
    digest = sources.code_digest.__wrapped__  # the cached one holds this process's digest
    before = digest()
    with open(copy / "models" / "lm.py", "a") as lm:
        lm.write("\n# an edit outside data/\n")
    assert digest() != before
