"""PreferenceDataModule: text and conversation pairs, the preference batch, skips, length limits, errors, the
resumable stream."""


import pytest
import torch

from lit_rlhf.data import PreferenceDataModule
from conftest import END_OF_TURN, write_jsonl

# small files are converted into each test's folder, not the user's datasets cache
pytestmark = pytest.mark.usefixtures("datasets_cache")

CONTRACT_KEYS = {"prompt_input_ids", "prompt_attention_mask", "chosen_ids", "chosen_mask", "rejected_ids",
                 "rejected_mask", "prompt", "query", "chosen", "rejected", "id"}
CLASSIFIER_KEYS = {"chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask"}
"""What a reward model reads, in the batch only with classifier_inputs=True."""


def text_pairs(n: int) -> list[dict]:
    return [{"prompt": f"tell me about item {i}", "chosen": f"item {i} is good", "rejected": f"item {i} is bad"}
            for i in range(n)]


def ready(**kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(**{"batch_size": 2, "eval_batch_size": 2, "test_size": 0.2, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_text_pairs_make_the_contract_batch(tmp_path):
    dm = ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", text_pairs(10))), classifier_inputs=True)
    assert dm.summary()["train"] == 8 and dm.summary()["test"] == 2
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == CONTRACT_KEYS | CLASSIFIER_KEYS
    tok = dm.tokenizer
    rows = dm.test_set.select(range(2))
    for i in range(2):
        # decoder-only: the prompt is left-padded, the responses right-padded with eos last
        prompt = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        assert prompt == tok(rows[i]["prompt"]).input_ids
        assert batch["prompt_attention_mask"][i, -1] == 1
        chosen = batch["chosen_ids"][i][batch["chosen_mask"][i].bool()].tolist()
        assert chosen == tok(batch["chosen"][i], add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert batch["chosen_mask"][i, 0] == 1
        full = batch["rejected_input_ids"][i][batch["rejected_attention_mask"][i].bool()].tolist()
        assert full == tok(batch["query"][i] + "\n" + batch["rejected"][i]).input_ids
    assert batch["chosen"][0].endswith("good") and batch["rejected"][0].endswith("bad")
    assert batch["id"] == rows["id"] and batch["chosen_ids"].dtype == torch.long


def test_conversation_pairs_share_their_leading_turns_as_the_prompt(tmp_path, qwen_with_chat_template):
    folder = qwen_with_chat_template
    user = {"role": "user", "content": "hi"}
    rows = [{"chosen": [user, {"role": "assistant", "content": f"hello {i}"}],
             "rejected": [user, {"role": "assistant", "content": f"go away {i}"}]} for i in range(5)]
    dm = ready(model_name=str(folder), dataset=str(write_jsonl(tmp_path / "c.jsonl", rows)), system_prompt="be kind")
    batch = next(iter(dm.val_dataloader()))
    assert batch["prompt"][0] == "<|system|>be kind\n<|user|>hi\n<|assistant|>"
    assert batch["chosen"][0].startswith("hello") and batch["rejected"][0].startswith("go away")


def test_identical_empty_and_long_pairs_are_skipped_and_counted(tmp_path):
    rows = text_pairs(10) + [
        {"prompt": "same", "chosen": "x", "rejected": "x"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": None},
        {"prompt": "p", "chosen": "a " * 50, "rejected": "b"},
    ]
    dm = ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)), max_response_tokens=20)
    summary = dm.summary()
    assert (summary["skipped_identical"], summary["skipped_empty"], summary["skipped_too_long"]) == (1, 2, 1)
    assert summary["train"] + summary["test"] == 10


def test_chat_responses_end_in_the_templates_end_of_turn(tmp_path, qwen_with_end_of_turn):
    def conversation(reply: str) -> list[dict]:
        return [{"role": "user", "content": "which?"}, {"role": "assistant", "content": reply}]

    rows = [{"chosen": conversation(f"this {i}"), "rejected": conversation(f"that {i}")} for i in range(10)]
    dm = ready(model_name=str(qwen_with_end_of_turn), dataset=str(write_jsonl(tmp_path / "c.jsonl", rows)))
    end = dm.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end != dm.tokenizer.eos_token_id
    assert all(row["chosen_ids"][-1] == end and row["rejected_ids"][-1] == end for row in dm.train_set)


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p", "chosen": "a"}, r"lacks the column\(s\) \['rejected'\]"),
    ({"question": "p", "chosen": "a", "rejected": "b"}, "data.prompt_column='prompt'"),
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "share one prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "m": None}, "data.margin_column='m'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "m": "big"}, "data.margin_column='m'"),
    ({"chosen": [{"role": "user", "content": "p"}], "rejected": [{"role": "user", "content": "p"}]}, "assistant turn"),
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}], "rejected": "b"},
     "data.rejected_column: conversation pairs"),
])
def test_bad_pairs_raise_one_clear_error(tmp_path, row, match):
    source = write_jsonl(tmp_path / "bad.jsonl", [row] * 5)
    margin = "m" if "m" in row else None
    with pytest.raises(ValueError, match=match):
        ready(dataset=str(source), margin_column=margin)


def test_margin_column_becomes_a_float_tensor(tmp_path):
    rows = [{**r, "m": float(i)} for i, r in enumerate(text_pairs(10))]
    dm = ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)), margin_column="m")
    batch = next(iter(dm.val_dataloader()))
    assert batch["margin"].dtype == torch.float32
    assert batch["margin"].tolist() == [float(dm.test_set[i]["m"]) for i in range(2)]


def test_encoder_decoder_prompts_are_right_padded(tmp_path):
    dm = ready(model_name="embedded:tiny-t5", dataset=str(write_jsonl(tmp_path / "p.jsonl", text_pairs(10))))
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["prompt_attention_mask"].sum(1)
    assert all(batch["prompt_attention_mask"][i, : lengths[i]].all() for i in range(2))
    assert (batch["chosen_ids"][batch["chosen_mask"].bool()] != dm.tokenizer.pad_token_id).any()


def test_the_classifier_reads_what_a_rollout_gives_a_prompt_response_reward(tmp_path):
    """A reward model trains on query + newline + response, the query being the prompt as a PPO rollout hands it
    to ClassifierReward(text="prompt+response"), encoded by the one function ClassifierReward uses: for T5 the
    decoded prompt ids end in </s>, which the raw prompt text lacks."""
    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.rewards import classifier_input_ids

    source = str(write_jsonl(tmp_path / "p.jsonl", text_pairs(10)))
    pairs = ready(model_name="embedded:tiny-t5", dataset=source, shuffle=False, classifier_inputs=True)
    prompts = PromptDataModule(model_name="embedded:tiny-t5", dataset=source, test_size=0.2, eval_batch_size=2)
    prompts.prepare_data()
    prompts.setup("fit")
    pair_batch, rollout_batch = next(iter(pairs.val_dataloader())), next(iter(prompts.val_dataloader()))
    assert pair_batch["id"] == rollout_batch["id"]
    assert rollout_batch["query"][0].endswith("</s>") and not pair_batch["prompt"][0].endswith("</s>")
    tok = pairs.tokenizer
    for i in range(2):
        scored = classifier_input_ids(tok, "prompt+response", rollout_batch["query"], pair_batch["chosen"],
                                      pairs.classifier_limit()).input_ids[i]
        assert tok.decode(scored).startswith(rollout_batch["query"][i])
        trained = pair_batch["chosen_input_ids"][i][pair_batch["chosen_attention_mask"][i].bool()].tolist()
        assert trained == scored


def test_only_a_reward_models_pairs_are_limited_by_what_a_classifier_reads(tmp_path):
    """DPO's pairs (no classifier reads them) keep a response longer than the policy tokenizer's
    model_max_length (as flan-t5's 512; T5's relative positions have no limit), and carry no classifier inputs;
    a reward model's pairs drop it and count it."""
    import shutil

    from transformers import AutoTokenizer

    from lit_rlhf.models import resolve_model_path

    folder = shutil.copytree(resolve_model_path("embedded:tiny-t5"), tmp_path / "t5")
    AutoTokenizer.from_pretrained(folder, model_max_length=24).save_pretrained(folder)
    long = {"prompt": "tell me more", "chosen": "item is good and " * 10 + "fine", "rejected": "item is bad"}
    source = str(write_jsonl(tmp_path / "p.jsonl", text_pairs(9) + [long]))
    dpo = ready(model_name=str(folder), dataset=source, test_size=0.1)
    assert dpo.summary()["skipped_too_long"] == 0 and dpo.summary()["train"] + dpo.summary()["test"] == 10
    assert max(len(row["chosen_ids"]) for row in dpo.train_set) > 24
    assert set(next(iter(dpo.train_dataloader()))) == CONTRACT_KEYS
    rm = ready(model_name=str(folder), dataset=source, test_size=0.1, classifier_inputs=True)
    assert rm.summary()["skipped_too_long"] == 1 and rm.summary()["train"] + rm.summary()["test"] == 9
    assert set(next(iter(rm.train_dataloader()))) == CONTRACT_KEYS | CLASSIFIER_KEYS


def test_classifier_limit_reads_the_config_loaded_with_the_tokenizer(tmp_path, monkeypatch):
    import transformers

    rm = ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", text_pairs(6))), classifier_inputs=True)
    limit = rm.classifier_limit()
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("config reloaded"))
    assert rm.classifier_limit() == limit == rm.tokenizer.model_max_length


def test_stream_resumes_from_its_state_and_splits_across_processes(tmp_path):
    dm = ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", text_pairs(20))))
    order = [b["id"] for b in dm.train_dataloader()]  # 16 training pairs, 8 batches of 2
    resumed = ready(dataset=str(dm.dataset))
    resumed.load_state_dict({"consumed_batches": 3})
    assert [b["id"] for b in resumed.train_dataloader()] == order[3:]
    assert resumed.state_dict() == {"consumed_batches": 3}
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, torch.utils.data.DistributedSampler)


def test_settings_naming_one_column_twice_are_refused():
    with pytest.raises(ValueError, match="must name different columns"):
        PreferenceDataModule(chosen_column="text", rejected_column="text")
    with pytest.raises(ValueError, match="data.max_response_tokens"):
        PreferenceDataModule(max_response_tokens=0)


def test_each_process_takes_its_own_slice_of_each_stream_batch(tmp_path):
    from types import SimpleNamespace

    dm = ready(dataset=str(write_jsonl(tmp_path / "p.jsonl", text_pairs(20))))
    stream = [i for b in dm.train_dataloader() for i in b["id"]]  # one process: 8 batches of 2
    slices = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        slices.append([b["id"] for b in dm.train_dataloader()])  # 4 stream batches of 2 x 2 pairs each
    assert len(slices[0]) == len(slices[1]) == 4
    assert [sorted(a + b) for a, b in zip(*slices)] == [sorted(stream[4 * k: 4 * k + 4]) for k in range(4)]
