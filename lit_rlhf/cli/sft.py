"""The ``lit-rlhf-sft`` command: supervised fine-tuning (SFTModule) on a prompt data module's reference summaries."""

from __future__ import annotations

from lit_rlhf.cli.base import (
    COMMON_CLI_SETTINGS, CommonCLI, command_parser_kwargs, data_catalogue, data_prefix, destroy_process_group,
    one_line_errors,
)
from lit_rlhf.cli.configs import command_args
from lit_rlhf.data import PromptDataModule

SFT_DESCRIPTION = (
    "lit-rlhf-sft: supervised fine-tuning (prompt -> reference summary) of a seq2seq or decoder-only model on "
    "DialogSum, with a LoRA adapter or all weights; exports what `lit-rlhf fit --model.init_adapter` takes. "
    "`lit-rlhf-sft fit --config configs/sft_flan_t5.yaml` runs the FLAN-T5 recipe's SFT stage; "
    "`lit-rlhf-sft fit --config configs/sft_embedded.yaml` trains the embedded summarizer from scratch."
    + data_catalogue()
)


class SFTCLI(CommonCLI):
    """The ``lit-rlhf-sft`` command: SFTModule, with the data module serving reference summaries."""

    def add_arguments_to_parser(self, parser) -> None:
        data = data_prefix(self, parser, with_labels=True)
        parser.link_arguments("model.model_name", f"{data}model_name")


def run_sft(args: list[str] | None = None) -> SFTCLI:
    """Parse ``args`` (default: the command line), run the ``lit-rlhf-sft`` subcommand, return the CLI."""
    from lit_rlhf.modules import SFTModule

    cli = SFTCLI(
        SFTModule,
        PromptDataModule,
        subclass_mode_data=True,
        args=command_args(args, default=False),
        parser_kwargs=command_parser_kwargs("lit-rlhf-sft", SFT_DESCRIPTION),
        **COMMON_CLI_SETTINGS,
    )
    destroy_process_group()
    return cli


def main_sft() -> None:
    """Console entry point of ``lit-rlhf-sft``."""
    one_line_errors("lit-rlhf-sft", run_sft)
