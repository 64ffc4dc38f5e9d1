"""Sampled preference pairs: the ranking rule, pairs sampled from a policy, the bundled DialogSum pairs checked
against the rule and the recipe's split, and a reward model's response-only view."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from lit_rlhf.rewards import CompositeReward, ReferenceSimilarityReward, Reward
from lit_rlhf.data.sampled_pairs import rank_pair, recipe_rule, sample_pairs
from lit_rlhf.settings import GenerationSettings
from conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("datasets_cache")


def test_rank_pair_by_hand():
    assert rank_pair(("a", "b"), (1.0, 0.0), 0.5) == (0, 1)
    assert rank_pair(("a", "b"), (0.2, 1.0), 0.5) == (1, 0)
    assert rank_pair(("a", "b"), (0.2, 0.6), 0.5) == "near_tie"
    assert rank_pair(("a", "a"), (0.0, 9.0), 0.5) == "identical"
    assert rank_pair(("a", "  "), (0.0, 9.0), 0.5) == "empty"


class WordCount(Reward):
    """Number of words of the response: a rule that is simple to recompute."""

    def compute(self, prompts, responses, references):
        return torch.tensor([float(len(r.split())) for r in responses])


def test_sampled_pairs_follow_the_rule_and_use_training_prompts_only(tmp_path):
    from lit_rlhf.models import Policy
    from lit_rlhf.data import PromptDataModule

    rows = [{"id": f"r{i}", "prompt": f"say something about number {i}" + " and more" * (i % 5), "answer": f"number {i}"}
            for i in range(24)]
    dm = PromptDataModule(model_name="embedded:tiny-t5", dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                          reference_column="answer", test_size=0.25)
    dm.prepare_data()
    dm.setup("fit")
    policy = Policy("embedded:tiny-t5", finetune="full", value_head=False)
    rule = CompositeReward([WordCount(), ReferenceSimilarityReward()], [1.0, 2.0])
    settings = GenerationSettings(min_new_tokens=1, max_new_tokens=(2, 12))
    skipped = Counter()
    records = list(sample_pairs(policy, dm, rule, settings, batch_size=5, seed=3, min_gap=1.0, skipped=skipped,
                                progress=False))
    assert records and len(records) + sum(skipped.values()) == len(dm.train_set)
    held_out = set(dm.test_set["id"])
    by_id = {row["id"]: row for row in dm.train_set}
    for r in records:
        assert r["id"] in by_id and r["id"] not in held_out
        assert r["prompt"] == by_id[r["id"]]["prompt"] and r["reference"] == by_id[r["id"]]["answer"]
        assert r["chosen_score"] >= r["rejected_score"] + 1.0 and r["chosen"] != r["rejected"]
        # every recorded part is the rule's part of that response, and the score their weighted sum
        assert r["chosen_score"] == pytest.approx(rule([r["prompt"]], [r["chosen"]], [r["reference"]]).item(), abs=1e-5)
        assert r["chosen_score"] == pytest.approx(r["chosen_WordCount"] + 2 * r["chosen_rouge1_fmeasure"], abs=1e-5)
    again = list(sample_pairs(policy, dm, rule, settings, batch_size=5, seed=3, min_gap=1.0, progress=False))
    assert again == records  # seeded
    other = list(sample_pairs(policy, dm, rule, settings, batch_size=5, seed=4, min_gap=1.0, progress=False))
    assert other != records

    # prompts cut to max_prompt_tokens make no pair (the stored text would not be what the policy read); one of
    # exactly the limit is whole and kept
    limit = sorted(len(dm.tokenizer(row["prompt"]).input_ids) for row in dm.train_set)[len(dm.train_set) // 2]
    capped = PromptDataModule(model_name="embedded:tiny-t5", dataset=str(tmp_path / "p.jsonl"),
                              reference_column="answer", test_size=0.25, max_prompt_tokens=limit)
    capped.prepare_data()
    capped.setup("fit")
    lengths = [len(capped.tokenizer(row["prompt"]).input_ids) for row in capped.train_set]  # the whole prompts
    skipped = Counter()
    kept = {r["id"] for r in sample_pairs(policy, capped, rule, settings, batch_size=5, seed=3, skipped=skipped,
                                          progress=False)}
    long = {row["id"] for row, n in zip(capped.train_set, lengths) if n > limit}
    assert long and skipped["prompt_truncated"] == len(long) and not kept & long
    exact = {row["id"] for row, n in zip(capped.train_set, lengths) if n == limit}
    assert exact and len(exact - kept) <= skipped["identical"] + skipped["empty"]


def test_prompts_cut_to_the_models_context_make_no_pair(tmp_path, short_context_gpt2):
    # no data.max_prompt_tokens: the model's 32-position context cuts the long prompts, whose recorded text would
    # not be what the policy read
    from lit_rlhf.models import Policy
    from lit_rlhf.data import PromptDataModule

    rows = [{"id": f"r{i}", "prompt": f"say number {i}" + " and a few more words" * (20 * (i % 2)), "answer": "a"}
            for i in range(8)]
    # the rollout's responses (at most 5 tokens, below) share the context: prompts get 32 - 5 tokens
    dm = PromptDataModule(model_name=str(short_context_gpt2), dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                          reference_column="answer", test_size=0.25, reserve_tokens=5)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.max_prompt_tokens is None
    long = {row["id"] for row in dm.train_set if len(dm.tokenizer(row["prompt"]).input_ids) > 32 - 5}
    assert long and len(long) < len(dm.train_set)
    policy = Policy(str(short_context_gpt2), finetune="full", value_head=False)
    settings = GenerationSettings(min_new_tokens=1, max_new_tokens=(2, 6))
    skipped = Counter()
    records = list(sample_pairs(policy, dm, WordCount(), settings, batch_size=4, skipped=skipped, progress=False))
    assert skipped["prompt_truncated"] == len(long) and not {r["id"] for r in records} & long
    assert len(records) + sum(skipped.values()) == len(dm.train_set)


def test_bundled_pairs_follow_the_stated_rule_and_never_use_the_reports_prompts(tmp_path):
    """bundled:dialogsum-pairs as its PROVENANCE.md states: each pair's chosen summary has the higher offline-recipe
    reward by at least 0.5 (recomputed here on a sample), and no pair's dialogue is one of the recipe's held-out
    dialogues (the toxicity report's prompts)."""
    from lit_rlhf.data import DialogSumDataModule
    from lit_rlhf.data import load_source

    pairs = load_source("bundled:dialogsum-pairs")["train"]
    assert len(pairs) > 5000
    assert all(c >= r + 0.5 for c, r in zip(pairs["chosen_score"], pairs["rejected_score"]))
    recipe = DialogSumDataModule(model_name="embedded:summarizer", dataset="bundled", max_prompt_tokens=256)
    recipe.prepare_data()
    recipe.setup("fit")
    assert not set(pairs["id"]) & set(recipe.test_set["id"])
    prompts = dict(zip(recipe.train_set["id"], recipe.train_set["prompt"]))
    sample = pairs.select(range(0, len(pairs), len(pairs) // 20))
    assert all(prompts[row["id"]] == row["prompt"] for row in sample)
    rule = recipe_rule()
    for side in ("chosen", "rejected"):
        scores = rule(sample["prompt"], sample[side], references=sample["reference"])
        torch.testing.assert_close(scores, torch.tensor(sample[f"{side}_score"]), rtol=1e-4, atol=1e-4)

    # the command that made them, on the first 8 dialogues: a gzipped file the preference data module reads
    from lit_rlhf.data.sampled_pairs import main

    assert main(["--out", str(tmp_path / "made.jsonl.gz"), "--num-prompts", "8", "--batch-size", "4"]) == 0
    made = load_source(str(tmp_path / "made.jsonl.gz"))["train"]
    first = recipe.train_set.select(range(8))
    assert 0 < len(made) <= 8 and set(made["id"]) <= set(first["id"])
    assert all(c >= r + 0.5 for c, r in zip(made["chosen_score"], made["rejected_score"]))
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_response_only_classifier_reads_the_response_alone(tmp_path):
    from lit_rlhf.data import PreferenceDataModule

    rows = [{"prompt": f"tell me about item {i}", "chosen": f"item {i} is good", "rejected": f"item {i} is bad"}
            for i in range(6)]
    dm = PreferenceDataModule(model_name="embedded:tiny-t5", dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                              classifier_inputs=True, classifier_text="response", test_size=0.5,
                              eval_batch_size=3)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    for i in range(3):
        ids = batch["chosen_input_ids"][i][batch["chosen_attention_mask"][i].bool()].tolist()
        assert ids == dm.tokenizer(batch["chosen"][i]).input_ids
    with pytest.raises(ValueError, match="data.classifier_text"):
        PreferenceDataModule(model_name="embedded:tiny-t5", classifier_text="prompt")


def test_the_preference_configs_run_end_to_end_rm_into_ppo_and_dpo_into_test(tmp_path, monkeypatch):
    """configs/preferences/*.yaml as shipped (packaged too), on a small sample of the bundled pairs and the tiny
    T5: lit-rlhf-rm exports a response-only reward model that ppo_learned_reward.yaml puts into lit-rlhf fit
    with no other change; lit-rlhf-dpo exports an adapter that lit-rlhf test measures."""
    import yaml

    from lit_rlhf.cli import config_path, run, run_dpo, run_rm
    from lit_rlhf.rewards import ClassifierReward
    from lit_rlhf.data import load_source

    monkeypatch.chdir(tmp_path)
    shipped = {name: config_path(f"preferences/{name}") for name in
               ("rm_summarizer.yaml", "dpo_summarizer.yaml", "ppo_learned_reward.yaml")}
    assert all(yaml.safe_load(open(path)) for path in shipped.values())
    pairs = load_source("bundled:dialogsum-pairs")["train"].select(range(40))
    sample = write_jsonl(tmp_path / "pairs.jsonl", list(pairs))
    small = ["--model.model_name", "embedded:tiny-t5", "--data.dataset", str(sample), "--data.batch_size", "4",
             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "rm"]
    rm = run_rm(["fit", "--config", shipped["rm_summarizer.yaml"], *small])
    exported = Path(rm.trainer.log_dir) / "reward_model"
    assert rm.datamodule.classifier_text == "response"

    # the PPO fit and the test read the bundled test split (1,500 dialogues to encode, not 12,460)
    tiny_ppo = ["--config", config_path("embedded_t5.yaml"), "--config", shipped["ppo_learned_reward.yaml"],
                "--model.reward.model_name", str(exported), "--model.ppo_steps", "1", "--data.batch_size", "4",
                "--model.generation.max_new_tokens", "[4, 8]", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", "ppo", "--trainer.callbacks", "[]", "--data.split", "test"]
    ppo = run(["fit", *tiny_ppo])
    assert isinstance(ppo.model.reward, ClassifierReward) and ppo.model.reward.text == "response"
    assert ppo.model.ppo_step == 1

    small[-1] = "dpo"
    dpo = run_dpo(["fit", "--config", shipped["dpo_summarizer.yaml"], *small])
    adapter = Path(dpo.trainer.log_dir) / "adapter"
    tested = run(["test", "--config", config_path("embedded_t5.yaml"), "--model.init_adapter", str(adapter),
                  "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", "test", "--trainer.callbacks", "[]", "--data.split", "test"])
    assert "test/reward_mean" in tested.trainer.callback_metrics
