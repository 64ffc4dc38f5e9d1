"""The ``lit-rlhf`` command: LightningCLI over PPOModule and DialogSumDataModule.

    lit-rlhf fit                                   # the embedded offline default (tiny T5, bundled DialogSum)
    lit-rlhf fit --config configs/detox_flan_t5.yaml
    lit-rlhf fit --print_config                    # the whole run's settings
    lit-rlhf test --config ... --ckpt_path ...     # reward, KL and response length on the held-out split

With no ``--config``, ``fit``/``validate``/``test`` start from the packaged embedded default
(``lit_rlhf/configs/embedded_t5.yaml``); command-line flags still override it.
"""

from __future__ import annotations

import sys
import warnings
from importlib import resources

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_rlhf.checkpoint import AtomicCheckpointIO

from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.module import PPOModule

SUBCOMMANDS_WITH_DEFAULT = ("fit", "validate", "test")
DESCRIPTION = (
    "lit-rlhf: RLHF fine-tuning of Hugging Face language models with PPO (LoRA + value head) against a reward "
    "model, as a Lightning module. `lit-rlhf fit` alone runs the embedded offline default; "
    "`lit-rlhf fit --config configs/detox_flan_t5.yaml` the FLAN-T5 detoxification recipe; "
    "`lit-rlhf fit --help` lists every setting."
)

# The settings dataclasses (lora, generation, ppo) document each field in a docstring under it: show those
# in --help too.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

# PPOModule steps the optimizer on purpose inside training_step, so a checkpoint after the step is wanted.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def embedded_config_path() -> str:
    """Absolute path of the packaged embedded default config."""
    return str(resources.files("lit_rlhf.configs").joinpath("embedded_t5.yaml"))


class LitRLHFCLI(LightningCLI):
    """LightningCLI with the values two parts share given once and linked, atomic checkpoint files, and
    start-up checks that run before anything is written."""

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        # a killed run must never leave a truncated last.ckpt behind (see lit_rlhf.checkpoint)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        check_trainer_settings(self.trainer)

    def before_validate(self) -> None:
        check_trainer_settings(self.trainer)

    def before_test(self) -> None:
        check_trainer_settings(self.trainer)

    def before_predict(self) -> None:
        add_prediction_writer(self.trainer)

    def add_arguments_to_parser(self, parser) -> None:
        # the policy model also picks the data module's tokenizer and padding side
        parser.link_arguments("model.model_name", "data.model_name")
        # the module checks its mini-batch against the rollout batch the data module produces
        parser.link_arguments("data.batch_size", "model.rollout_batch_size")


def add_prediction_writer(trainer) -> None:
    """``predict`` writes ``predictions.jsonl`` into the run's log directory unless a writer is configured."""
    from lightning.pytorch.callbacks import BasePredictionWriter

    from lit_rlhf.callbacks import PredictionWriter

    if not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
        trainer.callbacks.append(PredictionWriter())


def check_trainer_settings(trainer) -> None:
    """Trainer settings that would make a run silently do nothing."""
    if trainer.max_steps == 0:
        raise ValueError("trainer.max_steps=0 runs no PPO step; use model.ppo_steps to set the run length")
    if trainer.max_epochs == 0:
        raise ValueError("trainer.max_epochs=0 runs no PPO step; leave it at -1 and set model.ppo_steps")


def with_default_config(args: list[str]) -> list[str]:
    """Insert the embedded default config after the subcommand when the user gave no config."""
    if not args or args[0] not in SUBCOMMANDS_WITH_DEFAULT:
        return args
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        return args
    return [args[0], "--config", embedded_config_path(), *args[1:]]


def run(args: list[str] | None = None) -> LitRLHFCLI:
    """Parse ``args`` (default: the command line), run the subcommand and return the CLI object."""
    if args is None:
        # from the command line: LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        args = with_default_config(list(args))
    cli = LitRLHFCLI(
        PPOModule,
        DialogSumDataModule,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "logs"},
        parser_kwargs={"description": DESCRIPTION},
    )
    destroy_process_group()
    return cli


def destroy_process_group() -> None:
    """Tear down the process group a multi-process run (DDP, FSDP, DeepSpeed) left behind.

    Lightning destroys it at exit only for NCCL; a CPU (gloo) run that leaves it up sometimes aborts at exit
    (``terminate called without an active exception``). Only on success: after an error another rank may
    still be inside a collective. Afterwards ``cli.trainer`` still answers locally (``log_dir`` and
    ``strategy.broadcast`` fall back to this process's value)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    """Console entry point of ``lit-rlhf``."""
    run()


# ---------------------------------------------------------------------------------------- lit-rlhf-sft

SFT_DESCRIPTION = (
    "lit-rlhf-sft: supervised fine-tuning (prompt -> reference summary) of a seq2seq or decoder-only model on "
    "DialogSum, with a LoRA adapter or all weights; exports what `lit-rlhf fit --model.init_adapter` takes. "
    "`lit-rlhf-sft fit --config configs/sft_flan_t5.yaml` runs the FLAN-T5 recipe's SFT stage; "
    "`lit-rlhf-sft fit --config configs/sft_embedded.yaml` trains the embedded summarizer from scratch."
)


class SFTCLI(LightningCLI):
    """LightningCLI for SFTModule: the data module serves reference summaries, atomic checkpoint files."""

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name", "data.model_name")
        parser.set_defaults({"data.with_labels": True})

    def before_predict(self) -> None:
        add_prediction_writer(self.trainer)


def run_sft(args: list[str] | None = None) -> SFTCLI:
    """Parse ``args`` (default: the command line), run the ``lit-rlhf-sft`` subcommand, return the CLI."""
    from lit_rlhf.sft import SFTModule

    cli = SFTCLI(
        SFTModule,
        DialogSumDataModule,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "logs"},
        parser_kwargs={"description": SFT_DESCRIPTION},
    )
    destroy_process_group()
    return cli


def main_sft() -> None:
    """Console entry point of ``lit-rlhf-sft``."""
    run_sft()


if __name__ == "__main__":
    main()
