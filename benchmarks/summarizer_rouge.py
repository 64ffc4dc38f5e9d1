"""ROUGE of a summarizer and of two extractive baselines on the bundled DialogSum test split.

The test set is the 500 test dialogues, each against its FIRST reference summary (``summary1``). The
baselines are computed on the same rows with the same metric (torchmetrics ROUGEScore, F-measure, mean
over dialogues): Lead-2 (the first two utterances) and Longest-3 (the three longest utterances).

It also measures whether the model reads the dialogue at all: the reference summaries' loss (teacher
forcing, nats per token) given each row's own dialogue and given another row's dialogue (the batch rolled by
one). A model that only learned the summaries' language scores the same on both.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/summarizer_rouge.py --model embedded:summarizer
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/summarizer_rouge.py --model path/to/model --json out.json

The model's summaries are greedy, from the PPO/SFT prompt (``DEFAULT_PROMPT_TEMPLATE``), with the prompt cut
to ``--max-prompt-tokens`` as in ``configs/sft_embedded.yaml``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from collections.abc import Iterator
from importlib import resources

import torch

from lit_rlhf.data import DEFAULT_PROMPT_TEMPLATE, PromptCollator, apply_prompt_and_tokenize, tokenize_summary
from lit_rlhf.modules import SFTModule, lead_summary, longest_summary, rouge_scores


def load_test_rows() -> list[dict]:
    """The bundled test split: 500 dialogues with their three references, in file order."""
    source = resources.files("lit_rlhf.assets.dialogsum").joinpath("dialogsum.test.jsonl.gz")
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def load_module(model: str, max_new_tokens: int, no_repeat_ngram_size: int, init_adapter: str | None) -> SFTModule:
    """A whole model folder or name (plus ``init_adapter``), or an SFT Lightning checkpoint (``*.ckpt``)."""
    settings = {"max_new_tokens": max_new_tokens, "no_repeat_ngram_size": no_repeat_ngram_size}
    if model.endswith(".ckpt"):
        return SFTModule.load_from_checkpoint(model, map_location="cpu", **settings).eval()
    return SFTModule(model, finetune="full", init_adapter=init_adapter, **settings).eval()


def batches(module: SFTModule, dialogues: list[str], max_prompt_tokens: int, batch_size: int,
            references: list[str] | None = None) -> Iterator[dict]:
    """Padded prompt batches of ``dialogues`` as the data module builds them (with the reference summaries
    as ``summary_ids`` ending in eos, when given)."""
    tokenizer = module.policy.tokenizer
    collate = PromptCollator(tokenizer.pad_token_id, "right" if module.policy.is_seq2seq else "left")
    for start in range(0, len(dialogues), batch_size):
        chunk = {"dialogue": dialogues[start : start + batch_size]}
        columns = apply_prompt_and_tokenize(chunk, tokenizer, DEFAULT_PROMPT_TEMPLATE, max_prompt_tokens)
        if references is not None:
            chunk["summary"] = references[start : start + batch_size]
            columns |= tokenize_summary(chunk, tokenizer, max_summary_tokens=None)
        rows = [{"id": "", **dict(zip(columns, row))} for row in zip(*columns.values())]
        yield collate(rows)


def model_summaries(module: SFTModule, dialogues: list[str], max_prompt_tokens: int, batch_size: int) -> list[str]:
    """Greedy summaries of ``dialogues`` by the module's policy."""
    out: list[str] = []
    for batch in batches(module, dialogues, max_prompt_tokens, batch_size):
        with torch.no_grad():
            out += module.generate_summaries(batch)
    return out


def dialogue_dependence(module: SFTModule, dialogues: list[str], references: list[str], max_prompt_tokens: int,
                        batch_size: int) -> dict[str, float]:
    """Reference loss (nats per summary token, mean over batches) with each row's own dialogue, and how much
    higher it is with the next row's dialogue (``SFTModule.prompt_gap``)."""
    own, gap = [], []
    for batch in batches(module, dialogues, max_prompt_tokens, batch_size, references):
        if len(batch["input_ids"]) > 1:
            with torch.no_grad():
                loss = module.sft_loss(batch)
                own.append(loss.item())
                gap.append(module.prompt_gap(batch, loss).item())
    return {"loss_own_dialogue": round(sum(own) / len(own), 4), "gap": round(sum(gap) / len(gap), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder, name or SFT checkpoint (.ckpt) to evaluate (omit: baselines only)")
    parser.add_argument("--init-adapter", default=None)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0: plain greedy decoding")
    parser.add_argument("--limit", type=int, default=None, help="first N dialogues only (quick look; not a result)")
    parser.add_argument("--samples", type=int, default=3, help="print this many example summaries")
    parser.add_argument("--json", default=None, help="also write the scores to this file")
    args = parser.parse_args()
    rows = load_test_rows()[: args.limit]
    dialogues, references = [r["dialogue"] for r in rows], [r["summary1"] for r in rows]
    results = {
        "rows": len(rows),
        "lead-2": rouge_scores([lead_summary(d, 2) for d in dialogues], references),
        "longest-3": rouge_scores([longest_summary(d, 3) for d in dialogues], references),
    }
    if args.model:
        start = time.perf_counter()
        module = load_module(args.model, args.max_new_tokens, args.no_repeat_ngram_size, args.init_adapter)
        summaries = model_summaries(module, dialogues, args.max_prompt_tokens, args.batch_size)
        results["model"] = {"name": args.model, "no_repeat_ngram_size": args.no_repeat_ngram_size,
                            **rouge_scores(summaries, references),
                            "seconds": round(time.perf_counter() - start, 1),
                            "reads_dialogue": dialogue_dependence(module, dialogues, references,
                                                                  args.max_prompt_tokens, args.batch_size)}
        for i in range(min(args.samples, len(rows))):
            print(f"--- {rows[i]['fname']}\nreference: {references[i]}\ngenerated: {summaries[i]}")
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
