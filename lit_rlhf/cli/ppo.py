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

import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

from lit_rlhf.cli.base import (
    COMMON_CLI_SETTINGS, PARSER_SETTINGS, CommonCLI, configured_callbacks, data_catalogue, data_prefix,
    destroy_process_group, notice, one_line_errors,
)
from lit_rlhf.cli.configs import SUBCOMMANDS, command_args, config_catalogue
from lit_rlhf.data import PromptDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.runtime import PPOProgressBar, remove_if_only_start_files
from lit_rlhf.settings import longest_response

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
    return data_catalogue() + (
        f"\n\nRewards (--model.reward lit_rlhf.rewards.CLASS; options: --model.reward.help CLASS):{rewards}"
        f"\n\nToxicity evaluators (lit_rlhf.callbacks.ToxicityCallback's init_args.evaluator: "
        f"lit_rlhf.callbacks.CLASS):{evaluators}"
    )


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


def parser_kwargs() -> dict:
    """Main and per-subcommand parser settings: the default config stated at the top, no abbreviated flags."""
    kwargs = {"description": DESCRIPTION + _catalogue() + config_catalogue(), "prog": "lit-rlhf", **PARSER_SETTINGS}
    for sub in SUBCOMMANDS:
        usage = PREDICT_USAGE if sub == "predict" else SUBCOMMAND_USAGE.format(sub=sub)
        kwargs[sub] = {"usage": usage, "description": SUBCOMMAND_DESCRIPTION + _catalogue() + config_catalogue(),
                       **PARSER_SETTINGS}
    return kwargs


PPO_CHECKPOINT_FILENAME = "{ppo_step:.0f}"
"""The periodic checkpoints' file name where the config gives none: ``ppo_step=100.ckpt``. Lightning's default,
``epoch=0-step=400.ckpt``, counts optimizer steps (several per PPO step); ``ppo_step`` is what PPOModule logs."""


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


def main() -> None:
    """Console entry point of ``lit-rlhf``."""
    one_line_errors("lit-rlhf", run)
