"""Benchmark: what the KV-cached rollout's prefill holds, with every layer's hidden states (``output_hidden_states``,
as lit_rlhf 0.4 called the model) and with the last layer's only (a hook on the decoder stack), and without a
value head (no hidden state at all).

    python benchmarks/bench_prefill_memory.py            # Llama-shaped, 8 layers, hidden 512, 32 rows x 256 tokens

Each mode runs in a fresh process: a config-built model with random weights, then one prefill (``lm.start`` +
``lm.step``). Peak: the high-water RSS (``/proc/self/status`` VmHWM, reset just before the prefill) minus the RSS
before it (glibc's mmap threshold fixed: ``FIXED_MMAP``); on CPU this counts every transient buffer of the forward
(attention, MLP), not only the hidden states.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

MODES = ("every-layer", "last-layer", "no-value-head")
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(2**16), "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc: every buffer over 64 KiB in its own mapping, returned when freed (a fixed threshold: the default one grows
after each freed mapping, so that freed tensors stay resident and the peak moves by tens of MiB from run to run)."""


def every_layer(model, positions, with_hidden, **inputs):
    """The forward as lit_rlhf 0.4 called it: every layer's states returned, the last one read."""
    out = model(**inputs, output_hidden_states=True)
    states = out.decoder_hidden_states if getattr(out, "decoder_hidden_states", None) else out.hidden_states
    return out, states[-1][:, positions]


def worker(mode: str, args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_rlhf.models import lm as lm_module
    from ppo_step.machine import reset_peak_rss, vm_kib

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab)
    model = LlamaForCausalLM(config).eval()
    lm = lm_module.lm_kind(config)
    ids = torch.randint(0, args.vocab, (args.rows, args.tokens))
    mask = torch.ones_like(ids)
    recorded: list = []
    hook = model.register_forward_hook(lambda _, a, out: recorded.append(
        sum(h.nbytes for h in (out.hidden_states or ()))))
    if mode == "every-layer":
        lm_module.forward_with_last_hidden = every_layer
    before = vm_kib("VmRSS")
    reset = reset_peak_rss()
    with torch.no_grad():
        state = lm.start(model, ids, mask, horizon=1)
        _, hidden = lm.step(model, state, with_hidden=mode != "no-value-head")
    hook.remove()
    return {"mode": mode, "peak_mib": (vm_kib("VmHWM") - before) / 1024, "peak_reset": reset,
            "returned_hidden_states_mib": recorded[0] / 2**20,
            "kept_after_mib": 0.0 if hidden is None else hidden.untyped_storage().nbytes() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 8), ("hidden", 512), ("rows", 32), ("tokens", 256), ("vocab", 8192)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--worker", choices=MODES)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    passed = [f"--{n}={getattr(args, n)}" for n in ("layers", "hidden", "rows", "tokens", "vocab")]
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--worker", mode, *passed], capture_output=True, text=True,
                             check=True, env={**os.environ, **FIXED_MMAP})
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
