"""Small PPO runs the fault-injection tests share: a tiny-T5 module, a plain fit and a reward that returns NaN on
the calls it is told to."""

from pathlib import Path

import lightning as L
import torch

from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.rewards import ProfanityReward, Reward
from lit_rlhf.settings import GenerationSettings

SHORT = GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 10))


def small_module(**kwargs) -> PPOModule:
    defaults = dict(model_name="embedded:tiny-t5", reward=ProfanityReward(), generation=SHORT, ppo_steps=2,
                    rollout_batch_size=8, mini_batch_size=4, learning_rate=1e-2, log_samples_every=0,
                    export_adapter=False, max_consecutive_skips=3)
    defaults.update(kwargs)
    return PPOModule(**defaults)


def fit(module: PPOModule, tmp_path: Path, *callbacks: L.Callback) -> L.Trainer:
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(callbacks),
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks))
    # the bundled test split: 1,500 dialogues to filter and encode, not 12,460
    trainer.fit(module, DialogSumDataModule(model_name=module.hparams.model_name, batch_size=8, split="test"))
    return trainer


class ScriptedReward(Reward):
    """Returns NaN for the calls listed in ``nan_calls`` (0-based), a fixed score otherwise."""

    def __init__(self, nan_calls=(), value=1.0):
        super().__init__()
        self.nan_calls, self.value, self.calls = set(nan_calls), value, 0

    def compute(self, prompts, responses, references):
        call, self.calls = self.calls, self.calls + 1
        fill = float("nan") if call in self.nan_calls else self.value
        return torch.full((len(responses),), fill)
