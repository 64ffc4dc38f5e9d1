"""The lit-rlhf command's help, errors and warnings: the help states the default config and lists the rewards and
evaluators, a user error or a parse error is one line naming the flag, and only known harmless warnings are filtered."""

import pytest

from cli_flags import QUICK
from conftest import build_tiny_classifier
from lit_rlhf.cli import run

def test_help_states_the_default_config_and_lists_rewards_and_evaluators(capsys):
    import inspect

    import lit_rlhf.callbacks.evaluators as evaluators
    import lit_rlhf.rewards as rewards

    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--help"])
    assert exit_info.value.code in (0, None)
    help_text = capsys.readouterr().out
    top = help_text[:600]
    assert "detox_summarizer.yaml" in top and "lit-rlhf fit --print_config" in top
    for module, base in ((rewards, rewards.Reward), (evaluators, evaluators.ToxicityEvaluator)):
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if issubclass(c, base) and c is not base and c.__module__.startswith(module.__name__)]
        assert classes
        for cls in classes:  # one line each: "  Name   what it does"
            assert any(line.split()[:1] == [cls.__name__] for line in help_text.splitlines()), cls.__name__


def test_only_the_subcommand_given_gets_its_full_parser(capsys):
    """Each full subcommand parser reads the trainer's, module's and data module's signatures and docstrings:
    a command builds the one it runs (none for the main --help)."""
    from lit_rlhf.cli import SUBCOMMANDS, needed_subcommands

    assert needed_subcommands(["fit", "--config", "x.yaml", "--help"], SUBCOMMANDS) == {"fit"}
    assert needed_subcommands(["--config", "x.yaml", "test", "--ckpt_path", "a.ckpt"], SUBCOMMANDS) == {"test"}
    assert needed_subcommands(["--help"], SUBCOMMANDS) == set()
    assert needed_subcommands(["--config", "x.yaml"], SUBCOMMANDS) == set(SUBCOMMANDS)  # the config may name it
    with pytest.raises(SystemExit):
        run(["--help"])
    listed = capsys.readouterr().out
    assert all(f"    {sub} " in listed for sub in SUBCOMMANDS)


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--model.learning_rat", "1e-3", "--print_config"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --model.learning_rat" in capsys.readouterr().err


def test_a_user_error_is_one_line_unless_debugging(tmp_path, monkeypatch, capsys):
    from lit_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-rlhf", "fit", "--ckpt_path", "missing.ckpt"])
    monkeypatch.delenv("LIT_RLHF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lit-rlhf: error: --ckpt_path missing.ckpt: no such file  (LIT_RLHF_DEBUG=1 shows the traceback)"]
    monkeypatch.setenv("LIT_RLHF_DEBUG", "1")
    with pytest.raises(ValueError, match="no such file"):
        main()


@pytest.mark.parametrize("case", ["classifier max_length", "reward argument", "data batch_size"])
def test_user_errors_name_the_flag_to_change(case, tmp_path, monkeypatch, capsys):
    """The one line a user sees names the flag (``--model.reward.max_length``), not a constructor argument."""
    from lit_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_RLHF_DEBUG", raising=False)
    classifier = build_tiny_classifier(tmp_path / "classifier", ["a tiny vocabulary"], max_tokens=128)
    flags, message = {
        # the README's reward-model-to-PPO command with a classifier of 128 positions: the reward's default 512
        "classifier max_length": (
            ["--model.reward", "lit_rlhf.rewards.ClassifierReward", "--model.reward.model_name", str(classifier)],
            f"--model.reward.max_length is 512 but {classifier} reads at most 128 tokens; set "
            f"--model.reward.max_length to 128 or less"),
        "reward argument": (["--model.reward", "lit_rlhf.rewards.ProfanityReward", "--model.reward.eps", "0.7"],
                            "--model.reward.eps must be in (0, 0.5), got 0.7"),
        "data batch_size": (["--data.batch_size", "100000", "--model.mini_batch_size", "4"],
                            "data.batch_size=100000 is larger than the"),
    }[case]
    monkeypatch.setattr("sys.argv", ["lit-rlhf", "fit", *QUICK, *flags])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lit-rlhf: error: ") and message in last, last


def test_the_predictions_line_comes_after_the_progress_bar(tmp_path, caplog):
    """The file is written at the end of the predict epoch, while the bar is still open on its line; the line
    saying where comes at the end of predict, after the bar (added before the writer) has closed."""
    from types import SimpleNamespace

    from lit_rlhf.callbacks import PredictionWriter

    writer = PredictionWriter(output_dir=str(tmp_path))
    trainer = SimpleNamespace(world_size=1, global_rank=0, log_dir=None, default_root_dir=str(tmp_path))
    with caplog.at_level("INFO"):
        writer.write_on_epoch_end(trainer, None, [[{"id": "a", "score": 1.0}]], [])
        assert (tmp_path / "predictions.jsonl").is_file() and "Predictions written" not in caplog.text
        writer.on_predict_end(trainer, None)
    assert f"Predictions written to {tmp_path / 'predictions.jsonl'} (1 row)" in caplog.text


def test_only_the_known_harmless_warnings_are_filtered(caplog):
    import logging
    import warnings

    from lit_rlhf.cli import quiet_harmless_warnings

    quiet_harmless_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_harmless_warnings()  # catch_warnings resets the filters it finds; install them inside
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("Model has something else to say")
    assert [str(w.message) for w in caught] == ["Model has something else to say"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("transformers.modeling_utils").warning(
            "The tied weights mapping and config for this model specifies to tie shared.weight to lm_head.weight")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: For seamless cloud logging, ...")
        logging.getLogger("transformers.modeling_utils").warning("a different warning")
    assert [r.getMessage() for r in caplog.records] == ["a different warning"]


def test_test_and_validate_report_only_the_flags_given():
    from jsonargparse import Namespace

    from lit_rlhf.runtime import combine_with_checkpoint

    parsed, stored = Namespace(ppo_steps=100, learning_rate=1e-3), Namespace(ppo_steps=3, learning_rate=2e-3)
    combined, notices = combine_with_checkpoint(parsed, stored, ["learning_rate"], report_kept=False)
    assert (combined.ppo_steps, combined.learning_rate) == (3, 1e-3)
    assert notices == ["model.learning_rate=0.001 (given) replaces the checkpoint's 0.002"]


def test_a_parse_error_is_one_line(capsys):
    # jsonargparse's own errors (a value outside a setting's choices, an unknown or abbreviated flag) exit
    # with status 2 and one line naming the setting, not the usage text
    for flags, expected in ((["--model.ppo.kl_estimator", "bogus"], "model.ppo.kl_estimator"),
                            (["--model.learning_rat", "1e-3"], "--model.learning_rat")):
        with pytest.raises(SystemExit) as info:
            run(["fit", *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and err.startswith("lit-rlhf: error:"), err
