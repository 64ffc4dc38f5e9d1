"""What the LightningModules share (``RLHFModule``): their settings saved as hyperparameters, checks of the
model they train, checkpoints without the frozen weights, the export at the end of fit; and building the policy
in ``configure_model`` (``BuildsPolicy``)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.models import build_policy, finetune_errors, model_source_errors
from lit_rlhf.runtime import distributed as dist
from lit_rlhf.settings import LoraSettings, dtype_errors, plain


def policy_errors(dtype: str, lora: LoraSettings, finetune: str = "lora", init_from_scratch: bool = False,
                  **sources: str | None) -> list[str]:
    """Cheap checks of the model a module trains, before anything is built: ``finetune`` (``finetune_errors``), its
    dtype (``dtype_errors``), then its sources (``model_source_errors``), each keyword (``model_name``,
    ``init_adapter``, ``reference_model``) naming its ``model.`` flag."""
    errors = finetune_errors(finetune, init_from_scratch) + dtype_errors(dtype, finetune, lora.bias)
    return errors + model_source_errors(
        {f"model.{flag}": source for flag, source in sources.items()})


def check_checkpoint_kind(every_weight: bool, state_dict: dict[str, Any]) -> None:
    """Refuse a checkpoint of a LoRA run for a module that trains ``every_weight``, or the other way round: with
    non-strict loading (a LoRA checkpoint holds only the adapter) either would load nothing and go on untrained."""
    lora = any("lora_" in key for key in state_dict)
    if every_weight and lora:
        raise ValueError("This checkpoint holds a LoRA adapter, but model.finetune=full trains every weight: "
                         "load it with the run's own model.finetune=lora")
    if not every_weight and not lora and any(key.startswith("policy.model.") for key in state_dict):
        raise ValueError("This checkpoint holds every weight of a model.finetune=full run, but model.finetune=lora "
                         "trains an adapter: load it with model.finetune=full")


def check_precision(precision: Any, dtype: str = "float32", device: Any = None, gradient_scaler: bool = False) -> None:
    """Refuse a trainer precision or weight dtype that training cannot use well; the message names the flags.

    * ``bf16-true`` / ``16-true``: Lightning casts the whole module, trained adapter and value head included, so
      the optimizer would update half-precision weights, where small updates round away. ``model.dtype=bfloat16``
      halves the frozen base and keeps the trained weights float32.
    * float16 mixed precision, unless the optimization uses a ``gradient_scaler`` (SFT's automatic optimization):
      PPO's guards read the gradients before a GradScaler would unscale them (scaled overflows would count as
      unsafe updates and the scale would never adapt). bfloat16 has float32's range and needs no scaler.
    * ``model.dtype=float16`` on a CPU (``device``): no faster than float32 there (bfloat16 has AVX512-BF16 and
      AMX), with float16's narrow range and no gradient scaling. On a GPU without bfloat16 it stays available."""
    precision = str(precision)
    if precision in ("16-true", "bf16-true"):
        raise ValueError(
            f"trainer.precision={precision!r} casts the trained weights (adapter, value head) and the optimizer "
            "state to half precision, where small updates round away; use model.dtype=bfloat16 (frozen base in "
            "bfloat16, trained weights float32) with trainer.precision=32-true or bf16-mixed"
        )
    if precision.startswith("16") and not gradient_scaler:
        raise ValueError(
            f"trainer.precision={precision!r} (float16 with a gradient scaler) is not supported by lit_rlhf's "
            "manual PPO update; use trainer.precision=bf16-mixed (which needs no loss scaling) or model.dtype=bfloat16"
        )
    if dtype == "float16" and str(getattr(device, "type", device)) == "cpu":
        raise ValueError(
            "model.dtype=float16 on a CPU is no faster than float32 and trains without gradient scaling; use "
            "model.dtype=bfloat16 (fast on CPUs with AVX512-BF16 or AMX) or float32"
        )


class RLHFModule(L.LightningModule):
    """The base of lit_rlhf's LightningModules.

    * ``save_settings``: the ``__init__`` arguments as hyperparameters, settings groups as plain dicts;
    * ``weight_dtype``: the dtype ``model.dtype`` resolved to on the run's device (``configure_model``);
    * checkpoints of a LoRA run (every module but a ``finetune="full"`` one) hold only the trainable weights: the
      frozen base loads from ``model_name`` again; with ``keeps_rng`` they also keep every process's RNG states
      (dropout draws from them), which resuming restores, so that a resumed run continues exactly;
    * ``on_fit_end`` exports the result (``write_export``) to ``export_path`` on every rank: log_dir broadcasts
      from rank zero, and gathering sharded weights is a collective.
    """

    export_note = "{what} exported to {target}"
    """What ``on_fit_end`` logs (``export_message``; ``what``: Adapter or Model)."""
    keeps_rng = False

    def __init__(self) -> None:
        super().__init__()
        self.weight_dtype = "float32"  # model.dtype as resolved on the run's device (configure_model)
        self.strict_loading = False  # checkpoints hold only the trainable weights (see on_save_checkpoint)

    def save_settings(self, ignore: tuple[str, ...] = (), **groups: Any) -> None:
        """``save_hyperparameters`` of the calling ``__init__``'s arguments but ``ignore``, with its settings
        ``groups`` (``lora``, ...) as plain dicts, which keep checkpoints loadable with
        ``torch.load(weights_only=True)`` (resuming uses it)."""
        self.save_hyperparameters(ignore=[*ignore, *groups], frame=inspect.currentframe().f_back)
        self.hparams.update({name: plain(group) for name, group in groups.items()})

    def setup(self, stage: str) -> None:
        dist.check_trainer_clipping(self._trainer)  # before the model loads

    def on_fit_start(self) -> None:
        # 16-mixed is fine with automatic optimization: it unscales the gradients
        check_precision(self.trainer.precision, self.weight_dtype, self.device,
                        gradient_scaler=self.automatic_optimization)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if not self.trains_every_weight:
            checkpoint["state_dict"] = dist.trainable_state(self, state)
        else:  # a full fine-tune keeps every trained weight (tied ones too), not a frozen reference model's
            checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("policy.reference.")}
        if self.keeps_rng:
            checkpoint["lit_rlhf"] = dist.checkpoint_rng(self._trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_kind(self.trains_every_weight, checkpoint.get("state_dict") or {})
        if self.keeps_rng:
            dist.restore_checkpoint_rng(self._trainer, checkpoint.get("lit_rlhf") or {})

    @property
    def trains_every_weight(self) -> bool:
        """``finetune="full"`` (a module without that setting trains an adapter)."""
        return self.hparams.get("finetune", "lora") == "full"

    @property
    def export_name(self) -> str:
        """The export's folder in the run's log directory (``export_path`` without ``export_dir``): ``model`` for
        a module that trains every weight, else ``adapter``."""
        return "model" if self.trains_every_weight else "adapter"

    def export_path(self) -> Path:
        """Where ``on_fit_end`` writes the result (``export_dir``, or ``export_name`` in the run's log directory)."""
        if self.hparams.get("export_dir") is not None:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / self.export_name

    def on_fit_end(self) -> None:
        target = self.export_path()
        self.write_export(target)
        rank_zero_info(self.export_message(target))

    def write_export(self, target: Path) -> None:
        """Save the trained policy (``dist.export_policy``) into ``target``."""
        dist.export_policy(self.trainer, self.policy, target)

    def export_message(self, target: Path) -> str:
        what = "Model" if self.export_name == "model" else "Adapter"
        return self.export_note.format(what=what, target=target)


class BuildsPolicy(RLHFModule):
    """A module that trains a :class:`Policy`: the one described by ``self.policy_kwargs`` is built in
    ``configure_model``, once per process, inside the strategy's init context (where FSDP and DeepSpeed ZeRO-3
    create sharded or meta-device weights) and before a checkpoint's weights are loaded; a second call builds
    nothing. Each call also sets torch's CPU threads for the policy's size (``model.num_threads``). Code that
    uses ``self.policy`` outside a Trainer (scripts, tests) gets it built on first use. The host sets
    ``policy_kwargs`` and has ``hparams.dtype`` and ``hparams.num_threads``; ``weight_dtype`` is the dtype
    ``model.dtype`` resolved to."""

    def configure_model(self) -> None:
        from lit_rlhf.runtime import use_num_threads

        if "policy" not in self._modules:
            self._build_policy()
        # in every process, after launch; also when the policy was built earlier
        use_num_threads(self.hparams.num_threads, self.policy, self._trainer)

    def _build_policy(self) -> None:
        """The policy, in the base dtype ``model.dtype`` resolves to on the run's device."""
        device = getattr(getattr(self._trainer, "strategy", None), "root_device", None)  # None: no trainer yet
        self.policy, self.weight_dtype = build_policy(self.policy_kwargs, self.hparams.dtype, device)
        self.policy.train(self.training)  # the module's mode, also when it was set before the build

    def __getattr__(self, name: str):
        if name == "policy" and "policy" not in self.__dict__.get("_modules", {}) and "policy_kwargs" in self.__dict__:
            self._build_policy()
        return super().__getattr__(name)
