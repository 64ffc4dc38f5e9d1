"""A 2-process DDP fit on CPU (gloo) through the ``lit-rlhf`` CLI, launched by ``tests/runtime/test_ddp.py``.

    python tests/ddp_worker.py OUT_DIR [extra lit-rlhf fit flags]

Run it as a script, not inside pytest: Lightning's ``ddp`` launcher starts rank 1 by re-executing this
command line. The fit runs in the current directory (``logs/`` is written there). Each rank writes
``OUT_DIR/rank{r}.pt`` with what the test compares across ranks: the trainable weights before and after,
beta before and after, the PPO step, the ids of the prompts it saw, the reward and KL it logged per step,
over how many processes each mini-batch's loss was normalised, the module's reduction helpers applied to data that differs per rank, and whether the process group was
still up when ``run()`` returned; how many backward passes, optimizer steps and backward passes whose gradients
DDP all-reduced (a comm hook sees each bucket; the last bucket of a backward counts it) it ran.
"""

from __future__ import annotations

import os
import sys

# One thread per process: two processes share two cores, and more threads only oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import inspect  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_rlhf import objectives  # noqa: E402
from lit_rlhf.cli import config_path, run  # noqa: E402

torch.set_num_threads(1)

STRATEGY_OVERLAY = Path(__file__).parents[1] / "configs" / "strategy" / "ddp.yaml"


def reduction_probe_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank data for the reduction helpers: ranks hold different values and different row counts."""
    generator = torch.Generator().manual_seed(100 + rank)
    rows = 3 + 2 * rank
    x = torch.randn(rows, 5, generator=generator) * (1 + rank) + 3 * rank  # [rows, 5]
    mask = (torch.rand(rows, 5, generator=generator) > 0.3).long()
    mask[:, 0] = 1  # every row has a token
    return x, mask


class Probe(L.Callback):
    """Records what each rank did; applies the module's reduction helpers while the process group is up."""

    def on_fit_start(self, trainer, pl_module):
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.initial_beta = pl_module.kl_ctl.value
        self.prompt_ids: list[str] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompt_ids.extend(batch["id"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append({k: float(trainer.callback_metrics[k]) for k in ("reward", "kl")})

    def on_train_start(self, trainer, pl_module):
        # every statistic the module logs for a step, as each rank computed it
        self.step_stats: list[dict[str, float]] = []
        original = pl_module._step_stats

        def recording(*args):
            stats = original(*args)
            self.step_stats.append({k: float(v) for k, v in stats.items()})
            return stats

        pl_module._step_stats = recording
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.counts = {"backwards": 0, "optimizer_steps": 0, "synced_backwards": 0}

        def counting(state, bucket):  # DDP's own all-reduce, counted once per synced backward
            self.counts["synced_backwards"] += bucket.is_last()
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counting)
        self.loss_processes: list[float] = []
        self.objective = objectives.ppo_objective
        objectives.ppo_objective = self.recording_objective

    def on_before_backward(self, trainer, pl_module, loss):
        self.counts["backwards"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.counts["optimizer_steps"] += 1

    def recording_objective(self, *args, **kwargs):
        """ppo_objective, recording over how many processes its reduce function sums (1.0: the loss would be
        normalised per process). Every rank calls the objective for every mini-batch: the probe's reduction
        is a collective taken in step."""
        reduce_fn = inspect.signature(self.objective).bind(*args, **kwargs).arguments.get("reduce_fn", lambda t: t)
        self.loss_processes.append(float(reduce_fn(torch.ones(1))))
        return self.objective(*args, **kwargs)

    def on_train_end(self, trainer, pl_module):
        objectives.ppo_objective = self.objective
        x, mask = reduction_probe_data(trainer.global_rank)
        # two statistics through one stacked reduction: per-row first column, and the masked entries
        mean, var, n = objectives.masked_moments_many([(x[:, 0], torch.ones_like(x[:, 0])), (x, mask)], pl_module._reduce)
        self.reduced = {
            "whitened": objectives.masked_whiten(x, mask, reduce_fn=pl_module._reduce),
            "mean_std_n": torch.stack([mean, var.sqrt(), n]).float(),
            # the helper must not change its input (the strategy reduces in place)
            "input_unchanged": torch.tensor(torch.equal(x, reduction_probe_data(trainer.global_rank)[0])),
        }


def main(out_dir: str, extra: list[str]) -> None:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         # every checkpoint kept: a test resumes from one taken before the end
         "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": -1}},
        {"class_path": "__main__.Probe"},
    ]
    cli = run([
        "fit", "--config", config_path("embedded_t5.yaml"), "--config", str(STRATEGY_OVERLAY),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.callbacks", json.dumps(callbacks),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.ppo_steps", "3", "--model.generation.max_new_tokens", "[4, 8]", "--data.batch_size", "8",
        "--model.mini_batch_size", "4", "--model.learning_rate", "1e-2", "--model.log_samples_every", "1",
        # a short horizon so that beta visibly moves in three steps
        "--model.ppo.adaptive_kl", "true", "--model.ppo.kl_horizon", "32",
        "--model.fast_rollout", "false",  # exact mode: the first step's KL is exactly 0
        "--data.split", "test",  # the bundled test split: 1,500 dialogues to filter and encode, not 12,460
        *extra,
    ])
    probe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Probe")
    module = cli.model
    record = {
        "world_size": cli.trainer.world_size,
        "strategy": type(cli.trainer.strategy).__name__,
        "process_group_alive_after_run": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "initial": probe.initial,
        "final": {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
        "initial_beta": probe.initial_beta,
        "beta": module.kl_ctl.value,
        "ppo_step": module.ppo_step,
        "prompt_ids": probe.prompt_ids,
        "logged": probe.logged,
        "step_stats": probe.step_stats,
        "loss_processes": probe.loss_processes,
        "probe_input": reduction_probe_data(cli.trainer.global_rank),
        "reduced": probe.reduced,
        "counts": probe.counts,
        "log_dir": cli.trainer.log_dir,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{cli.trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
