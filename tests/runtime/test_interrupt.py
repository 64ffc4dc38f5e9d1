"""Ctrl-C, then resume, is the uninterrupted run; ``last.ckpt`` is the run's last step.

One subprocess (``interrupt_worker.py``) runs each fit and sends itself a real SIGINT in the middle of a training
step: inside the PPO rollout, between two PPO mini-batch updates, between the backward pass and the optimizer
step of a DPO batch, in a DPO batch whose gradients are accumulated for the next one, in an SFT step of its
second epoch. The step finishes (with gradient accumulation, the batches up to the optimizer step), ``last.ckpt``
is saved after it and the run stops; resumed here with ``--ckpt_path``, it must end with the weights of a run that
was never interrupted, bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lit_rlhf.cli import run, run_dpo, run_sft
from conftest import dialogue_rows, good_bad_pairs, write_jsonl

TESTS = Path(__file__).parents[1]


def periodic_save(every: int) -> dict:
    """A ModelCheckpoint every ``every`` optimizer steps, with ``last.ckpt``."""
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": every, "save_last": True}}


TRAINER = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
           "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0}
PPO_CONFIG = {
    "seed_everything": 3,
    "trainer": {**TRAINER, "max_epochs": -1, "callbacks": [periodic_save(6)]},  # after PPO step 3 (2 updates each)
    "model": {"model_name": "embedded:tiny-t5", "ppo_steps": 4, "learning_rate": 1e-2, "mini_batch_size": 4,
              "log_samples_every": 0, "generation": {"min_new_tokens": 1, "max_new_tokens": [4, 10]},
              "reward": {"class_path": "lit_rlhf.rewards.ProfanityReward"}},
    # the bundled test split: 1,500 dialogues for each fit to filter and encode, not 12,460
    "data": {"batch_size": 8, "split": "test"},
}
DPO_CONFIG = {  # 36 training pairs: 9 batches an epoch, an optimizer step every second one
    "seed_everything": 3,
    "trainer": {**TRAINER, "max_steps": 4, "accumulate_grad_batches": 2, "callbacks": [periodic_save(3)]},
    "model": {"model_name": "embedded:tiny-gpt2", "learning_rate": 5e-3, "lora": {"r": 4}},
    "data": {"dataset": "pairs.jsonl", "batch_size": 4},
}
SFT_CONFIG = {  # 12 training pairs: 3 steps an epoch, each epoch a new order; dropout draws random numbers
    "seed_everything": 3,
    "trainer": {**TRAINER, "max_steps": 7, "callbacks": [periodic_save(3)]},
    "model": {"model_name": "embedded:tiny-t5", "learning_rate": 1e-2, "lr_schedule": "constant",
              "lora": {"r": 4, "dropout": 0.2}},
    "data": {"dataset": "dialogues.jsonl", "test_size": 0.2, "min_chars": 0, "batch_size": 4},
}
COMMANDS = {"ppo": (run, PPO_CONFIG, "adapter/adapter_model.safetensors"),
            "dpo": (run_dpo, DPO_CONFIG, "adapter/adapter_model.safetensors"),
            "sft": (run_sft, SFT_CONFIG, "adapter/adapter_model.safetensors")}
SIGINT_AT = {  # a training batch of each run (counted from 1), a point inside it, and the step saved after it
    "ppo-rollout": ("ppo", {"step": 2, "where": "rollout"}, 2),  # PPO steps
    "ppo-update": ("ppo", {"step": 2, "where": "update", "optimizer_step": 2}, 2),  # after a mini-batch's update
    "dpo-backward": ("dpo", {"step": 2, "where": "backward"}, 1),  # optimizer steps; batch 2 ends step 1
    "dpo-accumulating": ("dpo", {"step": 3, "where": "backward"}, 2),  # batch 3 waits for batch 4's step 2
    "sft-backward": ("sft", {"step": 4, "where": "backward"}, 4),  # the second epoch's first batch
}


def fit_args(command: str, root: Path) -> list[str]:
    return ["fit", "--config", str(root.parent / f"{command}.yaml"), "--trainer.default_root_dir", str(root)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of every fit: ``<command>-straight`` (never interrupted, in this process) and one per case of
    :data:`SIGINT_AT` (interrupted, in one subprocess)."""
    folder = tmp_path_factory.mktemp("interrupt")
    write_jsonl(folder / "pairs.jsonl", good_bad_pairs(40))
    write_jsonl(folder / "dialogues.jsonl", dialogue_rows(15))
    for command, (_, config, _) in COMMANDS.items():
        (folder / f"{command}.yaml").write_text(yaml.safe_dump(config))
    cwd = os.getcwd()
    os.chdir(folder)  # the DPO and SFT configs name their data files relative to it
    try:
        specs = []
        for case, (command, at, _) in SIGINT_AT.items():
            callback = {"class_path": "interrupt_worker.SigintAt", "init_args": at}
            specs.append({"command": command, "args": [*fit_args(command, folder / case),
                                                       f"--trainer.callbacks+={json.dumps(callback)}"]})
        # the worker imports this checkout's lit_rlhf and the tests' callback
        path = [str(TESTS.parent), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
        worker = subprocess.run([sys.executable, str(TESTS / "interrupt_worker.py"), json.dumps(specs)], cwd=folder,
                                env=env, capture_output=True, text=True, timeout=600)
        assert worker.returncode == 0, worker.stderr[-3000:]
        for command, (entry, _, _) in COMMANDS.items():
            entry(fit_args(command, folder / f"{command}-straight"))
    finally:
        os.chdir(cwd)
    return folder, worker.stderr


def weights(root: Path, command: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / COMMANDS[command][2]))


@pytest.mark.parametrize("case", list(SIGINT_AT))
def test_ctrl_c_inside_a_step_then_resume_is_the_uninterrupted_run(runs, case, monkeypatch):
    folder, log = runs
    command, _, saved_step = SIGINT_AT[case]
    root = folder / case
    assert (root / "exit_status").read_text() == "1"  # stopped (Lightning's status after Ctrl-C)
    assert not (root / "adapter").exists()  # it did not run to its end
    # the interrupted step was finished and saved, as a periodic checkpoint after it would be
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    done = ckpt["lit_rlhf"]["ppo_step"] if command == "ppo" else ckpt["global_step"]
    assert done == saved_step
    assert f"saved {root / 'checkpoints' / 'last.ckpt'}" in log

    monkeypatch.chdir(folder)
    COMMANDS[command][0]([*fit_args(command, root), "--ckpt_path", str(root / "checkpoints" / "last.ckpt")])
    expected, got = weights(folder / f"{command}-straight", command), weights(root, command)
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_last_ckpt_is_the_last_step(runs, command):
    """A periodic checkpoint ran before the end (its last.ckpt at PPO step 3 of 4, DPO step 3 of 4, SFT step 6 of
    7): last.ckpt is still the end of fit, with the weights the run exported (what ``test --ckpt_path last.ckpt``
    measures)."""
    folder, _ = runs
    root = folder / f"{command}-straight"
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    if command == "ppo":
        assert ckpt["lit_rlhf"]["ppo_step"] == PPO_CONFIG["model"]["ppo_steps"]
    else:
        assert ckpt["global_step"] == COMMANDS[command][1]["trainer"]["max_steps"]
    exported = weights(root, command)  # peft's names: base_model.model.<module>.lora_A.weight
    stored = {k.split("base_model.model.", 1)[1].replace(".default.", "."): v
              for k, v in ckpt["state_dict"].items() if "lora_" in k}
    assert stored.keys() == {k.removeprefix("base_model.model.") for k in exported}
    assert [k for k, v in exported.items() if not torch.equal(stored[k.removeprefix("base_model.model.")], v)] == []


def test_resuming_a_finished_run_has_nothing_to_do(runs, monkeypatch, capsys):
    folder, _ = runs
    monkeypatch.chdir(folder)
    last = folder / "ppo-straight" / "checkpoints" / "last.ckpt"
    run([*fit_args("ppo", folder / "ppo-again"), "--ckpt_path", str(last)])
    assert f"Nothing to do: {last} has done 4 of model.ppo_steps=4 PPO steps" in capsys.readouterr().err
