"""The ``lit-rlhf`` command: LightningCLI over PPOModule and any prompt data module (DialogSumDataModule by default).

    lit-rlhf fit                                   # the offline recipe (the embedded summarizer, bundled DialogSum)
    lit-rlhf fit --config configs/detox_flan_t5.yaml
    lit-rlhf fit --print_config                    # the whole run's settings
    lit-rlhf test --config ... --ckpt_path ...     # reward, KL and response length on the held-out split
    lit-rlhf fit --ckpt_path .../last.ckpt --model.ppo_steps 150   # resume (flags given win), in the same run folder

With no ``--config``, ``fit``/``validate``/``test`` start from the packaged offline recipe
(``lit_rlhf/configs/detox_summarizer.yaml``); with ``--ckpt_path`` of a run's checkpoint and no ``--config``, every
subcommand starts from that run's own ``config.yaml``. Command-line flags override either.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_rlhf.runtime import AtomicCheckpointIO, InterruptCheckpoint, load_checkpoint
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.data import PromptDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.runtime import ModelSummaryWithoutFlops, PPOProgressBar, RunProgressBar
from lit_rlhf.moved import with_current_class_paths
from lit_rlhf.settings import longest_response
from lit_rlhf.runtime import (
    RunFolder, combine_with_checkpoint, given_model_keys, remove_if_only_start_files, run_folder_of,
)

SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values that Lightning resolves itself (not a file)."""
SUBCOMMANDS_WITH_DEFAULT = ("fit", "validate", "test")
"""The subcommands that run the packaged default config when given neither ``--config`` nor ``--ckpt_path``."""

REWARDS = {
    "ClassifierReward": "logit or probability of one label of a Hugging Face sequence classifier (hub or local)",
    "ProfanityReward": "offline: logit of 'not offensive' from the alt-profanity-check model",
    "ReferenceSimilarityReward": "ROUGE of the response against the reference summary, in [0, 1]",
    "CompositeReward": "weighted sum of rewards (the offline recipe: profanity + 10 x ROUGE-1)",
    "FunctionReward": "a Python function fn(prompts, responses, **columns) -> list[float], by import path",
}
"""``lit_rlhf.rewards`` classes, one line each for ``--help`` (a test checks that every Reward is listed)."""
EVALUATORS = {
    "ClassifierToxicity": "softmax probability of a label of a Hugging Face classifier (the recipe's 'hate')",
    "EvaluateToxicity": "the `evaluate` library's toxicity measurement, as the recipe used it (needs the hub)",
    "ProfanityToxicity": "offline: P(offensive) from alt-profanity-check",
}
"""``lit_rlhf.callbacks`` toxicity evaluators, one line each for ``--help``."""


def _catalogue() -> str:
    rewards = "".join(f"\n  {name:<27} {line}" for name, line in REWARDS.items())
    evaluators = "".join(f"\n  {name:<27} {line}" for name, line in EVALUATORS.items())
    return _data_catalogue() + (
        f"\n\nRewards (--model.reward lit_rlhf.rewards.CLASS; options: --model.reward.help CLASS):{rewards}"
        f"\n\nToxicity evaluators (lit_rlhf.callbacks.ToxicityCallback's init_args.evaluator: "
        f"lit_rlhf.callbacks.CLASS):{evaluators}"
    )


DATA_MODULES = {
    "DialogSumDataModule": "the default: DialogSum (bundled or hub) with the recipe's filter, prompt and split",
    "PromptDataModule": "any prompts: a jsonl/csv/parquet file or folder, hub dataset; column, template or chat",
}
"""``lit_rlhf.data`` data modules, one line each for ``--help``."""
DATA_MODULE_PATHS = {"DialogSumDataModule": "lit_rlhf.data", "PromptDataModule": "lit_rlhf.data"}


def _data_catalogue() -> str:
    lines = "".join(f"\n  {DATA_MODULE_PATHS[name]}.{name:<22} {line}" for name, line in DATA_MODULES.items())
    return f"\n\nData modules (--data CLASS; options: --data.help CLASS):{lines}"


def _config_catalogue() -> str:
    """The packaged configs, for ``--help``: the top-level ones, then one folder (overlays) a paragraph."""
    folders: dict[str, list[str]] = {}
    for name in packaged_configs():
        folders.setdefault(name.rpartition("/")[0], []).append(name)
    lines = "".join("\n" + textwrap.fill("  ".join(names), 116, initial_indent="  ", subsequent_indent="  ")
                    for names in folders.values())
    return f"\n\nPackaged configs (--config NAME or configs/NAME from any folder; an existing file comes first):{lines}"


DESCRIPTION = (
    "lit-rlhf: RLHF fine-tuning of Hugging Face language models with PPO (LoRA + value head) against a\n"
    "reward model, as a Lightning module. `lit-rlhf fit` alone runs the offline recipe\n"
    "(lit_rlhf/configs/detox_summarizer.yaml; print it with `lit-rlhf fit --print_config`);\n"
    "`lit-rlhf fit --config configs/detox_flan_t5.yaml` the FLAN-T5 detoxification recipe;\n"
    "`lit-rlhf fit --help` lists every setting."
)
SUBCOMMAND_USAGE = (
    "lit-rlhf {sub} [--config FILE ...] [--SECTION.SETTING VALUE ...]\n\n"
    "Default config: with no --config, `lit-rlhf {sub}` runs the packaged offline recipe\n"
    "(lit_rlhf/configs/detox_summarizer.yaml: the embedded summarizer, bundled DialogSum, 100 PPO steps).\n"
    "The defaults listed below are the classes' own; print what a plain `lit-rlhf {sub}` runs:\n"
    "`lit-rlhf {sub} --print_config`. With --ckpt_path RUN_DIR/checkpoints/FILE.ckpt and no --config,\n"
    "every subcommand starts from that run's RUN_DIR/config.yaml instead."
)
PREDICT_USAGE = (
    "lit-rlhf predict --ckpt_path RUN_DIR/checkpoints/FILE.ckpt --data.predict_path FILE\n"
    "                 [--config FILE ...] [--SECTION.SETTING VALUE ...]\n\n"
    "Starts from RUN_DIR/config.yaml (or --config FILE ...) and writes RUN_DIR/predictions.jsonl; with a checkpoint\n"
    "outside a run folder, or none, trainer.default_root_dir/predictions.jsonl (logs/; no run folder is made)."
)
SUBCOMMAND_DESCRIPTION = (
    "Recipes: --config configs/detox_flan_t5.yaml (FLAN-T5 detoxification), configs/detox_gpt2.yaml,\n"
    "configs/embedded_t5.yaml, configs/embedded_gpt2.yaml (tiny random models, seconds a run); offline\n"
    "copies of the recipe's models and data: add --config configs/offline/local_models.yaml.\n"
    "Flags are never abbreviated."
)


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with descriptions kept as written (line breaks, the one-line-per-class lists)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


PARSER_SETTINGS = {"allow_abbrev": False, "formatter_class": HelpFormatter}
"""What every command's parsers share: no abbreviated flags, descriptions kept as written."""


def parser_kwargs() -> dict:
    """Main and per-subcommand parser settings: the default config stated at the top, no abbreviated flags."""
    kwargs = {"description": DESCRIPTION + _catalogue() + _config_catalogue(), "prog": "lit-rlhf", **PARSER_SETTINGS}
    for sub in SUBCOMMANDS:
        usage = PREDICT_USAGE if sub == "predict" else SUBCOMMAND_USAGE.format(sub=sub)
        kwargs[sub] = {"usage": usage, "description": SUBCOMMAND_DESCRIPTION + _catalogue() + _config_catalogue(),
                       **PARSER_SETTINGS}
    return kwargs


def command_parser_kwargs(prog: str, description: str, subcommands: Iterable[str] = SUBCOMMANDS) -> dict:
    """Parser settings of lit-rlhf-sft, -rm and -dpo: ``description`` (its first paragraph wrapped, then the
    packaged configs) at the top of ``--help`` and of each subcommand's; no abbreviated flags."""
    first, _, rest = description.partition("\n\n")
    text = textwrap.fill(first, 116) + ("\n\n" + rest if rest else "") + _config_catalogue()
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


DEFAULT_CONFIG = "detox_summarizer.yaml"
"""The packaged config ``fit``/``validate``/``test`` use when no ``--config`` is given."""


def config_path(name: str = DEFAULT_CONFIG) -> str:
    """Absolute path of a packaged config (``lit_rlhf/configs/<name>``; default: :data:`DEFAULT_CONFIG`)."""
    return str(resources.files("lit_rlhf.configs").joinpath(name))


CONFIG_PREFIXES = (("lit_rlhf", "configs"), ("configs",))
"""How a packaged config may be spelled in front of its name: as in the repository, or as installed."""


def packaged_configs() -> list[str]:
    """The names of the packaged configs (``embedded_t5.yaml``, ``strategy/ddp.yaml``, ...), sorted: top level
    first, then each sub-folder."""
    root = resources.files("lit_rlhf.configs")
    names = [entry.name for entry in root.iterdir() if entry.name.endswith(".yaml")]
    for folder in (e for e in root.iterdir() if e.is_dir() and not e.name.startswith("_")):
        names += [f"{folder.name}/{entry.name}" for entry in folder.iterdir() if entry.name.endswith(".yaml")]
    return sorted(names, key=lambda n: (n.count("/"), n))


def resolve_config(value: str) -> str:
    """A ``--config`` value as jsonargparse should read it: a file that exists, as given; otherwise the packaged
    config of that name (``embedded_grpo.yaml``, ``configs/embedded_grpo.yaml``, ``strategy/ddp.yaml``), so the
    repository's commands work from any folder with an installed lit_rlhf. A YAML name that is neither: a
    ValueError listing the packaged ones. Anything else (an inline YAML string) as given."""
    path = Path(value).expanduser()
    if not value.endswith((".yaml", ".yml")) or path.exists() or path.is_absolute():
        return value
    parts = path.parts
    for prefix in CONFIG_PREFIXES:
        if parts[:len(prefix)] == prefix:
            parts = parts[len(prefix):]
            break
    name = "/".join(parts)
    if name in packaged_configs():
        return config_path(name)
    raise ValueError(f"--config {value}: no such file, and no packaged config of that name (packaged: "
                     f"{', '.join(packaged_configs())})")


def resolve_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config``/``-c`` value resolved by :func:`resolve_config`."""
    resolved = list(args)
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            resolved[i + 1] = resolve_config(args[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config(arg[len("--config="):])
    return resolved


PPO_CHECKPOINT_FILENAME = "{ppo_step:.0f}"
"""The periodic checkpoints' file name where the config gives none: ``ppo_step=100.ckpt``. Lightning's default,
``epoch=0-step=400.ckpt``, counts optimizer steps (several per PPO step); ``ppo_step`` is what PPOModule logs."""


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


class LitRLHFCLI(CommonCLI):
    """The ``lit-rlhf`` command: the values two parts share given once and linked, periodic checkpoints named by
    PPO step, start-up checks that run before anything is written, and a resumed run in the checkpoint's run
    folder, stopping at once when it has done its ``model.ppo_steps``."""

    run_folder_subcommands = ("fit", "validate", "test", "predict")
    checkpoint_ppo_step: int | None = None
    """PPO steps done by the run in ``--ckpt_path`` (None without one)."""

    def read_checkpoint(self, ckpt_path: str, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_rlhf") or {}
        if "ppo_step" not in state:
            raise ValueError(f"--ckpt_path {ckpt_path} was not written by lit_rlhf's PPOModule (no 'lit_rlhf' state)")
        self.checkpoint_ppo_step = int(state["ppo_step"])

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "validate" and self.config.validate.trainer.limit_val_batches == 0:
            # the fit configs turn validation during fit off; `validate` exists to measure, so it measures
            self.config.validate.trainer.limit_val_batches = 1.0
            notice("validate: trainer.limit_val_batches=0 (no validation during fit) replaced by 1.0: "
                   "measuring every held-out prompt (give --trainer.limit_val_batches to measure fewer)")

    def _instantiate_trainer(self, config, callbacks):
        configured = configured_callbacks(config, callbacks)
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks.append(PPOProgressBar())
        trainer = super()._instantiate_trainer(config, callbacks)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.filename is None:
                callback.filename = PPO_CHECKPOINT_FILENAME
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "fit" and self._finished():
            return
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        new_folder = Path(log_dir) if log_dir and not Path(log_dir).exists() else None
        try:
            with warnings.catch_warnings():
                if self.checkpoint_ppo_step is not None:  # resuming: the run's own checkpoints/ folder has files
                    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
                super()._run_subcommand(subcommand)
        except BaseException:
            # a failed start leaves no folder behind (a run that has stepped keeps its folder and checkpoint)
            if new_folder is not None and self.trainer.global_step == 0 and self.trainer.is_global_zero:
                remove_if_only_start_files(new_folder)
            raise

    def _finished(self) -> bool:
        """A resumed run that has done its ``model.ppo_steps`` stops at once, with one line saying so."""
        done, total = self.checkpoint_ppo_step, self.model.hparams.ppo_steps
        if done is None or total is None or done < total:
            return False
        notice(f"Nothing to do: {self.config.fit.ckpt_path} has done {done} of model.ppo_steps={total} PPO steps; "
               f"give a larger --model.ppo_steps to continue it")
        return True

    def before_fit(self) -> None:
        check_trainer_settings(self.trainer)
        check_callbacks(self.trainer)

    def before_validate(self) -> None:
        check_trainer_settings(self.trainer)
        check_callbacks(self.trainer)

    def before_test(self) -> None:
        check_trainer_settings(self.trainer)
        check_callbacks(self.trainer)

    def add_arguments_to_parser(self, parser) -> None:
        data = data_prefix(self, parser)
        # the policy model also picks the data module's tokenizer and padding side
        parser.link_arguments("model.model_name", f"{data}model_name")
        # the module checks its mini-batch against the rollout batch the data module produces
        parser.link_arguments(f"{data}batch_size", "model.rollout_batch_size")
        # a decoder-only prompt leaves room for the longest response, so it is cut in its content, not its start
        parser.link_arguments("model.generation.max_new_tokens", f"{data}reserve_tokens",
                              compute_fn=longest_response)


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


def check_callbacks(trainer) -> None:
    """Load the callbacks' evaluators now, before a run folder exists, naming the setting when one fails."""
    for callback in trainer.callbacks:
        evaluator = getattr(callback, "evaluator", None)
        if evaluator is None or not callable(getattr(evaluator, "setup", None)):
            continue
        try:
            evaluator.setup()
        except Exception as err:
            where = f"trainer.callbacks: {type(callback).__name__}'s evaluator {type(evaluator).__name__}"
            name = getattr(evaluator, "model_name", None)
            setting = f" (init_args.model_name={name!r}: a hub name or a local copy)" if name else ""
            raise ValueError(f"{where}{setting} could not load: {type(err).__name__}: {err}") from err


def check_trainer_settings(trainer) -> None:
    """Trainer settings that would make a run silently do nothing."""
    if trainer.max_steps == 0:
        raise ValueError("trainer.max_steps=0 runs no PPO step; use model.ppo_steps to set the run length")
    if trainer.max_epochs == 0:
        raise ValueError("trainer.max_epochs=0 runs no PPO step; leave it at -1 and set model.ppo_steps")


def with_default_config(args: list[str], default: bool = True) -> list[str]:
    """Insert a config after the subcommand when the user gave none: with ``--ckpt_path`` of a file, the run's
    own ``config.yaml`` (:func:`run_config_of`), for every subcommand; otherwise (with ``default``)
    :data:`DEFAULT_CONFIG` for ``fit``, ``validate`` and ``test``. The flags given still override it."""
    if not args or any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        return args
    ckpt_path = flag_value(args, "--ckpt_path")
    if ckpt_path is not None and ckpt_path not in LIGHTNING_CKPT_NAMES and args[0] in SUBCOMMANDS:
        return [args[0], "--config", str(run_config_of(ckpt_path)), *args[1:]]
    if not default or args[0] not in SUBCOMMANDS_WITH_DEFAULT:
        return args
    return [args[0], "--config", config_path(), *args[1:]]


def needed_subcommands(args: list[str], subcommands: Iterable[str]) -> set[str]:
    """The subcommands whose full parser ``args`` need: the one given (the first argument that is not an option
    of the main parser: ``--config FILE``, ``--print_config``); none for the main ``--help``; all otherwise (a
    config file may name it)."""
    known, i = set(subcommands), 0
    while i < len(args):
        arg = args[i]
        if arg in known:
            return {arg}
        if not arg.startswith("-"):
            break
        i += 2 if arg in ("-c", "--config") else 1
    return set() if any(a in ("-h", "--help") for a in args) and i >= len(args) else known


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``args`` (None when absent)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def run_config_of(ckpt_path: str) -> Path:
    """The ``config.yaml`` of the run that wrote ``ckpt_path`` (``<run dir>/checkpoints/<file>.ckpt``), which
    a command given only ``--ckpt_path`` starts from; a ValueError asking for ``--config`` when there is none."""
    if not Path(ckpt_path).is_file():
        raise ValueError(f"--ckpt_path {ckpt_path}: no such file")
    folder = run_folder_of(ckpt_path)
    config = folder.path / "config.yaml" if folder is not None else None
    if config is None or not config.is_file():
        where = f"no {config}" if config is not None else "it is not in a run folder (<run dir>/checkpoints/)"
        raise ValueError(f"--ckpt_path {ckpt_path}: {where}, the run's settings to start from; give them with "
                         f"--config FILE")
    return config


def command_args(args: list[str] | None, default: bool) -> list[str] | None:
    """What every command parses: ``args`` (None: the command line) with packaged config names resolved
    (:func:`resolve_configs`) and the config to start from inserted where none is given
    (:func:`with_default_config`; ``default``: the packaged default too). From the command line ``sys.argv`` is
    rewritten and None returned: LightningCLI reads it itself (and warns when given both)."""
    prepared = with_default_config(resolve_configs(sys.argv[1:] if args is None else list(args)), default)
    if args is None:
        sys.argv[1:] = prepared
        return None
    return prepared


def run(args: list[str] | None = None) -> LitRLHFCLI:
    """Parse ``args`` (default: the command line), run the subcommand and return the CLI object."""
    args = command_args(args, default=True)
    cli = LitRLHFCLI(
        PPOModule,
        PromptDataModule,
        args=args,
        parser_kwargs=parser_kwargs(),
        subclass_mode_data=True,  # any prompt module; DialogSumDataModule unless the config names another
        **COMMON_CLI_SETTINGS,
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


def main() -> None:
    """Console entry point of ``lit-rlhf``."""
    one_line_errors("lit-rlhf", run)


# ---------------------------------------------------------------------------------------- lit-rlhf-sft

SFT_DESCRIPTION = (
    "lit-rlhf-sft: supervised fine-tuning (prompt -> reference summary) of a seq2seq or decoder-only model on "
    "DialogSum, with a LoRA adapter or all weights; exports what `lit-rlhf fit --model.init_adapter` takes. "
    "`lit-rlhf-sft fit --config configs/sft_flan_t5.yaml` runs the FLAN-T5 recipe's SFT stage; "
    "`lit-rlhf-sft fit --config configs/sft_embedded.yaml` trains the embedded summarizer from scratch."
    + _data_catalogue()
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


# ---------------------------------------------------------------------------------------- lit-rlhf-rm

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


if __name__ == "__main__":
    main()
