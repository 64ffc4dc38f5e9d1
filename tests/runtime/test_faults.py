"""Fault injection: each protection of a run against crashes and bad numbers, and what it does (bad input:
test_bad_input.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lit_rlhf.data import DialogSumDataModule, PromptStreamSampler
from lit_rlhf.rewards import Reward
from lit_rlhf.runtime import AtomicCheckpointIO
from lit_rlhf.settings import PPOSettings
from small_runs import ScriptedReward, fit, small_module


class WrongCountReward(Reward):
    def compute(self, prompts, responses, references):
        return torch.zeros(len(responses) + 1)


# ------------------------------------------------------------------ process killed mid-run, then resumed

RUN_CONFIG = {
    "seed_everything": 3,
    "trainer": {
        # validation after every 2nd PPO step: it samples too, and must not shift the training run's randomness
        "accelerator": "cpu", "devices": 1, "max_epochs": -1, "limit_val_batches": 1, "val_check_interval": 2,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "logger": False,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"every_n_train_steps": 2, "save_last": True, "save_top_k": -1,
                                     "filename": "{step}"}}],
    },
    "model": {"model_name": "embedded:tiny-t5", "ppo_steps": 6, "learning_rate": 1e-2, "mini_batch_size": 4,
              "log_samples_every": 0, "generation": {"min_new_tokens": 1, "max_new_tokens": [6, 12]},
              "reward": {"class_path": "lit_rlhf.rewards.ProfanityReward"}},
    # the bundled test split: 1,500 dialogues for each process to filter and encode, not 12,460
    "data": {"batch_size": 8, "eval_batch_size": 4, "split": "test"},
}


def launch(workdir: Path, *extra: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "run.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lit_rlhf.cli", "fit", "--config", "run.yaml",
         "--trainer.default_root_dir", str(workdir), *extra],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def adapter_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "adapter" / "adapter_model.safetensors"))


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    # Uninterrupted reference run of 6 PPO steps, and beside it the same run, SIGKILLed right after the
    # checkpoint of PPO step 3 (optimizer step 6) appears (separate processes: neither changes the other).
    ref, victim = launch(tmp_path / "straight"), launch(tmp_path / "killed")
    try:
        check_killed_and_resumed(tmp_path, ref, victim)
    finally:
        for proc in (ref, victim):
            proc.kill()  # a no-op for a process that has ended; stops one a failed check left running


def check_killed_and_resumed(tmp_path: Path, ref: subprocess.Popen, victim: subprocess.Popen) -> None:
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while not (ckpt_dir / "step=6.ckpt").exists():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists()
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)  # complete, and loadable the safe way
    killed_at = ckpt["lit_rlhf"]["ppo_step"]
    assert 2 <= killed_at < 6  # last.ckpt is written just after step=6.ckpt: either step is a complete file

    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]
    resumed = launch(tmp_path / "killed", "--ckpt_path", str(ckpt_dir / "last.ckpt"))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    final = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert final["lit_rlhf"]["ppo_step"] == 6
    assert final["lit_rlhf"]["kl_controller"] == torch.load(
        tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["lit_rlhf"]["kl_controller"]

    # Same prompts, RNG, optimizer and KL state after resume: on CPU the weights come out bit-identical.
    expected, got = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "killed")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_stream_sampler_resumes_at_the_module_position():
    position = {"k": 0}
    full = list(PromptStreamSampler(40, 4, num_replicas=1, rank=0, seed=5, shuffle=True,
                                    position_fn=lambda: position["k"]))
    assert sorted(full) == list(range(40))
    position["k"] = 3  # three rollout batches consumed: start at the fourth
    assert list(PromptStreamSampler(40, 4, 1, 0, 5, True, lambda: position["k"])) == full[12:]
    position["k"] = 10 + 2  # second epoch: a new permutation, resumed at its third batch
    second = list(PromptStreamSampler(40, 4, 1, 0, 5, True, lambda: 10))
    assert second != full and sorted(second) == list(range(40))
    assert list(PromptStreamSampler(40, 4, 1, 0, 5, True, lambda: position["k"])) == second[8:]
    # two processes split each global batch of 2 x 4 prompts between them, with no overlap
    ranks = [list(PromptStreamSampler(40, 4, 2, r, 5, True, lambda: 0)) for r in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 20


# ------------------------------------------------------------------ interrupted writes


def test_interrupted_checkpoint_write_keeps_the_last_good_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # the process is stopped in the middle of the write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_interrupted_adapter_export_keeps_the_previous_export(tmp_path, monkeypatch):
    module = small_module()
    target = tmp_path / "adapter"
    module.policy.export(target)
    before = sorted(p.name for p in target.iterdir())

    def dies(directory, **kwargs):
        (Path(directory) / "adapter_config.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(module.policy, "save_adapter", dies)
    with pytest.raises(KeyboardInterrupt):
        module.policy.export(target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert (target / "adapter_config.json").read_text().startswith("{\n")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


# ------------------------------------------------------------------ numerical guards


def test_nan_reward_skips_the_step_and_the_run_goes_on(tmp_path):
    module = small_module(reward=ScriptedReward(nan_calls={0}), ppo_steps=3)
    trainer = fit(module, tmp_path)
    assert module.ppo_step == 3 and module.skips.steps == 1
    assert trainer.global_step == 2 * 2  # two PPO steps with 2 mini-batches each; the NaN step updated nothing


def test_consecutive_nan_rewards_stop_the_run_with_advice(tmp_path):
    module = small_module(reward=ScriptedReward(nan_calls=range(100)), ppo_steps=10, max_consecutive_skips=3)
    with pytest.raises(RuntimeError, match=r"3 PPO updates in a row were skipped.*non-finite scores.*learning_rate"):
        fit(module, tmp_path)


def test_nan_logits_skip_updates_then_stop(tmp_path):
    module = small_module(ppo_steps=10)
    lm_head = module.policy.model.get_output_embeddings()
    lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    with pytest.raises(RuntimeError, match="non-finite log-probabilities or values in the rollout"):
        fit(module, tmp_path)
    assert module.skips.steps == 3


def test_nan_gradient_skips_the_update(tmp_path):
    module = small_module(ppo_steps=1, max_consecutive_skips=10)
    weights = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    some_lora = next(p for n, p in module.policy.named_parameters() if "lora_A" in n)
    some_lora.register_hook(lambda grad: grad * float("nan"))
    trainer = fit(module, tmp_path)
    assert module.skips.updates == 2 and trainer.global_step == 0
    for name, p in module.policy.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, weights[name]), name  # nothing stepped with a NaN gradient


def test_ratio_above_threshold_skips(tmp_path):
    # any mean ratio (~1) exceeds a threshold of 0.5: every mini-batch is skipped, and the run stops
    module = small_module(ppo=PPOSettings(ratio_threshold=0.5), ppo_steps=10, max_consecutive_skips=4)
    with pytest.raises(RuntimeError, match="ratio_threshold=0.5"):
        fit(module, tmp_path)
    assert module.skips.updates == 4


def test_reward_with_the_wrong_count_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"WrongCountReward.compute returned shape \(9,\), expected \(8,\)"):
        fit(small_module(reward=WrongCountReward()), tmp_path)


# ------------------------------------------------------------------ Ctrl-C and crashes leave a resumable last.ckpt


class StopAfter(L.Callback):
    """Raises ``exception`` after PPO step ``step`` (as Ctrl-C or a crash would, between two steps)."""

    def __init__(self, step: int, exception: BaseException):
        self.step, self.exception = step, exception

    def on_train_batch_end(self, trainer, pl_module, *args):
        if pl_module.ppo_step == self.step:
            raise self.exception


def checkpointed_trainer(tmp_path: Path, *callbacks) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_rlhf.runtime import InterruptCheckpoint

    periodic = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1000, save_last=True)
    return L.Trainer(default_root_dir=tmp_path, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=[periodic, InterruptCheckpoint(), *callbacks])


@pytest.mark.parametrize("exception", [KeyboardInterrupt(), RuntimeError("crash")], ids=["ctrl-c", "crash"])
def test_an_interrupted_fit_leaves_a_resumable_last_ckpt(tmp_path, exception):
    data = lambda: DialogSumDataModule(model_name="embedded:tiny-t5", batch_size=8, split="test")  # noqa: E731
    expected = SystemExit if isinstance(exception, KeyboardInterrupt) else RuntimeError  # Lightning exits on Ctrl-C
    with pytest.raises(expected):
        checkpointed_trainer(tmp_path, StopAfter(1, exception)).fit(small_module(ppo_steps=3), data())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["lit_rlhf"]["ppo_step"] == 1  # the periodic save never ran
    resumed = small_module(ppo_steps=3)
    trainer = checkpointed_trainer(tmp_path)
    trainer.fit(resumed, data(), ckpt_path=last)
    assert resumed.ppo_step == 3
    assert torch.load(last, weights_only=True)["lit_rlhf"]["ppo_step"] == 3  # kept (and updated) at the end


class CrashInsideStep(L.Callback):
    """Raises between the two mini-batch updates of PPO step 2 (a half-updated step)."""

    def __init__(self):
        self.updates = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.updates += pl_module.ppo_step == 1  # ppo_step counts the steps done
        if self.updates == 2:
            raise RuntimeError("crash")


def test_an_error_inside_a_step_saves_nothing_half_updated(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="crash"):
        checkpointed_trainer(tmp_path, CrashInsideStep()).fit(small_module(ppo_steps=3), DialogSumDataModule(
            model_name="embedded:tiny-t5", batch_size=8, split="test"))
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # nor any other checkpoint: none was due
    assert "inside a training step, whose state is half-updated: nothing saved" in capsys.readouterr().err


def test_a_failure_before_the_first_step_saves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="early"):
        checkpointed_trainer(tmp_path, FailAtStart()).fit(small_module(), DialogSumDataModule(
            model_name="embedded:tiny-t5", batch_size=8, split="test"))
    assert not (tmp_path / "checkpoints").exists()


class FailAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        raise RuntimeError("early")


def test_progress_bar_counts_ppo_steps_to_ppo_steps(tmp_path):
    from lit_rlhf.runtime import PPOProgressBar

    bar = PPOProgressBar()
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[bar])
    trainer.fit(small_module(ppo_steps=2), DialogSumDataModule(model_name="embedded:tiny-t5", batch_size=8, split="test"))
    # not the epoch's 1000 batches: the run's 2 PPO steps, so the rate and ETA are the run's
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (2, 2)
    assert bar.train_progress_bar.desc.startswith("PPO steps")


class BarAtFirstStep(L.Callback):
    """What the progress bar shows when the run's first step starts: (steps done, total)."""

    def __init__(self, bar):
        self.bar, self.shown = bar, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.shown is None:
            self.shown = (self.bar.train_progress_bar.n, self.bar.train_progress_bar.total)


def test_a_resumed_run_s_progress_bar_shows_its_total_from_the_start(tmp_path):
    from lit_rlhf.runtime import PPOProgressBar

    from lightning.pytorch.callbacks import ModelCheckpoint

    data = lambda: DialogSumDataModule(model_name="embedded:tiny-t5", batch_size=8, split="test")  # noqa: E731
    # a periodic checkpoint after PPO step 1 (2 optimizer steps), in the middle of the prompt stream's epoch
    periodic = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, filename="{step}",
                               save_top_k=-1)
    fit(small_module(ppo_steps=2), tmp_path, periodic)
    bar = PPOProgressBar()
    shown = BarAtFirstStep(bar)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[bar, shown])
    trainer.fit(small_module(ppo_steps=3), data(), ckpt_path=tmp_path / "checkpoints" / "step=2.ckpt")
    assert shown.shown == (1, 3)  # resumed after step 1 of 3: "1/3", not "1/?"
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)
