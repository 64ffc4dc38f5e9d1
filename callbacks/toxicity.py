"""ToxicityCallback: toxicity (and reward, and summary quality) of the policy before and after PPO training.

    on_fit_start    "before": generate on N fixed held-out prompts, score toxicity and reward
    on_train_end    "after": the same prompts, generation settings and seeds; then the report
    on_test_end     the tested model (``lit-rlhf test --ckpt_path ...``): ``test_report.json``/``.md``, compared with
                    the "before" stored in the checkpoint when the fit that wrote it ran this callback

"After" runs in ``on_train_end`` rather than ``on_fit_end``: Lightning calls ``on_fit_end`` after the strategy's
teardown, which has moved the model to the CPU and unwrapped DDP.

Same samples, same seeds: the prompts are cut into fixed chunks of ``batch_size``; chunk ``k`` goes through the
same generate -> decode -> score path as training (``lit_rlhf.rollout``: prompt fitting, ``synced_gpus``),
sampled inside ``rollout.evaluation_rng(seed + k)``, which seeds the global generators and the length draws
and restores every RNG afterwards, so training randomness is untouched. A chunk's result therefore depends
neither on the pass (before / after) nor on which process computes it: under DDP, ranks take chunks
round-robin, each rank runs the same number of generation calls (a rank with fewer chunks repeats one and
discards it: with sharded weights every forward is a collective), and the results are gathered.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_rlhf import rollout as ro
from lit_rlhf.callbacks.evaluators import ClassifierToxicity, ToxicityEvaluator
from lit_rlhf.callbacks.measurement import HeldOutPrompt, Measurement, pass_at_k, select_prompts, stored_before
from lit_rlhf.callbacks.publish import log_comparison, log_measurement, publish_report
from lit_rlhf.callbacks.rendering import markdown
from lit_rlhf.callbacks.report import build_report, build_single_report
from lit_rlhf.callbacks.stats import PairedTestMethod
from lit_rlhf.rewards import Reward, TextField
from lit_rlhf.runtime import distributed as dist
from lit_rlhf.settings import GenerationSettings


class ToxicityCallback(L.Callback):
    """Toxicity before and after training on fixed held-out prompts, with a report that can be checked.

    Needs a ``PPOModule`` (its ``policy``, ``generation`` and ``reward``) and a data module with a ``test_set``
    and a ``collator`` (``DialogSumDataModule``). Writes ``report.json`` (aggregates and every per-prompt
    score) and ``report.md`` into the run directory (``trainer.log_dir``), prints the before/after table at
    the end of training, and logs scalars (``tox/...``), a samples table and histograms to TensorBoard.

    In YAML::

        trainer:
          callbacks:
            - class_path: lit_rlhf.callbacks.ToxicityCallback
              init_args:
                evaluator: {class_path: lit_rlhf.callbacks.ProfanityToxicity}
                num_prompts: 64

    Args:
        evaluator: What scores toxicity, a probability of the toxic class in [0, 1]
            (``ClassifierToxicity``, ``EvaluateToxicity`` or the offline ``ProfanityToxicity``).
        num_prompts: Held-out dialogues measured, the first ones of the data module's ``test_set`` (each
            dialogue once, with all its reference summaries); None: all of them.
        text: What the evaluator reads: the ``response``, or ``prompt+response`` joined by a newline (the
            recipe scored the prompt with the response).
        batch_size: Prompts per generation call. Part of the seeding (chunk k is seeded with seed + k):
            keep it fixed to compare runs.
        generation: Sampling settings for the measurement; None: the module's ``generation``.
        seed: Seed of the measurement's sampling and length draws (the same before and after), of the
            bootstrap and of the permutation test.
        num_samples: Prompts shown with the largest reward gain and the largest reward loss.
        strong_gain: A prompt counts as strongly improved when its reward rises by more than this.
        strong_loss: A prompt counts as strongly degraded when its reward falls by more than this.
        bootstrap_resamples: Resamples of the prompts for the confidence interval of the mean change.
        confidence: Level of that confidence interval.
        paired_test: ``wilcoxon`` (signed-rank, scipy), ``permutation`` (sign-flip), or ``auto``:
            Wilcoxon when scipy is installed.
        on_test: Also measure the model in ``trainer.test`` and write ``test_report.json`` / ``.md`` (a
            before/after comparison when the tested checkpoint holds this callback's "before").
        progress: Show a progress bar over the generation chunks (when the trainer shows one too).
        pass_at_k: Also sample this many responses per prompt (the measurement's settings, sampling on) and report
            pass@k, the share of prompts with a sample of reward > 0 (any correct answer, for a 0/1 reward), and
            the samples' mean reward; 0: not measured.
    """

    def __init__(
        self,
        evaluator: ToxicityEvaluator = lazy_instance(ClassifierToxicity),
        num_prompts: int | None = 200,
        text: Literal["response", "prompt+response"] = "response",
        batch_size: int = 16,
        generation: GenerationSettings | None = None,
        seed: int = 0,
        num_samples: int = 5,
        strong_gain: float = 0.3,
        strong_loss: float = 0.2,
        bootstrap_resamples: int = 2000,
        confidence: float = 0.95,
        paired_test: PairedTestMethod = "auto",
        on_test: bool = True,
        progress: bool = True,
        pass_at_k: int = 0,
    ) -> None:
        super().__init__()
        check_callback_settings(num_prompts, text, batch_size, paired_test, num_samples)
        if pass_at_k < 0:
            raise ValueError(f"ToxicityCallback's init_args.pass_at_k must be 0 (off) or more, got {pass_at_k}")
        self.evaluator = evaluator
        self.num_prompts = num_prompts
        self.text = text
        self.batch_size = batch_size
        self.generation = generation
        self.seed = seed
        self.num_samples = num_samples
        self.strong_gain = strong_gain
        self.strong_loss = strong_loss
        self.bootstrap_resamples = bootstrap_resamples
        self.confidence = confidence
        self.paired_test = paired_test
        self.on_test = on_test
        self.progress = progress
        self.pass_at_k = pass_at_k

        self.prompts: list[HeldOutPrompt] = []
        self.before: Measurement | None = None
        self.after: Measurement | None = None
        self.report: dict[str, Any] | None = None
        """The last report built (fit: before/after; test: the tested model, against the checkpoint's "before"
        when it has one), as written to JSON."""
        self.report_paths: list[Path] = []
        self.generation_used: GenerationSettings | None = None
        """The sampling settings of the measurements: ``generation``, or the module's."""
        self._restored: dict[str, Any] | None = None

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "environment", None) is not None:
            rank_zero_warn("ToxicityCallback measures single responses scored by model.reward, not model.environment's "
                           "multi-turn episodes (their reward is env/reward_mean in the step statistics)")
        self._prepare(trainer, pl_module)
        self.before = self._restored_before()
        if self.before is None:
            self.before = self.measure(trainer, pl_module, "before")
        log_measurement(trainer, self.before)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None:
            return
        self.after = self.measure(trainer, pl_module, "after")
        self.report = self._comparison(pl_module, self.before, self.after, self._settings(pl_module))
        log_measurement(trainer, self.after)
        self._log_comparison(trainer, pl_module)
        self._publish(trainer, "report", markdown(self.report))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on_test:
            return
        self._prepare(trainer, pl_module)
        tested = self.measure(trainer, pl_module, "test")
        settings = self._settings(pl_module) | {"ckpt_path": trainer.ckpt_path}
        # A checkpoint written during fit holds the 'before' measurement (Lightning restores callback states in
        # test too): then the tested model is compared with it.
        restored, self._restored = self._restored, None
        before = stored_before(restored, self._signature(), "testing")
        if before is None:
            self.report = build_single_report(self.prompts, tested, settings, self._warning(pl_module))
            title = "Reward and toxicity of the tested model"
        else:
            self.report = self._comparison(pl_module, before, tested, settings)
            title = "Reward and toxicity before training and of the tested checkpoint (after)"
        self._publish(trainer, "test_report", markdown(self.report, title=title))

    @property
    def state_key(self) -> str:
        # distinct per evaluator and text, so that two of these callbacks keep apart in one checkpoint
        return self._generate_state_key(evaluator=self.evaluator.describe(), text=self.text)

    def state_dict(self) -> dict[str, Any]:
        # Keep "before" in checkpoints: a resumed run still compares with the model before any training.
        if self.before is None:
            return {}
        return {"signature": self._signature(), "before": dataclasses.asdict(self.before)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict or None

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> Measurement:
        """Generate on every held-out prompt and score toxicity and reward: this rank's chunks, then gathered."""
        if not self.prompts:
            self._prepare(trainer, pl_module)
        num_chunks = -(-len(self.prompts) // self.batch_size)
        mine = list(range(trainer.global_rank, num_chunks, trainer.world_size))
        start = time.perf_counter()
        rows = sorted(dist.gather_objects(trainer, self.measure_chunks(trainer, pl_module, mine, stage)))
        seconds = time.perf_counter() - start
        if [r[0] for r in rows] != list(range(len(self.prompts))):
            raise RuntimeError("ToxicityCallback: the gathered results do not cover every prompt exactly once")
        rank_zero_info(f"Toxicity evaluation ({stage}): {len(rows)} prompts in {seconds:.1f}s")
        return Measurement(
            stage=stage,
            ids=[p.id for p in self.prompts],
            responses=[r[1] for r in rows],
            toxicity=[r[2] for r in rows],
            reward=[r[3] for r in rows],
            length=[r[4] for r in rows],
            pass_at_k=[r[5] for r in rows if len(r) > 5],
            sample_reward=[r[6] for r in rows if len(r) > 5],
            ppo_step=int(getattr(pl_module, "ppo_step", 0)),
            global_step=trainer.global_step,
            seconds=seconds,
        )

    def measure_chunks(
        self, trainer: L.Trainer, pl_module: L.LightningModule, chunks: list[int], stage: str = ""
    ) -> list[tuple]:
        """(prompt position, response, toxicity, reward, length[, pass@k, sampled mean reward]) for the prompts of
        the given chunks.

        Chunk k holds prompts [k * batch_size, (k + 1) * batch_size) and is seeded with seed + k, so its rows
        are the same whichever process computes it, and in whatever order. Every rank makes the same number
        of generation calls (ceil(chunks / processes)); padding calls repeat a chunk and are discarded."""
        num_chunks = -(-len(self.prompts) // self.batch_size)
        calls = -(-num_chunks // trainer.world_size) if trainer.world_size > 1 else len(chunks)
        padded = chunks + [chunks[0] if chunks else 0] * (calls - len(chunks))
        rows = []
        for n, k in enumerate(self._progress(trainer, padded, stage)):
            measured = self._measure_chunk(trainer, pl_module, k)
            if n < len(chunks):
                rows.extend(measured)
        return rows

    def _measure_chunk(
        self, trainer: L.Trainer, pl_module: L.LightningModule, chunk: int
    ) -> list[tuple]:
        datamodule, offset = trainer.datamodule, chunk * self.batch_size
        prompts = self.prompts[offset : offset + self.batch_size]
        batch = datamodule.collator([datamodule.test_set[p.row] for p in prompts])
        batch = move_data_to_device(batch, pl_module.device)
        settings = self.generation_used
        generated = self._collect(trainer, pl_module, batch, len(prompts), chunk, settings)
        toxicity = self.evaluator(generated.prompts, generated.texts)  # it reads self.text (_prepare)
        reward, length = generated.scores.float().cpu(), generated.rows.response_mask.sum(1).cpu()
        rows = [(offset + i, text, float(toxicity[i]), float(reward[i]), int(length[i]))
                for i, text in enumerate(generated.texts)]
        if not self.pass_at_k:
            return rows
        sampled = self._collect(trainer, pl_module, batch, len(prompts), chunk,
                                dataclasses.replace(settings, do_sample=True), repeats=self.pass_at_k)
        passed, mean = pass_at_k(sampled.scores.float().cpu(), self.pass_at_k)
        return [(*row, float(passed[i]), float(mean[i])) for i, row in enumerate(rows)]

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, n: int, chunk: int,
                 settings: GenerationSettings, repeats: int = 1) -> ro.Generated:
        """``repeats`` responses per prompt of ``batch`` (``n`` prompts) with ``settings``, seeded by the chunk;
        their scores finite."""
        with ro.evaluation_rng(self.seed + chunk, n * repeats, settings) as limits:
            generated = ro.collect(pl_module.policy, pl_module.reward, batch, settings, limits,
                                   synced_gpus=dist.synced_gpus(trainer), repeats=repeats)
        if generated.scores is None:
            raise ValueError(f"ToxicityCallback: the reward returned non-finite scores: {generated.reward_error}")
        return generated

    def _progress(self, trainer: L.Trainer, chunks: list[int], stage: str) -> Iterator[int]:
        # follow the trainer: no bar of ours when it shows none (enable_progress_bar=False)
        if not (self.progress and trainer.is_global_zero and getattr(trainer, "progress_bar_callback", None)):
            return iter(chunks)
        from tqdm.auto import tqdm

        return iter(tqdm(chunks, desc=f"Toxicity ({stage})", unit="batch", leave=False, dynamic_ncols=True))

    # ------------------------------------------------------------------ setup and checks

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        missing = [name for name in ("policy", "reward", "generation") if not hasattr(pl_module, name)]
        if missing:
            raise TypeError(
                f"ToxicityCallback measures a lit_rlhf PPOModule; {type(pl_module).__name__} lacks {missing}"
            )
        datamodule = trainer.datamodule
        if getattr(datamodule, "test_set", None) is None or not hasattr(datamodule, "collator"):
            raise ValueError(
                "ToxicityCallback reads its held-out prompts from the data module's `test_set` (DialogSumDataModule): "
                "pass a datamodule to trainer.fit / trainer.test"
            )
        describe = getattr(datamodule, "held_out_description", None)
        self.held_out = describe() if callable(describe) else "the data module's held-out prompts"
        self.prompts = select_prompts(datamodule.test_set, self.num_prompts,
                                      getattr(datamodule, "reference_column", "summary"))
        self.generation_used = self.generation or pl_module.generation
        self.evaluator.reads(self.text)  # one reading of a long prompt + response: a classifier cuts the prompt
        follow = getattr(self.evaluator, "follow_dtype", None)
        if follow is not None:  # a classifier without its own dtype runs in the policy's base dtype
            follow(getattr(pl_module, "weight_dtype", "float32"))
        self.evaluator.to(pl_module.device)
        pl_module.reward.to(pl_module.device)
        warning = self._warning(pl_module)
        if warning:
            rank_zero_warn(warning)

    def _warning(self, pl_module: L.LightningModule) -> str | None:
        return same_model_warning(self.evaluator, pl_module.reward)

    def _comparison(
        self, pl_module: L.LightningModule, before: Measurement, after: Measurement, settings: dict[str, Any]
    ) -> dict[str, Any]:
        return build_report(
            self.prompts, before, after, settings, self._warning(pl_module),
            num_samples=self.num_samples, strong_gain=self.strong_gain, strong_loss=self.strong_loss,
            bootstrap_resamples=self.bootstrap_resamples, confidence=self.confidence, seed=self.seed,
            test_method=self.paired_test,
        )

    def _settings(self, pl_module: L.LightningModule) -> dict[str, Any]:
        signature = self._signature()
        del signature["prompt_ids"]  # the report lists them with the per-prompt scores
        return {
            **signature,
            "evaluator_model_id": self.evaluator.model_id,
            "reward": pl_module.reward.describe(),
            "std": "population (ddof=0)",
            "paired_test": self.paired_test,
            "held_out": self.held_out,
            "num_prompts": self.num_prompts,
        }

    def _signature(self) -> dict[str, Any]:
        """What makes two measurements comparable: same prompts, evaluator, text, sampling and seeds."""
        return {
            "prompt_ids": [p.id for p in self.prompts],
            "evaluator": self.evaluator.describe(),
            "text": self.text,
            "generation": dataclasses.asdict(self.generation_used) if self.generation_used is not None else None,
            "seed": self.seed,
            "batch_size": self.batch_size,
            **({"pass_at_k": self.pass_at_k} if self.pass_at_k else {}),
        }

    def _restored_before(self) -> Measurement | None:
        restored, self._restored = self._restored, None
        return stored_before(restored, self._signature(), "resuming")

    # ------------------------------------------------------------------ output

    def _publish(self, trainer: L.Trainer, name: str, text: str) -> None:
        paths = publish_report(trainer, name, self.report, text)
        if paths is not None:  # the first process's; the others write nothing
            self.report_paths = paths

    def _log_comparison(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.report is not None:
            log_comparison(trainer, self.report, int(getattr(pl_module, "ppo_step", 0)))


# ---------------------------------------------------------------------------------------------- helpers


def check_callback_settings(
    num_prompts: int | None, text: str, batch_size: int, paired_test: str, num_samples: int
) -> None:
    """Raise a ValueError naming the ToxicityCallback argument that cannot work."""
    def setting(name: str) -> str:
        return f"ToxicityCallback's init_args.{name} (trainer.callbacks)"

    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"{setting('num_prompts')} must be at least 1 or None (all), got {num_prompts}")
    if text not in get_args(TextField):
        raise ValueError(f"{setting('text')} must be one of {list(get_args(TextField))}, got {text!r}")
    if batch_size < 1:
        raise ValueError(f"{setting('batch_size')} must be at least 1, got {batch_size}")
    if paired_test not in get_args(PairedTestMethod):
        choices = list(get_args(PairedTestMethod))
        raise ValueError(f"{setting('paired_test')} must be one of {choices}, got {paired_test!r}")
    if num_samples < 0:
        raise ValueError(f"{setting('num_samples')} must be 0 or more, got {num_samples}")


def same_model_warning(evaluator: ToxicityEvaluator, reward: Reward) -> str | None:
    """The report's warning when the evaluator is (one of) the model(s) behind the reward; None otherwise."""
    if not reward.uses_model(evaluator.model_id):
        return None
    return (
        f"the toxicity evaluator is the same model as the training reward ({evaluator.model_id}). The policy was "
        "optimised against this scorer, so a lower toxicity can be reward hacking rather than less toxic text: "
        "confirm with an independent evaluator."
    )
