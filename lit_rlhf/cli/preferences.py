"""The preference commands: ``lit-rlhf-rm`` (a reward model, RewardModelModule) and ``lit-rlhf-dpo`` (DPOModule),
on PreferenceDataModule pairs."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lit_rlhf.cli.base import (
    COMMON_CLI_SETTINGS, CommonCLI, command_parser_kwargs, destroy_process_group, one_line_errors,
)
from lit_rlhf.cli.configs import command_args

RM_DESCRIPTION = (
    "lit-rlhf-rm: train a reward model (a one-output sequence classifier, LoRA or all weights) on preference "
    "pairs (prompt, chosen, rejected: text columns or chat conversations) with the Bradley-Terry loss; fit "
    "exports <log_dir>/reward_model, which `lit-rlhf fit` takes as --model.reward "
    "lit_rlhf.rewards.ClassifierReward with model_name=<that folder>, label=reward, text=<data.classifier_text: "
    "prompt+response, or response>. predict --ckpt_path CKPT --data.predict_path FILE (settings from the run's "
    "config.yaml) scores the response column of FILE's rows and writes predictions.jsonl (id, prompt, response, "
    "score) into the checkpoint's run folder."
)


DPO_DESCRIPTION = (
    "lit-rlhf-dpo: direct preference optimization of a seq2seq or decoder-only model with a LoRA adapter on "
    "preference pairs (prompt, chosen, rejected: text columns or chat conversations): DPO (sigmoid; cDPO with "
    "model.label_smoothing) or IPO, against the adapter-disabled model (or model.reference_model); fit exports "
    "<log_dir>/adapter, which `lit-rlhf fit --model.init_adapter` and plain peft load."
)


class PreferenceCLI(CommonCLI):
    """``lit-rlhf-dpo``: a module on PreferenceDataModule batches (fit, validate, test; its policy answers prompts
    through ``lit-rlhf predict --model.init_adapter``)."""

    run_folder_subcommands = ()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}  # nothing to predict

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name", "data.model_name")


class RewardModelCLI(PreferenceCLI):
    """``lit-rlhf-rm``: fit, validate, test, and predict (the reward of each response of ``data.predict_path``,
    written to ``predictions.jsonl`` in the checkpoint's run folder)."""

    run_folder_subcommands = ("predict",)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return LightningCLI.subcommands()

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # the reward model reads each side's classifier inputs (lit-rlhf-dpo's pairs have none)
        parser.set_defaults({"data.classifier_inputs": True})


def run_preference(module_class: type, prog: str, description: str, args: list[str] | None = None,
                   cli_class: type[PreferenceCLI] = PreferenceCLI) -> PreferenceCLI:
    """Parse ``args`` (default: the command line), run a preference command's subcommand, return the CLI. With
    ``--ckpt_path`` and no ``--config`` it starts from the run's own ``config.yaml`` (the data settings too, e.g.
    what a reward model reads, ``data.classifier_text``); there is no default config."""
    from lit_rlhf.data import PreferenceDataModule

    cli = cli_class(
        module_class,
        PreferenceDataModule,
        args=command_args(args, default=False),
        parser_kwargs=command_parser_kwargs(prog, description, cli_class.subcommands()),
        **COMMON_CLI_SETTINGS,
    )
    destroy_process_group()
    return cli


def run_rm(args: list[str] | None = None) -> PreferenceCLI:
    """``lit-rlhf-rm``: RewardModelModule (see :func:`run_preference`)."""
    from lit_rlhf.modules import RewardModelModule

    return run_preference(RewardModelModule, "lit-rlhf-rm", RM_DESCRIPTION, args, RewardModelCLI)


def run_dpo(args: list[str] | None = None) -> PreferenceCLI:
    """``lit-rlhf-dpo``: DPOModule (see :func:`run_preference`)."""
    from lit_rlhf.modules import DPOModule

    return run_preference(DPOModule, "lit-rlhf-dpo", DPO_DESCRIPTION, args)


def main_rm() -> None:
    """Console entry point of ``lit-rlhf-rm``."""
    one_line_errors("lit-rlhf-rm", run_rm)


def main_dpo() -> None:
    """Console entry point of ``lit-rlhf-dpo``."""
    one_line_errors("lit-rlhf-dpo", run_dpo)
