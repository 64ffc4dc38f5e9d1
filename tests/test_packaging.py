"""What installing lit_rlhf brings (the offline profanity scorer is an extra) and what the test run enforces."""

import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from lit_rlhf.callbacks import ProfanityToxicity
from lit_rlhf.cli import config_path
from lit_rlhf.rewards import ProfanityReward

pytest_plugins = ["pytester"]

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


def test_every_packaged_config_is_package_data_of_a_listed_package():
    """A non-editable wheel ships a file only as package data of a package in `packages` (setuptools warns about,
    and will stop shipping, a sub-folder that is not one): each configs/**/*.yaml must be covered."""
    from fnmatch import fnmatch

    tool = PYPROJECT["tool"]["setuptools"]
    packages, package_data = set(tool["packages"]), tool["package-data"]
    assert tool["package-dir"]["lit_rlhf.configs"] == "configs"
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(configs) >= 19
    for config in configs:
        folder = config.parent.relative_to(ROOT / "configs").parts
        package = ".".join(("lit_rlhf", "configs", *folder))
        assert package in packages, f"{package} (holds {config.name}) is not in [tool.setuptools] packages"
        assert any(fnmatch(config.name, pattern) for pattern in package_data.get(package, [])), config


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


# Tests run by the test below under the project's own pytest settings. warn_from() warns as code in `module` does
# (the warnings module attributes a warning to the globals of the frame that warns).
WARNING_CASES = """
import warnings


def warn_from(module, message, category):
    namespace = {"__name__": module, "warnings": warnings}
    exec("def warn(message, category):\\n    warnings.warn(message, category)", namespace)
    namespace["warn"](message, category)


def test_lit_rlhf_deprecation():
    warn_from("lit_rlhf.models.lm", "this lit_rlhf function is deprecated", DeprecationWarning)


def test_deprecated_argument_used_by_lit_rlhf():
    # transformers' deprecate_kwarg warns with FutureWarning at the caller
    warn_from("lit_rlhf.models.decoding", "`past_key_values` is deprecated, use `cache`", FutureWarning)


def test_transformers_cache_deprecation():
    warn_from("transformers.cache_utils", "`DynamicLayer.lazy_initialization` is deprecated", DeprecationWarning)


def test_transformers_model_cache_argument_deprecation():
    warn_from("transformers.models.t5.modeling_t5", "`past_key_values` is deprecated and will be removed in v6",
              FutureWarning)


def test_transformers_generation_deprecation():
    warn_from("transformers.generation.utils", "Passing a tuple of past key values for generation is deprecated",
              FutureWarning)


def test_known_third_party_deprecation():
    warn_from("lightning.pytorch.cli", "\\n    ``instantiate_classes`` was deprecated in v4.49.0", DeprecationWarning)


def test_other_third_party_deprecation():
    warn_from("peft.tuners.lora", "`some_option` is deprecated", DeprecationWarning)
"""


def test_the_project_settings_fail_lit_rlhfs_and_transformers_cache_deprecations(pytester):
    shutil.copy(ROOT / "pyproject.toml", pytester.path / "pyproject.toml")
    pytester.makepyfile(test_warning_cases=WARNING_CASES)
    result = pytester.runpytest_inprocess("-n0", "-p", "no:cacheprovider", "test_warning_cases.py")
    outcomes = {r.nodeid.split("::")[-1]: r.outcome for r in result.reprec.getreports("pytest_runtest_logreport")
                if r.when == "call"}
    assert outcomes == {
        "test_lit_rlhf_deprecation": "failed",
        "test_deprecated_argument_used_by_lit_rlhf": "failed",
        "test_transformers_cache_deprecation": "failed",
        "test_transformers_model_cache_argument_deprecation": "failed",
        "test_transformers_generation_deprecation": "failed",
        "test_known_third_party_deprecation": "passed",
        "test_other_third_party_deprecation": "passed",
    }
    result.stdout.fnmatch_lines(["*`some_option` is deprecated*"])  # shown, not hidden by a blanket ignore
    result.stdout.no_fnmatch_line("*instantiate_classes*")  # a known one: ignored
