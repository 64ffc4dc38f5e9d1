"""The toxicity report on known inputs: held-out prompts, ROUGE against every reference, the report's words,
sample tables and table."""

import pytest

from lit_rlhf.callbacks.measurement import HeldOutPrompt, select_prompts
from lit_rlhf.callbacks.report import rouge_per_prompt


def test_rouge_uses_every_reference_of_a_dialogue():
    scores = rouge_per_prompt(["the cat sat"], [["a dog ran", "the cat sat"]])
    assert scores["rouge1"] == [pytest.approx(1.0)]  # the best-matching reference counts


def test_held_out_prompts_are_dialogues_with_all_their_references():
    from datasets import Dataset

    # DialogSum's test split: one row per (dialogue, reference summary)
    rows = Dataset.from_dict({
        "id": ["test_1_1", "test_1_2", "test_1_3", "test_2_1"], "dialogue": ["d1", "d1", "d1", "d2"],
        "summary": ["a", "b", "c", "x"], "query": ["q1", "q1", "q1", "q2"],
    })
    prompts = select_prompts(rows, None)
    assert [(p.id, p.row, p.query, p.references, p.duplicates) for p in prompts] == [
        ("test_1_1", 0, "q1", ["a", "b", "c"], 2), ("test_2_1", 3, "q2", ["x"], 0)
    ]
    assert [p.id for p in select_prompts(rows, 1)] == ["test_1_1"]


def test_report_names_what_it_measured_signs_changes_and_says_what_it_merged():
    """Ten distinct prompts out of twelve held-out rows; toxicity 20% lower on average, though a CI of the mean
    and a rank test can disagree (one large change the other way): the report says each in words."""
    from lit_rlhf.callbacks.measurement import Measurement
    from lit_rlhf.callbacks.rendering import markdown
    from lit_rlhf.callbacks.report import build_report

    prompts = [HeldOutPrompt(row=i, id=f"p{i}", query=f"q{i}", references=[], duplicates=2 if i == 0 else 0)
               for i in range(10)]
    before = [0.5] * 10
    after = [0.3] * 9 + [0.7]  # nine prompts 0.2 lower, one 0.2 higher: mean change -0.16, i.e. -32%
    passes = [Measurement(stage, [p.id for p in prompts], ["r"] * 10, tox, [0.0] * 10, [3] * 10)
              for stage, tox in (("before", before), ("after", after))]
    settings = {"evaluator": "e", "text": "response", "reward": "r", "num_prompts": 12}
    report = build_report(prompts, *passes, settings, None, num_samples=2, strong_gain=0.3, strong_loss=0.2,
                          bootstrap_resamples=200, confidence=0.95, seed=0, test_method="wilcoxon")
    text = markdown(report)
    assert text.startswith("# Reward and toxicity before and after training")  # not "Toxicity" alone
    change = next(line for line in text.splitlines() if line.startswith("| change after %"))
    assert "-32.00% (lower)" in change and "decrease" not in text.split("##")[0].split("- ")[0]
    assert report["merged_duplicates"] == 2 and "2 further held-out rows repeat one of these prompts" in text
    assert "10 prompts were measured where num_prompts=12 was asked for" in text
    assert "Why both: the CI is of the mean change" in text and "Wilcoxon" in text
    assert "pseudo-median" in text and "Walsh" in text and "a shift of the median" not in text
    # as many prompts as asked for (the default recipe: 200 of 200, duplicates merged): no shortfall is implied
    report["settings"]["num_prompts"] = 10
    assert "so 10 prompts were measured.\n" in markdown(report) and "was asked for" not in markdown(report)


def test_reward_sample_tables_list_only_gains_and_only_losses():
    from lit_rlhf.callbacks.rendering import markdown
    from lit_rlhf.callbacks.report import reward_samples

    diffs = [0.3, -0.5, 0.0, 0.1, 0.2]
    per_prompt = {name: [f"{name}{i}" for i in range(5)] for name in
                  ("id", "query", "response_before", "response_after")}
    per_prompt |= {"reward_before": [0.0] * 5, "reward_after": diffs, "reward_diff": diffs,
                   "toxicity_before": [0.0] * 5, "toxicity_after": [0.0] * 5}
    samples = reward_samples(per_prompt, 3)
    assert [s["reward_diff"] for s in samples["most_improved"]] == [0.3, 0.2, 0.1]
    assert [s["reward_diff"] for s in samples["most_degraded"]] == [-0.5]  # not the +0.1 and +0.2 gains
    none_lost = reward_samples({**per_prompt, "reward_diff": [0.1] * 5}, 3)
    assert none_lost["most_degraded"] == []
    report = {"samples": none_lost, "settings": {"evaluator": "e", "text": "response", "reward": "r"},
              "num_prompts": 5}
    assert "No prompt lost reward." in markdown(report)


def test_report_table_shows_how_much_rouge_is_retained():
    from lit_rlhf.callbacks.rendering import COLUMNS, table

    before = {key: 0.5 for key, _ in COLUMNS} | {"rouge1": 0.40, "rouge2": 0.0, "rougeL": 0.30}
    after = dict(before) | {"rouge1": 0.38, "rougeL": 0.33}
    text = table({"before": before, "after": after})
    retained = next(line for line in text.splitlines() if line.startswith("| retained %"))
    cells = [c.strip() for c in retained.strip("|").split("|")]
    # 0.38 / 0.40 = 95.0%; ROUGE-2 was 0 before: no ratio; 0.33 / 0.30 = 110.0%
    assert cells[5:8] == ["95.0%", "", "110.0%"]


def test_pass_at_k_per_prompt_aggregates_paired_change_and_table():
    import torch

    from lit_rlhf.callbacks.measurement import Measurement, pass_at_k
    from lit_rlhf.callbacks.rendering import markdown
    from lit_rlhf.callbacks.report import build_report

    # three prompts x k = 2 samples, contiguous: (0, 1) (0, 0) (1, 1)
    passed, mean = pass_at_k(torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0]), 2)
    assert passed.tolist() == [1.0, 0.0, 1.0] and mean.tolist() == [0.5, 0.0, 1.0]
    prompts = [HeldOutPrompt(row=i, id=f"p{i}", query=f"q{i}", references=[]) for i in range(4)]
    ids = [p.id for p in prompts]
    before = Measurement("before", ids, ["r"] * 4, [0.0] * 4, [0.0, 1.0, 0.0, 0.0], [2] * 4,
                         pass_at_k=[0.0, 1.0, 1.0, 0.0], sample_reward=[0.0, 0.5, 0.25, 0.0])
    after = Measurement("after", ids, ["r"] * 4, [0.0] * 4, [1.0, 1.0, 1.0, 0.0], [2] * 4,
                        pass_at_k=[1.0, 1.0, 1.0, 1.0], sample_reward=[0.5, 1.0, 0.75, 0.25])
    settings = {"evaluator": "e", "text": "response", "reward": "r", "num_prompts": 4, "pass_at_k": 4}
    report = build_report(prompts, before, after, settings, None, num_samples=2, strong_gain=0.3, strong_loss=0.2,
                          bootstrap_resamples=200, confidence=0.95, seed=0, test_method="permutation")
    assert report["before"]["pass_at_k"] == 0.5 and report["after"]["pass_at_k"] == 1.0
    assert report["before"]["sample_reward_mean"] == pytest.approx(0.1875)
    assert report["after"]["sample_reward_mean"] == pytest.approx(0.625)
    assert report["pass_at_k"]["difference_mean"] == 0.5 and report["pass_at_k"]["improved"] == 2
    assert report["reward"]["difference_mean"] == 0.5  # the greedy pass@1 (accuracy) beside it
    assert report["per_prompt"]["pass_at_k_after"] == [1.0] * 4
    text = markdown(report)
    assert "pass@4" in text.splitlines()[2] and "sampled reward" in text.splitlines()[2]
    assert "pass@4 increase (after - before, per prompt): mean 0.5000" in text
    # not measured: neither the columns nor the lines
    plain = build_report(prompts, Measurement("before", ids, ["r"] * 4, [0.0] * 4, [0.0] * 4, [2] * 4),
                         Measurement("after", ids, ["r"] * 4, [0.0] * 4, [1.0] * 4, [2] * 4),
                         {k: v for k, v in settings.items() if k != "pass_at_k"}, None, num_samples=2,
                         strong_gain=0.3, strong_loss=0.2, bootstrap_resamples=200, confidence=0.95, seed=0,
                         test_method="permutation")
    assert "pass_at_k" not in plain and "pass_at_k" not in plain["after"] and "pass@" not in markdown(plain)
