"""model.num_threads: the intra-op thread choice (lit_rlhf.runtime.threads) and how both modules apply it."""

import logging

import pytest
import torch

from lit_rlhf.cli import run
from lit_rlhf.modules import PPOModule
from lit_rlhf.modules import SFTModule
from lit_rlhf.runtime import AUTO_SINGLE_THREAD_BELOW, choose_num_threads, num_threads_errors, use_num_threads

TINY_T5 = 601_088  # the embedded default policy's parameters (embedded:tiny-t5 with its LoRA adapter)
FLAN_T5_BASE = 247_577_856


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_uses_one_thread_for_a_small_model_and_torch_default_for_a_large_one():
    assert choose_num_threads("auto", TINY_T5, current=2)[0] == 1
    assert choose_num_threads("auto", AUTO_SINGLE_THREAD_BELOW - 1, current=16, cpus=16)[0] == 1
    assert choose_num_threads("auto", FLAN_T5_BASE, current=2, cpus=2)[0] == 2
    assert choose_num_threads("auto", AUTO_SINGLE_THREAD_BELOW, current=16, cpus=16)[0] == 16


def test_auto_shares_the_cores_between_the_processes_of_a_run():
    # two DDP processes on 16 cores, launched without OMP_NUM_THREADS: 8 threads each, not 16
    assert choose_num_threads("auto", FLAN_T5_BASE, current=16, cpus=16, local_processes=2)[0] == 8
    assert choose_num_threads("auto", FLAN_T5_BASE, current=2, cpus=2, local_processes=4)[0] == 1


def test_an_explicit_count_wins_over_the_model_size():
    assert choose_num_threads(2, TINY_T5, current=1) == (2, "model.num_threads=2")
    assert choose_num_threads(1, FLAN_T5_BASE, current=2)[0] == 1
    assert choose_num_threads(3, TINY_T5, current=1, environment="1")[0] == 3  # the setting beats the environment


def test_auto_keeps_an_explicit_omp_num_threads_and_null_keeps_torch_setting():
    threads, reason = choose_num_threads("auto", TINY_T5, current=2, environment="2")
    assert threads == 2 and "OMP_NUM_THREADS=2" in reason
    assert choose_num_threads("auto", TINY_T5, current=2, environment="")[0] == 1  # set but empty: not a choice
    assert choose_num_threads(None, TINY_T5, current=2)[0] == 2
    assert choose_num_threads(None, FLAN_T5_BASE, current=1)[0] == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_bad_values_are_one_line_errors_naming_the_flag(bad):
    errors = num_threads_errors(bad)
    assert len(errors) == 1 and errors[0].startswith("model.num_threads must be") and "\n" not in errors[0]
    with pytest.raises(ValueError, match="model.num_threads must be"):
        PPOModule(num_threads=bad)
    with pytest.raises(ValueError, match="model.num_threads must be"):
        SFTModule(num_threads=bad)
    from lit_rlhf.modules import RewardModelModule

    with pytest.raises(ValueError, match="model.num_threads must be"):
        RewardModelModule(num_threads=bad)


@pytest.mark.parametrize("good", [1, 8, "auto", None])
def test_good_values_pass(good):
    assert num_threads_errors(good) == []


def test_the_command_line_takes_a_count_auto_or_null_and_rejects_the_rest(capsys):
    for value, expected in (("3", 3), ("auto", "auto"), ("null", None)):
        with pytest.raises(SystemExit):
            run(["fit", "--model.num_threads", value, "--print_config"])
        assert f"num_threads: {'null' if expected is None else expected}\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        run(["fit", "--model.num_threads", "many"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "model.num_threads" in err


class FakePolicy:
    def __init__(self, parameters: int):
        self.parameters = parameters

    def parameter_counts(self) -> dict[str, int]:
        return {"all model parameters": self.parameters}


def test_use_num_threads_sets_torch_and_logs_the_choice_once(restore_threads, monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO):
        assert use_num_threads("auto", FakePolicy(TINY_T5)) == 1
    assert torch.get_num_threads() == 1
    lines = [r.getMessage() for r in caplog.records if "intra-op" in r.getMessage()]
    assert lines == ["Using 1 intra-op CPU thread (model.num_threads=auto: fewer than 10,000,000 parameters; the "
                     "model has 601,088 parameters; set model.num_threads to override)"]
    assert use_num_threads(2, FakePolicy(TINY_T5)) == 2 and torch.get_num_threads() == 2


def test_both_modules_apply_the_setting_in_configure_model(restore_threads, monkeypatch):
    # configure_model: where the policy is built, in every process after launch (Lightning calls it per stage)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    from lit_rlhf.modules import RewardModelModule

    for module in (PPOModule(log_samples_every=0), SFTModule(), RewardModelModule()):
        torch.set_num_threads(2)
        module.configure_model()  # auto, embedded tiny T5 (the reward model: tiny GPT-2)
        assert torch.get_num_threads() == 1
    torch.set_num_threads(1)
    PPOModule(num_threads=2).configure_model()
    assert torch.get_num_threads() == 2
