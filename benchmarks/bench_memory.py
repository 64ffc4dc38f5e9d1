"""Benchmark: the peak memory of each phase of a lit_rlhf PPO / GRPO step with LoRA (rollout, scoring, update),
measured on config-built Qwen2 shapes that vary depth, width and vocabulary independently, and the per-phase
memory model (``memory_model.py``) fitted to them, checked on a held-out shape and used to predict Qwen2.5-7B.

    python benchmarks/bench_memory.py                     # every run, CPU, 1 thread (~45 min here)
    python benchmarks/bench_memory.py --resume --profile --families "ppo float32 False"   # live tensor bytes
    python benchmarks/bench_memory.py --tiny              # smoke run: a 0.3M-parameter shape, seconds a run
    python benchmarks/bench_memory.py --device cuda       # on a GPU: torch.cuda.max_memory_allocated per phase
    python benchmarks/bench_memory.py --render            # rewrite the report from its JSON

Each run is a fresh process (``--worker``): one step through a Lightning Trainer, its three phases wrapped. At
each phase's start: CPU, the RSS (``/proc/self/status`` VmRSS) and a reset of the high-water mark (``echo 5 >
/proc/self/clear_refs``), glibc's mmap threshold fixed at 64 KiB so that freed buffers leave RSS; the phase's
RSS peak is VmHWM minus that RSS. Beside it, allocator-independent: the live tensor bytes, from
``torch.profiler``'s memory events (every allocation and free of the CPU allocator, in order; the peak of their
running sum), in separate runs (``--profile``: the profiler's own buffers disturb RSS). CUDA: ``max_memory_allocated``
minus ``memory_allocated`` at the phase's start.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import memory_model as mm  # noqa: E402  (benchmarks/ is not a package)
from ppo_step.machine import reset_peak_rss as reset_peak  # noqa: E402
from ppo_step.machine import vm_kib as rss_kib  # noqa: E402

CACHE = HERE / ".cache"
MIB = 2**20
STEPS = 2
"""Steps a run takes; the last one is metered (the first one's lazy initialisations stay out of its peaks)."""
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(2**16), "MALLOC_TRIM_THRESHOLD_": "0"}

SHAPES = {
    "tiny": mm.qwen2_shape(64, 2, 2000),
    "base": mm.qwen2_shape(256, 4, 16384),  # the reference point
    "deep": mm.qwen2_shape(256, 8, 16384),  # 2x layers
    "wide": mm.qwen2_shape(512, 4, 16384),  # 2x hidden (and intermediate, heads)
    "vocab": mm.qwen2_shape(256, 4, 65536),  # 4x vocabulary
    "mid": mm.qwen2_shape(384, 6, 32768),  # all three between
    "lean": mm.qwen2_shape(384, 2, 8192),  # few layers, a small vocabulary, between the widths
    "big": mm.qwen2_shape(512, 8, 49152),  # all three at once: the held-out shape
    "0.5B": mm.Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936),
}
FIT_SHAPES, HELD_OUT = ("base", "deep", "wide", "vocab", "mid", "lean"), "big"


@dataclass(frozen=True)
class Config:
    """One measured configuration: the algorithm, the frozen weights' dtype, checkpointing, and the workload."""

    algo: str  # ppo (GAE, value head) or grpo (k = 4, critic-free)
    dtype: str = "float32"
    checkpointing: bool = False
    rows: int = 8
    prompt: int = 64
    response: int = 64
    micro: int | None = None
    chunk: int | None = None

    @property
    def name(self) -> str:
        parts = [self.algo, "fp32" if self.dtype == "float32" else "bf16"] + (["ckpt"] if self.checkpointing else [])
        if (self.rows, self.prompt, self.response) != (8, 64, 64):
            parts.append(f"{self.rows}x{self.prompt}+{self.response}")
        parts += ([f"micro{self.micro}"] if self.micro else []) + ([f"chunk{self.chunk}"] if self.chunk else [])
        return " ".join(parts)

    @property
    def family(self) -> tuple[str, str, bool]:
        """What one fit covers: the algorithm, dtype and checkpointing."""
        return self.algo, self.dtype, self.checkpointing

    def workload(self) -> mm.Workload:
        return mm.Workload(self.rows, self.prompt, self.response, self.micro, self.chunk)


FAMILIES = [Config(a, d, c) for d, c in (("bfloat16", True), ("bfloat16", False), ("float32", False))
            for a in ("ppo", "grpo")]
"""What one fit covers (the float32 base with checkpointing is left out: no 7B configuration uses it)."""
EXTRAS = [("base", Config("ppo", rows=16)), ("base", Config("ppo", response=128)),
          ("base", Config("ppo", micro=2, chunk=4)), ("base", Config("ppo", "bfloat16", True, rows=16)),
          ("base", Config("ppo", "bfloat16", True, micro=2, chunk=4))]
"""Checks of the rows x tokens and lever terms, predicted from the fit of their family."""
HEAVY_SHAPES = ("base", "deep", "wide")
HEAVY_FAMILIES = (("ppo", "bfloat16", True), ("ppo", "bfloat16", False), ("grpo", "bfloat16", True),
                  ("ppo", "float32", False))
"""Prompt-heavy fit points (8 rows of 448 + 16 tokens): activations and KV cache grow 3.6x, logits shrink 4x; at
64 + 64 tokens the logits outweigh the saved activations and leave their coefficient loose."""
FIT_WORKLOADS = ((8, 64, 64), (8, 448, 16))


def plan(tiny: bool, families: list[Config], cuda: bool = False,
         profile: bool = False) -> list[tuple[str, Config]]:
    if tiny:
        return [("tiny", Config("ppo", "bfloat16", True, rows=4, prompt=8, response=8, micro=2, chunk=2))]
    shapes = (*FIT_SHAPES, HELD_OUT) + (("0.5B",) if cuda else ())  # on a GPU: the 0.5B shape, a second check
    runs = [(shape, config) for config in families for shape in shapes]
    if profile:  # the live-tensor figure beside the RSS one: the seven shapes
        return runs
    heavy = [(s, replace(f, prompt=448, response=16)) for f in families if f.family in HEAVY_FAMILIES
             for s in HEAVY_SHAPES]
    return runs + heavy + [(s, c) for s, c in EXTRAS if c.family in {f.family for f in families}]


def build_model_dir(size: str, cache: Path = CACHE) -> Path:
    """The ``size`` shape saved with ``save_pretrained`` (random weights, float32, tied embeddings) with the
    embedded GPT-2 tokenizer (the ids it does not know decode to nothing), built once."""
    path = cache / f"qwen2-{size}"
    if (path / "config.json").exists():
        return path
    import torch
    import transformers as tf
    from transformers import AutoTokenizer, GenerationConfig

    from lit_rlhf.models import resolve_model_path

    s = SHAPES[size]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    eos = tokenizer.eos_token_id
    config = tf.Qwen2Config(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                            num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab,
                            tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=eos,
                            eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------------- worker (one configuration)


def tensor_peak(prof) -> tuple[int, int]:
    """(peak, net) of the running sum of the CPU allocator's allocations and frees the profiler recorded."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and str(e.device_type()).endswith("CPU")), key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak, total


class PhaseMeter:
    """Per-phase peaks: ``with meter("update"): ...`` records the phase's peak above its start."""

    def __init__(self, cuda: bool, profile: bool) -> None:
        self.cuda, self.profile, self.phases = cuda, profile and not cuda, {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            start, reset = rss_kib("VmRSS") * 1024, reset_peak()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) \
            if self.profile else None
        began = time.perf_counter()
        if prof is not None:
            prof.__enter__()
        try:
            yield
        finally:
            record: dict[str, Any] = {"seconds": time.perf_counter() - began}
            if self.cuda:
                torch.cuda.synchronize()
                record["cuda"] = torch.cuda.max_memory_allocated() - start
            else:  # read before the profiler's own result processing
                record.update(rss=rss_kib("VmHWM") * 1024 - start, rss_reset=reset)
            if prof is not None:
                prof.__exit__(None, None, None)
                record["tensors"], record["tensors_net"] = tensor_peak(prof)
            self.phases[name] = record  # the last step's (each phase runs once a step)


def make_module(spec: dict[str, Any], config: Config):
    import torch

    from lit_rlhf.modules import PPOModule
    from lit_rlhf.rewards import Reward
    from lit_rlhf.settings import GenerationSettings, LoraSettings, PPOSettings

    class LengthReward(Reward):  # no model: the peaks are the policy's
        def compute(self, prompts, responses, references):
            return torch.tensor([len(r) % 7 / 7.0 for r in responses])

    k = 4 if config.algo == "grpo" else 1
    n = config.response
    return PPOModule(
        spec["model_dir"], reward=LengthReward(), lora=LoraSettings(r=16, alpha=16),
        generation=GenerationSettings(min_new_tokens=n, max_new_tokens=(n, n + 1), batch_size=config.chunk),
        ppo=PPOSettings(advantage_estimator="grpo" if k > 1 else "gae", ppo_epochs=1), ppo_steps=STEPS,
        rollout_batch_size=config.rows // k, mini_batch_size=config.rows, micro_batch_size=config.micro,
        samples_per_prompt=k, dtype=config.dtype, gradient_checkpointing=config.checkpointing, log_samples_every=0,
        export_adapter=False, num_threads=spec["threads"])


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One step of ``spec``'s configuration, each phase metered; bytes."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lit_rlhf import rollout as ro

    torch.set_num_threads(spec["threads"])
    config, cuda = Config(**spec["config"]), spec["device"] == "cuda"
    meter, out = PhaseMeter(cuda, spec["profile"]), {}
    module = make_module(spec, config)
    k = 4 if config.algo == "grpo" else 1
    ids = torch.randint(10, 1900, (config.rows // k, config.prompt), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query": ["prompt"] * (config.rows // k)}

    def metered(name: str, fn):
        def call(*args, **kwargs):
            with meter(name):
                return fn(*args, **kwargs)
        return call

    collect, ro.collect = ro.collect, metered("rollout", ro.collect)  # (put back below: a test runs this in-process)

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():  # the weights are mapped from the file: read each, so their pages count now
                for p in pl_module.parameters():
                    p.sum()
            pl_module.policy.score = metered("scoring", pl_module.policy.score)
            pl_module._ppo_update = metered("update", pl_module._ppo_update)
            out["after_setup"] = torch.cuda.memory_allocated() if cuda else rss_kib("VmRSS") * 1024

    trainer = L.Trainer(accelerator="cuda" if cuda else "cpu", devices=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Watch()])
    try:
        trainer.fit(module, DataLoader([batch] * STEPS, batch_size=None))
    finally:
        ro.collect = collect
    params = list(module.policy.parameters())
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    out["trainable"] = sum(p.numel() for p in params if p.requires_grad)
    out["phases"] = meter.phases
    return out


# ---------------------------------------------------------------------------------- parent: runs in order


def run_one(shape: str, config: Config, args: argparse.Namespace) -> dict[str, Any]:
    spec = {"model_dir": str(build_model_dir(shape, Path(args.cache))), "config": asdict(config),
            "device": args.device, "threads": args.threads, "profile": args.profile}
    env = {**os.environ, **FIXED_MMAP, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{shape} {config.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"shape": shape, "config": asdict(config), "name": config.name, "profiled": spec["profile"],
            **json.loads(lines[-1][7:])}


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every planned (shape, configuration) in a fresh process; kept in OUT.json after each (a rerun skips what
    is there)."""
    families = [f for f in FAMILIES if not args.families or " ".join(map(str, f.family)) in args.families.split(",")]
    path = Path(args.out + ".json")
    results = json.loads(path.read_text()) if path.exists() and args.resume else []
    done = {(r["shape"], r["name"], r["profiled"]) for r in results}
    for shape, config in plan(args.tiny, families, args.device == "cuda", args.profile):
        if (shape, config.name, args.profile) in done:
            continue
        record = run_one(shape, config, args)
        key = "cuda" if args.device == "cuda" else "rss"
        print(f"{shape:>6} {config.name:<28} " + "  ".join(
            f"{p} {v[key] / MIB:7.1f}" + (f" ({v['tensors'] / MIB:.1f})" if "tensors" in v else "")
            for p, v in record["phases"].items()) + " MiB", flush=True)
        results.append(record)
        path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="a 0.3M-parameter shape: a smoke run")
    parser.add_argument("--families", default="", help="comma-separated 'algo dtype checkpointing' (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="CPU: also the live tensor bytes (torch.profiler; "
                        "its own buffers disturb RSS: these runs are kept apart from the RSS ones)")
    parser.add_argument("--resume", action="store_true", help="keep OUT.json's runs, run the rest")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    parser.add_argument("--out", default=str(HERE / "RESULTS_MEMORY"), help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    results = json.loads(Path(args.out + ".json").read_text()) if args.render else run_all(args)
    import memory_report  # (after the runs)

    Path(args.out + ".md").write_text(memory_report.render(results, args.device, " ".join(sys.argv[1:])))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
