"""Reference log-probs: decoded beside the policy's rows, or in a separate teacher-forced pass? Timed here.

With LoRA the reference is the policy's own frozen weights with the adapter disabled, so a rollout could decode
2B rows at once: the B policy rows, and B reference rows fed the same tokens, reading the frozen weights once per
step for both (peft's per-row adapter selection, ``"__base__"`` for the reference rows). lit_rlhf instead runs
one teacher-forced pass of the reference over the B finished responses. Which is faster depends on how a decode
step's time grows with its rows: free where a step is bound by reading the weights, not where it is bound by
arithmetic. This script times both ways on the benchmark's flan-t5-base-sized model (LoRA r 32 on q, v), and
checks that the reference rows' log-probs equal the teacher-forced reference's.

    python benchmarks/bench_reference_rows.py --threads 1                    # workload A: 16 x 200 tokens, 32 new
    python benchmarks/bench_reference_rows.py --threads 1 --dtype bfloat16
    python benchmarks/bench_reference_rows.py --tiny                         # smoke run on the embedded tiny T5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_step.settings import DEFAULT_CACHE, PPO  # noqa: E402
from ppo_step.workloads import build_model_dir, workload_prompts  # noqa: E402

from lit_rlhf.models import Policy  # noqa: E402
from lit_rlhf.settings import LoraSettings  # noqa: E402


def decode(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, steps: int, beside: bool,
           forced: torch.Tensor | None = None):
    """``steps`` greedy decode steps of the B policy rows (or the tokens ``forced`` [B, T]); with ``beside``, B
    reference rows (adapter off) decoded in the same batch, fed the policy rows' tokens. Returns (tokens [B, T],
    policy log-probs [B, T], reference log-probs [B, T] or None)."""
    rows = ids.shape[0]
    if beside:
        ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])
        # peft's mixed-adapter batch (the hooks behind its public ``adapter_names`` argument of forward and
        # generate, entered here once so the encoder and every decode step get them): every LoRA layer applies
        # the adapter to the first B rows only
        adapters = policy.model._enable_peft_forward_hooks(adapter_names=["default"] * rows + ["__base__"] * rows)
    tokens = torch.zeros(rows, steps, dtype=torch.long, device=ids.device)
    logprobs = torch.zeros(2 if beside else 1, rows, steps, device=ids.device)
    with torch.no_grad(), adapters if beside else nullcontext():
        state = policy.lm.start(policy.model, ids, mask, horizon=steps)
        for t in range(steps):
            logits, _ = policy.lm.step(policy.model, state, with_hidden=False)
            token = logits[:rows].argmax(-1) if forced is None else forced[:, t]
            chosen = token.repeat(2) if beside else token
            logprobs[:, :, t] = torch.log_softmax(logits.float(), -1).gather(1, chosen[:, None]).view(-1, rows)
            tokens[:, t] = token
            policy.lm.advance(state, chosen)
    return tokens, logprobs[0], logprobs[1] if beside else None


def synchronize() -> None:
    """Wait for queued GPU work, so that a timing measures it (nothing to wait for on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeats: int):
    """The function's result and its median seconds over ``repeats`` calls (after one unmeasured call)."""
    result, seconds = fn(), []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="smoke run on the embedded tiny T5 (seconds)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps (default: 32; --tiny: 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the PPO benchmark)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the frozen weights' dtype")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each way (median; default 3)")
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, ...)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the benchmark model is built")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.new_tokens or (8 if args.tiny else 32)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.cache_dir, args.tiny)
    batch = workload_prompts("A" if not args.tiny else "B", model_dir, 1)[0][0]
    ids, mask = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)

    torch.manual_seed(0)
    lora = LoraSettings(r=PPO.lora_r, alpha=PPO.lora_alpha, dropout=PPO.lora_dropout, target_modules=list(PPO.lora_targets))
    policy = Policy(str(model_dir), lora=lora, dtype=args.dtype).eval().to(args.device)
    for name, p in policy.named_parameters():  # a trained-looking adapter: policy and reference differ
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)

    (tokens, policy_lp, _), alone_s = timed(lambda: decode(policy, ids, mask, steps, beside=False), args.repeats)
    # the same tokens (in bf16 a batch of 2B rows rounds differently, and greedy choices could flip)
    (_, policy_lp2, ref_lp), beside_s = timed(lambda: decode(policy, ids, mask, steps, True, tokens), args.repeats)
    # control: 2B rows that all use the adapter, no per-row selection (what 2B rows cost without peft's hooks)
    doubled = torch.cat([tokens, tokens])
    _, doubled_s = timed(lambda: decode(policy, torch.cat([ids, ids]), torch.cat([mask, mask]), steps, False, doubled),
                         args.repeats)
    response_mask = torch.ones_like(tokens)
    forward, forward_s = timed(lambda: policy.reference_forward(ids, mask, tokens, response_mask), args.repeats)

    # The reference rows must score as the teacher-forced reference does, as closely as the policy's own decode
    # matches its teacher-forced forward (float32: to rounding; bfloat16: to bf16's rounding of either way)
    with torch.no_grad():
        own = policy(ids, mask, tokens, response_mask).logprobs.float()
    own_gap = float((policy_lp - own).abs().max())
    tol = max(1e-4, 2 * own_gap)
    policy_gap = float((policy_lp - policy_lp2).abs().max())
    ref_gap = float((ref_lp - forward.logprobs.float()).abs().max())
    adapter_gap = float((ref_lp - policy_lp).abs().max())
    assert ref_gap <= tol, f"reference rows' log-probs differ from the teacher-forced reference's by {ref_gap:.2e}"
    assert policy_gap <= tol, f"policy rows decoded beside reference rows differ from alone by {policy_gap:.2e}"
    assert adapter_gap > 10 * ref_gap, "the adapter changes nothing: the check above would not tell the two apart"

    rows, prompt = ids.shape[0], int(mask.sum(1).max())
    extra = beside_s - alone_s
    print(f"lit_rlhf reference rows benchmark: {rows} rows, prompts up to {prompt} tokens, {steps} new tokens, "
          f"{args.dtype}, {args.device}, {args.threads} thread(s), median of {args.repeats}")
    print(f"| way | seconds | per decode step (ms) |\n|---|---:|---:|")
    print(f"| decode, {rows} policy rows | {alone_s:.3f} | {1000 * alone_s / steps:.1f} |")
    print(f"| decode, {rows} policy + {rows} reference rows | {beside_s:.3f} | {1000 * beside_s / steps:.1f} |")
    print(f"| extra for the reference rows | {extra:.3f} | {1000 * extra / steps:.1f} |")
    print(f"| control: decode, {2 * rows} policy rows (no per-row adapters) | {doubled_s:.3f} | "
          f"{1000 * doubled_s / steps:.1f} |")
    print(f"| reference teacher-forced pass, {rows} rows | {forward_s:.3f} | – |")
    print(f"checks (max |d log p|): reference rows vs the teacher-forced reference {ref_gap:.2e} (tolerance "
          f"{tol:.1e}: 2x the policy's decode vs its teacher-forced forward, {own_gap:.2e}); policy rows alone vs "
          f"beside {policy_gap:.2e}; policy vs reference {adapter_gap:.2e}")
    faster = "reference rows beside the policy rows" if extra < forward_s else "the separate teacher-forced pass"
    print(f"faster here: {faster} (extra decode time / teacher-forced pass = {extra / forward_s:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
