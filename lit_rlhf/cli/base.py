"""What every lit-rlhf command shares: CommonCLI (LightningCLI with checkpoint-aware resumes, atomic checkpoints,
run folders and lit_rlhf's callbacks), the parser settings and ``--help`` formatting, one-line user errors and the
third-party warnings filtered as harmless."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_rlhf.cli.configs import LIGHTNING_CKPT_NAMES, SUBCOMMANDS, config_catalogue, needed_subcommands
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.moved import with_current_class_paths
from lit_rlhf.runtime import (
    AtomicCheckpointIO, InterruptCheckpoint, ModelSummaryWithoutFlops, RunFolder, RunProgressBar,
    combine_with_checkpoint, given_model_keys, load_checkpoint, run_folder_of,
)

DATA_MODULES = {
    "DialogSumDataModule": "the default: DialogSum (bundled or hub) with the recipe's filter, prompt and split",
    "PromptDataModule": "any prompts: a jsonl/csv/parquet file or folder, hub dataset; column, template or chat",
}
"""``lit_rlhf.data`` data modules, one line each for ``--help``."""
DATA_MODULE_PATHS = {"DialogSumDataModule": "lit_rlhf.data", "PromptDataModule": "lit_rlhf.data"}


def data_catalogue() -> str:
    """The data modules, one line each, for the ``--help`` of lit-rlhf and lit-rlhf-sft."""
    lines = "".join(f"\n  {DATA_MODULE_PATHS[name] + '.' + name:<36} {line}" for name, line in DATA_MODULES.items())
    return f"\n\nData modules (--data CLASS; options: --data.help CLASS):{lines}"


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with descriptions kept as written (line breaks, the one-line-per-class lists)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


PARSER_SETTINGS = {"allow_abbrev": False, "formatter_class": HelpFormatter}
"""What every command's parsers share: no abbreviated flags, descriptions kept as written."""


def command_parser_kwargs(prog: str, description: str, subcommands: Iterable[str] = SUBCOMMANDS) -> dict:
    """Parser settings of lit-rlhf-sft, -rm and -dpo: ``description`` (its first paragraph wrapped, then the
    packaged configs) at the top of ``--help`` and of each subcommand's; no abbreviated flags."""
    first, _, rest = description.partition("\n\n")
    text = textwrap.fill(first, 116) + ("\n\n" + rest if rest else "") + config_catalogue()
    per_subcommand = {sub: {"description": text, **PARSER_SETTINGS} for sub in subcommands}
    return {"description": text, "prog": prog, **PARSER_SETTINGS, **per_subcommand}


# The settings dataclasses (lora, generation, ppo) document each field in a docstring under it: show those
# in --help too.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

HARMLESS_WARNINGS = (
    # PPOModule steps the optimizer on purpose inside training_step, so a checkpoint after the step is wanted.
    "Using ModelCheckpoint with manual optimization",
    # transformers' deprecation, hit inside peft
    r"`is_gradient_checkpointing` is deprecated",
    # torch's deprecation, hit inside Lightning's own _pytree helper
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
"""Third-party warnings that say nothing a lit-rlhf user can act on, matched by message only."""
HARMLESS_LOG_LINES = {
    # FLAN-T5 stores its own lm_head, which transformers 5's T5 config declares tied: it loads untied, correctly
    "transformers.modeling_utils": ("The tied weights mapping and config for this model specifies to tie",),
    "lightning.pytorch.utilities.rank_zero": (
        # the litlogger and litmodels advertisements
        "💡 Tip: For seamless cloud",
        # the --ckpt_path the user gave, echoed (twice for validate, test and predict); a resumed fit still
        # says "Restored all states from the checkpoint at ..."
        "Restoring states from the checkpoint path at ",
        "Loaded model weights from the checkpoint at ",
    ),
}
"""Log records (logger name: message starts) of the same kind."""


def quiet_harmless_warnings() -> None:
    """Filter HARMLESS_WARNINGS and HARMLESS_LOG_LINES, and nothing else."""
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, starts in HARMLESS_LOG_LINES.items():
        logging.getLogger(name).addFilter(lambda record, starts=starts: not record.getMessage().startswith(starts))


quiet_harmless_warnings()


class CommonCLI(LightningCLI):
    """LightningCLI with what every lit-rlhf command shares: with ``--ckpt_path``, the checkpoint's model settings
    except the flags given (which win, with one notice each); atomic checkpoint files and a ``last.ckpt`` that is
    the last step (at the end of fit, and after the step in progress on Ctrl-C: ``InterruptCheckpoint``);
    Lightning's default
    TensorBoard logger without its placeholder ``hp_metric`` of -1, in the run folder of ``--ckpt_path`` for the
    subcommands in :attr:`run_folder_subcommands`, and none for a ``predict`` outside a run folder (it makes no
    empty ``version_N``); ``<subcommand>_config.yaml`` beside a fit's ``config.yaml``, not over it; a model summary
    without Lightning's FLOPs (always 0 here); one line for a ``--ckpt_path`` torch cannot read; and ``predict``'s
    ``predictions.jsonl``."""

    run_folder_subcommands: tuple[str, ...] = ("predict",)
    """Subcommands whose default logger writes into the run folder of ``--ckpt_path`` (when it is inside one)."""
    checkpoint_dirs: list[str] = []
    """The folders of the ModelCheckpoint callbacks that wrote ``--ckpt_path``, as they spelled them."""

    given_args: list[str] = []
    """The command-line arguments as given (before a default config is inserted): which settings are flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        self.parsers_needed = needed_subcommands(sys.argv[1:] if given is None else [str(a) for a in given],
                                                 self.subcommands())
        super().__init__(*args, **kwargs)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # A subcommand's full parser reads the signatures and docstrings of the trainer, module and data module
        # (a large part of a command's start-up); the others get an empty one, which is all `--help` lists.
        if subcommand in self.parsers_needed:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        self._subcommand_method_arguments[subcommand] = []
        return self.init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        self.given_args = [str(a) for a in args] if isinstance(args, (list, tuple)) else sys.argv[1:]
        super().parse_arguments(parser, args)
        with_current_class_paths(self.config)  # a run of lit_rlhf 0.3 named modules that moved since

    def _parse_ckpt_path(self) -> None:
        # Lightning's version replaces every model setting with the checkpoint's, flags included: here the flags
        # the user gives win (lit_rlhf.runtime.runs.combine_with_checkpoint), with one notice per differing setting, in
        # every command.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_NAMES or Path(ckpt_path).is_dir():
            return  # a folder is a DeepSpeed checkpoint: Lightning's strategy reads it, with the config's settings
        if not Path(ckpt_path).is_file():
            raise ValueError(f"--ckpt_path {ckpt_path}: no such file")
        checkpoint = load_checkpoint(ckpt_path)
        self.read_checkpoint(ckpt_path, checkpoint)
        states = checkpoint.get("callbacks", {}).values()
        self.checkpoint_dirs = [s["dirpath"] for s in states if isinstance(s, dict) and s.get("dirpath")]
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k != "_instantiator"}
        if not hparams:
            return
        parsed = self.config[sub].model.clone()
        merged = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        merged[sub].model, notices = combine_with_checkpoint(
            parsed, merged[sub].model, given_model_keys(self.given_args), report_kept=sub == "fit")
        self.config = merged
        for line in notices:
            notice(f"warning: {line}")

    def read_checkpoint(self, ckpt_path: str, checkpoint: dict[str, Any]) -> None:
        """What a command reads from ``--ckpt_path`` besides the model settings (a ValueError where it cannot
        start from that file); nothing here."""

    def instantiate_trainer(self, **kwargs):
        if self.subcommand not in ("fit", None):
            # beside a fit run's config.yaml, not over it
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"{self.subcommand}_config.yaml"}
        settings = self._get(self.config_init, "trainer", default={})
        if "logger" not in kwargs and settings.get("logger") in (None, True) and not settings.get("barebones"):
            kwargs["logger"] = self._default_logger(settings.get("default_root_dir") or os.getcwd())
        trainer = super().instantiate_trainer(**kwargs)
        # a killed run must never leave a truncated last.ckpt behind (see lit_rlhf.runtime.checkpoint)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _default_logger(self, root_dir: str) -> TensorBoardLogger | bool:
        """The logger when the config leaves Lightning's default: TensorBoard, as Lightning's, without the
        ``hp_metric`` placeholder; in the run folder of ``--ckpt_path`` when there is one for this subcommand;
        none for ``predict`` otherwise (``predictions.jsonl`` and ``predict_config.yaml`` then go to
        ``trainer.default_root_dir``)."""
        folder = self._checkpoint_run_folder()
        if folder is not None:
            return TensorBoardLogger(folder.save_dir, name=folder.name, version=folder.version, default_hp_metric=False)
        if self.subcommand == "predict":
            return False
        return TensorBoardLogger(root_dir, default_hp_metric=False)

    def _checkpoint_run_folder(self) -> RunFolder | None:
        """The run folder of ``--ckpt_path`` for the subcommands in :attr:`run_folder_subcommands`; else None."""
        if self.subcommand not in self.run_folder_subcommands:  # None too (run=False: the caller runs the trainer)
            return None
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        return run_folder_of(ckpt_path, self.checkpoint_dirs) if ckpt_path else None

    def _instantiate_trainer(self, config, callbacks):
        configured = configured_callbacks(config, callbacks)
        if self.subcommand == "fit" and config.get("enable_checkpointing") is not False:
            if not any(isinstance(c, ModelCheckpoint) for c in configured):
                # Lightning adds this default only when no Checkpoint callback is given; InterruptCheckpoint is one
                callbacks.append(ModelCheckpoint())
            callbacks.append(InterruptCheckpoint())  # last.ckpt at the end of fit and on Ctrl-C
        summary = config.get("enable_model_summary") is not False and not config.get("barebones")
        if summary and not any(isinstance(c, ModelSummary) for c in configured):
            callbacks.append(ModelSummaryWithoutFlops())
            config["enable_model_summary"] = False  # Lightning's own summary, which it adds beside ours otherwise
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks.append(RunProgressBar())
        return super()._instantiate_trainer(config, callbacks)

    def before_predict(self) -> None:
        add_prediction_writer(self.trainer)


def data_prefix(cli: LightningCLI, parser, **defaults: Any) -> str:
    """Where the data module's settings live: ``data.init_args.`` when any data module can be chosen (its
    default then DialogSumDataModule, with ``defaults``), ``data.`` for one fixed class."""
    if not cli.subclass_mode_data:
        parser.set_defaults({f"data.{k}": v for k, v in defaults.items()})
        return "data."
    default = {"class_path": f"{DialogSumDataModule.__module__}.{DialogSumDataModule.__name__}"}
    parser.set_defaults({"data": {**default, "init_args": defaults} if defaults else default})
    return "data.init_args."


def configured_callbacks(config: dict[str, Any], callbacks: list) -> list:
    """The trainer config's callbacks (a list, one, or None) and the extra ``callbacks``, in one list."""
    configured = config.get("callbacks") or []
    return [*(configured if isinstance(configured, list) else [configured]), *callbacks]


def add_prediction_writer(trainer) -> None:
    """``predict`` writes ``predictions.jsonl`` into the trainer's log directory unless a writer is configured:
    the run folder of a run's ``--ckpt_path``, else ``trainer.default_root_dir`` (see CommonCLI)."""
    from lightning.pytorch.callbacks import BasePredictionWriter

    from lit_rlhf.callbacks import PredictionWriter

    if not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
        trainer.callbacks.append(PredictionWriter())


@rank_zero_only
def notice(line: str) -> None:
    """One line for the user on stderr, from one process."""
    print(f"lit-rlhf: {line}", file=sys.stderr, flush=True)


def destroy_process_group() -> None:
    """Tear down the process group a multi-process run (DDP, FSDP, DeepSpeed) left behind.

    Lightning destroys it at exit only for NCCL; a CPU (gloo) run that leaves it up sometimes aborts at exit
    (``terminate called without an active exception``). Only on success: after an error another rank may
    still be inside a collective. Afterwards ``cli.trainer`` still answers locally (``log_dir`` and
    ``strategy.broadcast`` fall back to this process's value)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class OneLineErrorParser(LightningArgumentParser):
    """The parser's own errors (an unknown flag, a value outside a setting's choices) in one line on stderr,
    like every other user error (exit status 2, as argparse); LIT_RLHF_DEBUG=1 keeps jsonargparse's output."""

    def error(self, message: str, ex: Exception | None = None):
        if os.environ.get("LIT_RLHF_DEBUG") == "1" or not self.exit_on_error:
            return super().error(message, ex)
        line = " ".join(str(message).split())
        sys.stderr.write(f"{self.prog.split()[0]}: error: {line}  (--help lists every setting)\n")
        raise SystemExit(2)


COMMON_CLI_SETTINGS = dict(
    parser_class=OneLineErrorParser, seed_everything_default=0, save_config_kwargs={"overwrite": True},
    trainer_defaults={"default_root_dir": "logs"},
)
"""What lit-rlhf and lit-rlhf-sft share: one-line parse errors, seed 0, runs under logs/."""

USER_ERRORS = (ValueError, OSError, MisconfigurationException)
"""What a setting, a path or a missing download causes: one line, the message (LIT_RLHF_DEBUG=1: traceback)."""


def one_line_errors(command: str, entry: Callable[[], Any]) -> None:
    """Run ``entry``; a user error (bad setting, missing file) prints one line ``<command>: error: ...`` and
    exits with 1 (``LIT_RLHF_DEBUG=1``: the traceback instead)."""
    try:
        entry()
    except USER_ERRORS as err:
        if os.environ.get("LIT_RLHF_DEBUG") == "1":
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{command}: error: {message}  (LIT_RLHF_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
