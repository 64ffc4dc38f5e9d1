"""Fault injection, bad input: degenerate rollouts, and settings, checkpoints, reward labels and datasets that are
refused with a clear message before anything is written."""

from pathlib import Path

import pytest
import torch

from conftest import build_tiny_classifier
from lit_rlhf.cli import run
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.settings import GenerationSettings
from small_runs import ScriptedReward, fit, small_module


# ------------------------------------------------------------------ degenerate rollouts


def test_eos_first_responses_and_equal_rewards(tmp_path):
    # every response is the single eos token and every sample gets the same reward: nothing to whiten,
    # yet the step must stay finite and count the eos as a response token
    module = small_module(reward=ScriptedReward(value=2.0), generation=GenerationSettings(min_new_tokens=0,
                                                                                         max_new_tokens=(4, 10)))
    eos = module.policy.eos_token_id
    lm_head = module.policy.model.get_output_embeddings()

    def force_eos(mod, inp, out):
        out = out.clone()
        out[..., eos] += 1e4
        return out

    lm_head.register_forward_hook(force_eos)
    lengths = []
    original = module._step_stats

    def record(rollout, *args):
        lengths.append(rollout.rows.response_mask.sum(1))
        stats = original(rollout, *args)
        assert all(torch.isfinite(v).all() for v in stats.values())
        return stats

    module._step_stats = record
    fit(module, tmp_path)
    assert module.skips.updates == 0 and module.skips.steps == 0
    assert all((n == 1).all() for n in lengths)


def test_responses_at_the_maximum_length(tmp_path):
    module = small_module(generation=GenerationSettings(min_new_tokens=0, max_new_tokens=(5, 6)))
    eos = module.policy.eos_token_id
    module.policy.model.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: out.index_fill(-1, torch.tensor([eos]), -1e4))
    lengths = []
    original = module._step_stats
    module._step_stats = lambda rollout, *a: (lengths.append(rollout.rows.response_mask.sum(1)), original(rollout, *a))[1]
    fit(module, tmp_path)
    assert all((n == 5).all() for n in lengths)


def test_prompts_longer_than_a_causal_context_are_cut_from_the_start():
    module = small_module(model_name="embedded:tiny-gpt2")
    policy = module.policy
    limit = policy.max_positions()
    ids = torch.arange(limit + 100)[None] % 500 + 10
    ids, mask = ids, torch.ones_like(ids)
    cut_ids, cut_mask = policy.fit_prompts(ids, mask, max_new_tokens=10)
    assert cut_ids.shape[1] == limit - 10
    assert torch.equal(cut_ids, ids[:, -(limit - 10):])  # the end of the prompt (the instruction) is kept
    response, response_mask = policy.generate(cut_ids, cut_mask, GenerationSettings(max_new_tokens=(10, 11)))
    assert response_mask.sum() >= 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        policy.fit_prompts(ids, mask, max_new_tokens=limit)


# ------------------------------------------------------------------ bad input, caught before anything is written


@pytest.mark.parametrize("flags, message", [
    (["--model.mini_batch_size", "3"], "mini_batch_size=3 must divide"),
    (["--model.learning_rate", "-1"], "learning_rate must be a positive number"),
    (["--model.ppo.kl_estimator", "bogus"], "kl_estimator"),
    (["--model.ppo_steps", "0"], "ppo_steps must be > 0"),
    (["--trainer.max_steps", "0"], "max_steps=0"),
    (["--model.model_name", "/no/such/model"], "Could not load model.model_name='/no/such/model'"),
])
def test_bad_settings_fail_before_the_run_directory_is_written(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, SystemExit)) as info:
        run(["fit", "--model.ppo_steps", "1", "--trainer.enable_progress_bar", "false", *flags])
    # the parser's own errors (a value outside a Literal's choices) exit with the message on stderr
    said = str(info.value) if info.type is ValueError else capsys.readouterr().err
    assert message in said, said
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written


@pytest.mark.parametrize("command", ["lit-rlhf", "lit-rlhf-sft"])
def test_a_truncated_checkpoint_is_one_line_naming_the_file(command, tmp_path, monkeypatch, capsys):
    from lit_rlhf.cli import config_path, main, main_sft

    monkeypatch.chdir(tmp_path)
    torch.save({"lit_rlhf": {"ppo_step": 1}, "state_dict": {"w": torch.ones(1000)}}, "whole.ckpt")
    Path("cut.ckpt").write_bytes(Path("whole.ckpt").read_bytes()[:2000])  # a copy that stopped half way
    entry, args = {"lit-rlhf": (main, ["fit", "--config", config_path("embedded_t5.yaml")]),
                   "lit-rlhf-sft": (main_sft, ["predict", "--config", config_path("sft_embedded.yaml")])}[command]
    monkeypatch.setattr("sys.argv", [command, *args, "--ckpt_path", "cut.ckpt"])
    monkeypatch.delenv("LIT_RLHF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        entry()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{command}: error: --ckpt_path cut.ckpt is not a readable checkpoint (RuntimeError: "
                             "PytorchStreamReader failed reading zip archive"), err[0]
    assert not Path("logs").exists()


def test_unknown_reward_label_lists_the_labels(tmp_path):
    classifier = build_tiny_classifier(tmp_path / "clf", ["hello world"])
    from lit_rlhf.rewards import ClassifierReward

    with pytest.raises(ValueError, match=r"nothate.*hate|hate.*nothate"):
        small_module(reward=ClassifierReward(model_name=str(classifier), label="toxic"))


def test_dataset_folder_without_the_needed_columns(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"id": "a", "text": "no dialogue column"}\n')
    data = DialogSumDataModule(dataset=str(folder))
    with pytest.raises(ValueError, match="dialogue"):
        data.prepare_data()
