"""Runs lit-rlhf commands that interrupt themselves with a real Ctrl-C (SIGINT sent to this process) at a chosen
point of a training step, for ``tests/runtime/test_interrupt.py``.

    python interrupt_worker.py RUNS_JSON

RUNS_JSON: a list of ``{"command": "ppo" | "dpo" | "rm" | "sft", "args": [...]}``; each runs in turn (the CLI's
``SystemExit`` caught) and its exit status is written to ``<default_root_dir>/exit_status``.
"""

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L


class SigintAt(L.Callback):
    """Sends SIGINT to this process during training step ``step`` (counted from 1 in this run): ``where="rollout"``
    inside the reward's scoring of the rollout, ``where="update"`` right before optimizer step ``optimizer_step``
    of that training step (a PPO step takes several: with 2, the first mini-batch update is already made),
    ``where="backward"`` after its backward pass (also a batch whose gradients are accumulated)."""

    def __init__(self, step: int = 2, where: str = "update", optimizer_step: int = 1):
        self.step, self.where, self.optimizer_step = step, where, optimizer_step
        self.batches = self.optimizer_steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1
        if self.batches == self.step and self.where == "rollout":
            reward, compute = pl_module.reward, pl_module.reward.compute

            def interrupting_compute(*args, **kwargs):
                reward.compute = compute  # once
                os.kill(os.getpid(), signal.SIGINT)
                return compute(*args, **kwargs)

            reward.compute = interrupting_compute

    def on_after_backward(self, trainer, pl_module):
        if self.batches == self.step and self.where == "backward":
            os.kill(os.getpid(), signal.SIGINT)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.batches == self.step and self.where == "update":
            self.optimizer_steps += 1
            if self.optimizer_steps == self.optimizer_step:
                os.kill(os.getpid(), signal.SIGINT)


def main() -> None:
    from lit_rlhf.cli import run, run_dpo, run_rm, run_sft

    commands = {"ppo": run, "dpo": run_dpo, "rm": run_rm, "sft": run_sft}
    for spec in json.loads(sys.argv[1]):
        args = spec["args"]
        root = Path(args[args.index("--trainer.default_root_dir") + 1])
        try:
            commands[spec["command"]](args)
            status = 0
        except SystemExit as stop:  # Lightning exits with 1 after Ctrl-C
            status = stop.code
        root.mkdir(parents=True, exist_ok=True)
        (root / "exit_status").write_text(str(status))


if __name__ == "__main__":
    main()
