"""What the command line shows while a run goes: a progress bar of PPO steps, and the model summary.

A PPO run stops after ``model.ppo_steps`` steps, usually long before the prompt stream's epoch ends, and
``max_epochs`` is -1: Lightning's bars showed ``Epoch 0/-2 ... 100/501`` and an ETA for the 501 batches.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table


class RunProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without ``v_num`` (the run folder's version number, not a measurement)."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class PPOProgressBar(RunProgressBar):
    """Lightning's tqdm bar that counts the module's ``ppo_step`` up to ``model.ppo_steps``, so that its rate and
    ETA are those of the run. One bar for the whole run (a run longer than the prompt stream crosses epochs);
    a resumed run starts at its checkpoint's step and times only the steps it runs."""

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description("PPO steps")
        return bar

    def on_train_start(self, trainer, pl_module) -> None:
        # here, not at the epoch's start: a run resumed mid-epoch (every PPO run) starts no epoch, so its bar would
        # show no total until the prompt stream's next epoch
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        done = int(getattr(pl_module, "ppo_step", 0))  # restored from the checkpoint by now
        bar.reset(total=pl_module.hparams.get("ppo_steps"))
        bar.initial = bar.n = bar.last_print_n = done  # tqdm's rate is (n - initial) / elapsed
        bar.set_description("PPO steps")
        bar.refresh()

    def on_train_epoch_start(self, trainer, pl_module, *args: Any) -> None:
        pass  # one bar for the whole run: Lightning's would restart at 0 with the epoch's batch count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is None:
            return
        step = int(getattr(pl_module, "ppo_step", batch_idx + 1))
        if self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("ppo_step", None)  # the bar's own count
        return metrics


class ModelSummaryWithoutFlops(ModelSummary):
    """Lightning's model summary (layers, parameters, size) without its FLOPs column and total.

    Lightning counts FLOPs only by running the module's ``example_input_array``, which lit_rlhf's modules do
    not have (a policy's input is a generation), so both always read 0."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
        model_size: float, total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        lines = [line for line in table.splitlines() if not line.endswith("Total Flops")]
        rank_zero_info("\n" + "\n".join(lines))
