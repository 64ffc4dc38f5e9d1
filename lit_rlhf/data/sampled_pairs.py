"""Preference pairs made by sampling: two responses of a policy to each training prompt, ranked by a reward.

    rank_pair            two responses and their scores -> (chosen, rejected) or why the pair is dropped
    sample_pairs         a policy, a prompt data module's training prompts, a rule (any Reward) -> pair records
    load_bundled_pairs   ``bundled:dialogsum-pairs``: the pairs shipped with lit_rlhf (made by ``main``)
    main                 ``python -m lit_rlhf.data.sampled_pairs``: the DialogSum pairs of the embedded summarizer

The rule is a ``lit_rlhf.rewards.Reward`` (the one scoring path of PPO): for the bundled pairs it is the offline
recipe's own reward, the profanity model's "not offensive" logit + 10 x ROUGE-1 against the reference summary,
so a reward model learnt from the pairs, PPO against that reward model and DPO on the pairs all aim at the
reward the recipe's PPO optimises directly. Prompts come from the data module's training part only: its
held-out part (the toxicity report's prompts) never appears in a pair.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lit_rlhf import rollout as ro
from lit_rlhf.data.formats import PROMPT_FIT
from lit_rlhf.rewards import CompositeReward, Reward
from lit_rlhf.runtime import atomic_write
from lit_rlhf.settings import GenerationSettings, longest_response

if TYPE_CHECKING:
    import datasets

    from lit_rlhf.data.prompts import PromptDataModule
    from lit_rlhf.models import Policy

CHUNK_SEED_STRIDE = 1_000_003
"""Chunk k of a run with seed s samples from seed s x CHUNK_SEED_STRIDE + k."""

BUNDLED_FILE = "dialogsum_pairs.jsonl.gz"
"""The bundled pairs, in ``lit_rlhf/assets/dialogsum_pairs``."""


def rank_pair(texts: tuple[str, str], scores: tuple[float, float], min_gap: float) -> tuple[int, int] | str:
    """(chosen index, rejected index) of two responses, or why they make no pair: ``identical`` texts,
    ``near_tie`` (scores less than ``min_gap`` apart: a coin flip would decide), ``empty`` (a blank response)."""
    if not texts[0].strip() or not texts[1].strip():
        return "empty"
    if texts[0] == texts[1]:
        return "identical"
    if abs(scores[0] - scores[1]) < min_gap:
        return "near_tie"
    return (0, 1) if scores[0] > scores[1] else (1, 0)


def _parts(rule: Reward, scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each part of the rule's last scores (a composite's components, or the one score)."""
    if isinstance(rule, CompositeReward):
        return dict(rule.last_components)
    return {rule.name: scores}


@torch.no_grad()
def sample_pairs(
    policy: Policy, datamodule: PromptDataModule, rule: Reward, settings: GenerationSettings, *,
    num_prompts: int | None = None, batch_size: int = 32, seed: int = 0, min_gap: float = 0.0,
    skipped: Counter[str] | None = None, progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Pair records from the data module's training prompts (in their order; the first ``num_prompts``, None:
    all): two responses sampled per prompt (``rollout.collect``, the training rollout's path), scored by
    ``rule``, the higher-scoring one chosen. Prompts that were cut (to ``data.max_prompt_tokens`` or to the
    model's context) are left out, so the recorded prompt text is exactly what the policy read. Chunk k of ``batch_size`` prompts samples from
    seed x ``CHUNK_SEED_STRIDE`` + k (the same records whatever the chunk order). ``skipped`` counts what made no pair.

    A record: ``id``, ``prompt`` (the prompt text), ``chosen``, ``rejected``, ``reference``, ``chosen_score``,
    ``rejected_score`` and each part of the rule as ``chosen_<part>``/``rejected_<part>``."""
    skipped = skipped if skipped is not None else Counter()
    rows = datamodule.train_set
    total = len(rows) if num_prompts is None else min(num_prompts, len(rows))
    start_time = time.perf_counter()
    for k, start in enumerate(range(0, total, batch_size)):
        chunk = [rows[i] for i in range(start, min(start + batch_size, total))]
        # the encoding recorded how each prompt met its limits: a cut one's ids are not its recorded text
        cut = [row[PROMPT_FIT] == "cut" for row in chunk]
        skipped["prompt_truncated"] += sum(cut)
        chunk = [row for row, c in zip(chunk, cut) if not c]
        if chunk:
            batch = move_data_to_device(datamodule.collator(chunk), next(policy.parameters()).device)
            chunk_seed = seed * CHUNK_SEED_STRIDE + k  # runs of different seeds share no chunk's stream
            # the measurement's seeded sampling: length limits and torch's RNG from chunk_seed, isolated
            with ro.evaluation_rng(chunk_seed, 2 * len(chunk), settings) as limits:
                generated = ro.collect(policy, rule, batch, settings, limits, fast=True, repeats=2)
            if generated.scores is None:
                raise ValueError(f"the rule returned non-finite scores: {generated.reward_error}")
            scores = generated.scores.float().cpu().tolist()
            parts = {name: v.float().cpu().tolist() for name, v in _parts(rule, generated.scores).items()}
            for i, row in enumerate(chunk):
                a, b = 2 * i, 2 * i + 1
                ranked = rank_pair((generated.texts[a], generated.texts[b]), (scores[a], scores[b]), min_gap)
                if isinstance(ranked, str):
                    skipped[ranked] += 1
                    continue
                c, r = (a, b) if ranked == (0, 1) else (b, a)
                record = {"id": str(row["id"]), "prompt": row["prompt"], "chosen": generated.texts[c],
                          "rejected": generated.texts[r], "reference": batch["reference"][i] if batch.get("reference")
                          else None, "chosen_score": scores[c], "rejected_score": scores[r]}
                for name, values in parts.items():
                    record[f"chosen_{name}"], record[f"rejected_{name}"] = values[c], values[r]
                yield record
        done = min(start + batch_size, total)
        if progress and (k % 20 == 0 or done == total):
            elapsed = time.perf_counter() - start_time
            print(f"sampled pairs: {done}/{total} prompts, {elapsed:.0f}s, skipped {dict(skipped)}",
                  file=sys.stderr, flush=True)


def load_bundled_pairs() -> datasets.DatasetDict:
    """The DialogSum preference pairs shipped in ``lit_rlhf/assets/dialogsum_pairs`` (one split, ``train``;
    how they were made: that folder's PROVENANCE.md)."""
    import datasets

    from lit_rlhf.data.sources import quiet_datasets_progress

    with contextlib.ExitStack() as stack, quiet_datasets_progress():
        path = stack.enter_context(resources.as_file(
            resources.files("lit_rlhf.assets.dialogsum_pairs").joinpath(BUNDLED_FILE)))
        return datasets.load_dataset("json", data_files={"train": str(path)})


def recipe_rule() -> CompositeReward:
    """The offline recipe's reward (``configs/detox_summarizer.yaml``): profanity "not offensive" logit + 10 x
    ROUGE-1 F against the reference."""
    from lit_rlhf.rewards import ProfanityReward, ReferenceSimilarityReward

    return CompositeReward([ProfanityReward(), ReferenceSimilarityReward()], weights=[1.0, 10.0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lit_rlhf.data.sampled_pairs",
        description="Preference pairs for DialogSum: two sampled summaries of a model per training dialogue of the "
                    "offline recipe's split (the toxicity report's held-out dialogues are never used), the one with "
                    "the higher recipe reward (profanity 'not offensive' logit + 10 x ROUGE-1 against the reference) "
                    "chosen. Writes a .jsonl(.gz) that lit-rlhf-rm and lit-rlhf-dpo read with --data.dataset.")
    parser.add_argument("--out", required=True, help="output file (.jsonl or .jsonl.gz)")
    parser.add_argument("--model", default="embedded:summarizer", help="the sampling model (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N training dialogues (all)")
    parser.add_argument("--min-gap", type=float, default=0.5,
                        help="drop pairs whose rewards differ by less than this (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, nargs=2, default=[24, 56], metavar=("LOW", "HIGH"),
                        help="each response's length limit, drawn from [LOW, HIGH) (the recipe's; default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation call (default: %(default)s)")
    args = parser.parse_args(argv)

    from lit_rlhf.data.dialogsum import DialogSumDataModule
    from lit_rlhf.models import build_policy

    settings = GenerationSettings(min_new_tokens=4, max_new_tokens=tuple(args.max_new_tokens))
    # a decoder-only model's prompts leave room for the longest response, as lit-rlhf's link does
    datamodule = DialogSumDataModule(model_name=args.model, dataset="bundled", max_prompt_tokens=256,
                                     reserve_tokens=longest_response(settings.max_new_tokens))
    datamodule.prepare_data()
    datamodule.setup("fit")
    policy, _ = build_policy(dict(model_name=args.model, finetune="full", value_head=False), "float32", None)
    rule = recipe_rule()
    rule.setup()
    skipped: Counter[str] = Counter()
    records = sample_pairs(policy, datamodule, rule, settings, num_prompts=args.num_prompts,
                           batch_size=args.batch_size, seed=args.seed, min_gap=args.min_gap, skipped=skipped)
    count = 0

    def write(raw: BinaryIO) -> None:  # the file appears whole, at the end (an interrupted run leaves none)
        nonlocal count
        gz = args.out.endswith(".gz")
        sink = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if gz else raw
        for record in records:
            sink.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
        if gz:
            sink.close()  # ends the gzip stream; the file itself stays open for atomic_write

    out = atomic_write(args.out, write)
    print(f"{count} pairs written to {out}; skipped: {dict(skipped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
