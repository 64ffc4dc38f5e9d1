"""What installing lit_rlhf brings (the offline profanity scorer is an extra) and what the test run enforces."""

import sys
import tomllib
from pathlib import Path

import pytest

from lit_rlhf.callbacks import ProfanityToxicity
from lit_rlhf.cli import config_path
from lit_rlhf.rewards import ProfanityReward

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRA = r"pip install 'lit-rlhf\[offline\]'"


@pytest.fixture
def no_profanity_check(monkeypatch):
    """Imports of alt-profanity-check fail, as where the offline extra is not installed."""
    for name in ("profanity_check", "profanity_check.profanity_check"):
        monkeypatch.setitem(sys.modules, name, None)


def test_the_exactly_pinned_profanity_package_is_an_extra_that_dev_brings():
    project = PYPROJECT["project"]
    assert not any(d.startswith("alt-profanity-check") for d in project["dependencies"])
    assert project["optional-dependencies"]["offline"] == ["alt-profanity-check>=1.4"]
    assert "lit-rlhf[offline]" in project["optional-dependencies"]["dev"]  # the tests use the offline scorers


def test_profanity_scorers_name_the_extra_when_the_package_is_missing(no_profanity_check):
    with pytest.raises(ValueError, match=f"^ProfanityReward needs the alt-profanity-check package: {EXTRA}"):
        ProfanityReward().setup()
    with pytest.raises(ValueError, match=f"^ProfanityToxicity needs the alt-profanity-check package: {EXTRA}"):
        ProfanityToxicity().setup()


def test_a_run_without_the_extra_stops_in_one_line_before_writing(no_profanity_check, tmp_path, monkeypatch, capsys):
    from lit_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_RLHF_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", ["lit-rlhf", "fit", "--config", config_path("embedded_t5.yaml"),
                                     "--model.ppo_steps", "1", "--trainer.enable_progress_bar", "false"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    # the last line is the error (transformers' loading bars may come before it), and no traceback
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "lit-rlhf: error: ProfanityReward needs the alt-profanity-check package: pip install 'lit-rlhf[offline]'")
    assert not (tmp_path / "logs").exists()
