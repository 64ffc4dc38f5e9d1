"""The per-phase memory model of a lit_rlhf PPO / GRPO step with LoRA (numpy only: no torch at import).

A step has three phases, each measured as its own peak above the memory held when it starts:

    rollout   generation (prefill + KV-cached decode) of ``chunk`` rows at a time, and the reward
    scoring   the reference log-probs (and, without fast rollout, the old log-probs), ``micro`` rows a pass
    update    forward + backward + optimizer step, ``micro`` rows a pass

Each phase's bytes = sum over its terms of (fitted coefficient x feature), every feature a byte count with a
physical meaning, so a coefficient is "how many such buffers are alive at the peak" (fitted non-negative):

    kv          2 x layers x rows x tokens x kv_dim x dtype bytes    the KV cache (rollout)
    prefill     rows x prompt tokens x (hidden + intermediate) x b   one block's transient buffers in the prefill
    sampling    rows x vocab x 4                                     one decode step's float32 logits
    block       rows x tokens x (hidden + intermediate) x b          one block's transient buffers (scoring, update)
    activations rows x tokens x layers x hidden x b                  what autograd keeps per layer (update)
    logits      rows x response tokens x vocab x 4                   float32 logits (their copies and gradient)
    lse         min(rows x response tokens x vocab, 2**24) x 4       one chunk of ``logprobs_from_logits``'s
                                                                     logsumexp (2**24 logits at a time)
    attention   rows x heads x tokens**2 x 4                         one layer's float32 attention scores (CPU:
                                                                     its sdpa materialises them; a GPU's flash /
                                                                     memory-efficient kernels do not: dropped)
    head        vocab x hidden x 4                                   a float32 copy of the LM head's weight: CPU
                                                                     bfloat16 kernels make one (and more) per call;
                                                                     a GPU's do not, so the GPU prediction drops it
    const       1                                                    a fixed overhead (allocator, small tensors)

The update also allocates the trainable weights' gradients (4 bytes a trainable float32 parameter; AdamW's two
moments are allocated at the first step and kept, and the second step is the one measured): a known amount,
subtracted before the fit and added back to the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

GIB = 2**30
PHASES = ("rollout", "scoring", "update")
FEATURES = {
    "rollout": ("kv", "prefill", "sampling", "attention", "head", "const"),
    "scoring": ("block", "logits", "lse", "attention", "head", "const"),
    "update": ("activations", "block", "logits", "lse", "attention", "head", "const"),
}
LSE_CHUNK = 2**24
"""Logits per logsumexp call in ``lit_rlhf.models.lm.logprobs_from_logits`` (its ``chunk_elements``)."""
CPU_ONLY = ("attention", "head")
"""Terms of CPU kernels only, dropped from a GPU prediction (``predict_step``)."""


@dataclass(frozen=True)
class Shape:
    """A Qwen2/Llama-style causal decoder."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = True  # LM head shares the embedding

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def parameters(self) -> int:
        """Parameters (Qwen2's q/k/v biases; an untied LM head adds vocab x hidden)."""
        h, kv = self.hidden, self.kv_dim
        attention = h * (h + 2 * kv) + (h + 2 * kv) + h * h
        block = attention + 3 * h * self.intermediate + 2 * h
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + head + self.layers * block + h

    def lora_parameters(self, r: int) -> int:
        """LoRA r on q_proj and v_proj of every layer (peft's default targets for Qwen2 / Llama)."""
        return self.layers * r * ((self.hidden + self.hidden) + (self.hidden + self.kv_dim))


def qwen2_shape(hidden: int, layers: int, vocab: int) -> Shape:
    """A small shape with Qwen2.5-7B's proportions where they matter: intermediate ~5.25 x hidden, head_dim 64,
    half as many key-value heads as query heads."""
    heads = hidden // 64
    return Shape(hidden, layers, heads, max(1, heads // 2), int(round(hidden * 5.25 / 64)) * 64, vocab)


QWEN25_7B = Shape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152_064, tied=False)


@dataclass(frozen=True)
class Workload:
    """Rows and tokens of one step, and the levers that bound them."""

    rows: int
    prompt: int
    response: int
    micro: int | None = None  # rows per scoring / update pass (model.micro_batch_size); None: all rows
    chunk: int | None = None  # rows decoded at once (model.generation.batch_size); None: all rows
    lora_r: int = 16
    logprob_chunk: int | None = None  # token positions whose float32 logits exist at once; None: a pass's all

    @property
    def tokens(self) -> int:
        return self.prompt + self.response

    @property
    def pass_rows(self) -> int:
        return self.micro or self.rows

    @property
    def decode_rows(self) -> int:
        return self.chunk or self.rows


def features(phase: str, shape: Shape, wl: Workload, dtype_bytes: int) -> np.ndarray:
    """The feature vector (bytes) of ``phase``, in ``FEATURES[phase]``'s order."""
    b, h, i = dtype_bytes, shape.hidden, shape.intermediate
    c, m = wl.decode_rows, wl.pass_rows
    logit_positions = m * wl.response if wl.logprob_chunk is None else min(wl.logprob_chunk, m * wl.response)
    values = {
        "kv": 2.0 * shape.layers * c * wl.tokens * shape.kv_dim * b,
        "prefill": float(c * wl.prompt * (h + i) * b),
        "sampling": float(c * shape.vocab * 4),
        "block": float(m * wl.tokens * (h + i) * b),
        "activations": float(m * wl.tokens * shape.layers * h * b),
        "logits": float(logit_positions * shape.vocab * 4),
        "lse": float(min(logit_positions * shape.vocab, LSE_CHUNK) * 4),
        "head": float(shape.vocab * shape.hidden * 4),
        "attention": float((c * wl.prompt**2 if phase == "rollout" else m * wl.tokens**2) * shape.heads * 4),
        "const": 1.0,
    }
    return np.array([values[name] for name in FEATURES[phase]])


def known_bytes(phase: str, shape: Shape, wl: Workload) -> float:
    """What the phase allocates that needs no fit: the update's gradients of the LoRA weights."""
    return 4.0 * shape.lora_parameters(wl.lora_r) if phase == "update" else 0.0


@dataclass(frozen=True)
class Point:
    """One measured phase: its shape, workload, dtype bytes and measured peak (bytes above the phase's start)."""

    shape: Shape
    workload: Workload
    dtype_bytes: int
    peak: float
    name: str = ""


def fit(phase: str, points: Sequence[Point]) -> np.ndarray:
    """Non-negative least-squares coefficients of ``phase``'s features over ``points`` (a coefficient counts
    buffers: none is negative; scaled columns, so that a feature of a few bytes and one of a gigabyte weigh alike
    in the solve). scipy's ``nnls``; numpy's unconstrained ``lstsq`` where scipy is missing."""
    a = np.array([features(phase, p.shape, p.workload, p.dtype_bytes) for p in points])
    y = np.array([p.peak - known_bytes(phase, p.shape, p.workload) for p in points])
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    try:
        from scipy.optimize import nnls
    except ImportError:
        coef = np.linalg.lstsq(a / scale, y, rcond=None)[0]
    else:
        coef = nnls(a / scale, y)[0]
    return coef / scale


def predict(phase: str, coef: np.ndarray, shape: Shape, wl: Workload, dtype_bytes: int) -> float:
    """Predicted peak bytes of ``phase`` (above what the phase starts with)."""
    return float(features(phase, shape, wl, dtype_bytes) @ coef) + known_bytes(phase, shape, wl)


def heldout_error(phase: str, train: Sequence[Point], held: Point) -> tuple[float, float]:
    """(predicted bytes, error in percent of the measured) of the ``held`` point from a fit on ``train``."""
    guess = predict(phase, fit(phase, train), held.shape, held.workload, held.dtype_bytes)
    return guess, 100.0 * (guess - held.peak) / held.peak


def leave_one_out(phase: str, points: Sequence[Point]) -> list[tuple[str, float]]:
    """Each point held out in turn from a fit on the others: (its name, error in percent)."""
    return [(p.name, heldout_error(phase, [q for q in points if q is not p], p)[1]) for p in points]


# ---------------------------------------------------------------------------------- the 7B prediction


@dataclass(frozen=True)
class Lever:
    """A 7B configuration: frozen-weight dtype, checkpointing, rows per pass / decoded at once, chunked log-probs."""

    dtype: str
    checkpointing: bool
    micro: int | None
    chunk: int | None = None
    logprob_chunk: int | None = None

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2


LEVERS_7B = (
    Lever("float32", False, 16), Lever("bfloat16", False, 16), Lever("bfloat16", False, 4),
    Lever("bfloat16", True, 16), Lever("bfloat16", True, 8), Lever("bfloat16", True, 4),
    Lever("bfloat16", True, 4, chunk=16),
    Lever("bfloat16", True, 2, chunk=16), Lever("bfloat16", True, 1, chunk=16),
    Lever("bfloat16", True, 4, chunk=16, logprob_chunk=1024), Lever("bfloat16", True, 16, chunk=16, logprob_chunk=1024),
    Lever("bfloat16", False, 4, chunk=16, logprob_chunk=1024),
)
"""micro: rows per scoring / update pass; chunk: rows decoded at once (None: all 64); logprob_chunk: the opt-in
chunked log-probs (float32 logits of that many token positions at a time)."""
WORKLOAD_7B = Workload(rows=64, prompt=512, response=512)  # 16 prompts x 4 samples


def static_bytes(shape: Shape, dtype_bytes: int, lora_r: int, value_head: bool) -> dict[str, float]:
    """What every phase sits on: the frozen weights, and the LoRA (+ value head) weights with AdamW's two moments
    (held from the first optimizer step on); the gradients are the update's (``known_bytes``)."""
    trainable = shape.lora_parameters(lora_r) + (shape.hidden + 1 if value_head else 0)
    return {"weights": float(shape.parameters() * dtype_bytes), "trainable": 12.0 * trainable}


FLOOR_TERMS = {"rollout": FEATURES["rollout"], "scoring": FEATURES["scoring"], "update": ("logits", "lse")}
"""Terms that do not depend on checkpointing: a bfloat16 base's coefficient is at least the float32 family's."""


def gpu_coefficients(coefs: dict[str, np.ndarray], float32: dict[str, np.ndarray] | None,
                     floors: dict[tuple[str, str], float] | None = None) -> dict[str, np.ndarray]:
    """The fitted coefficients as a GPU would see them: the ``CPU_ONLY`` terms dropped and, for a bfloat16 base
    (``float32``: the float32 family's fit, no checkpointing), each ``FLOOR_TERMS`` coefficient at least the
    float32 family's (+ 0.5 for ``logits``). On this CPU the bfloat16 LM head's float32 weight copies make their
    own moment the phase's peak, hiding the moments that follow (the prefill's block buffers, the float32 logits);
    the float32 family has no copies. A feature counts bytes of the base dtype, so the same count of buffers is
    half the bytes in bfloat16; the logits are float32 in both, and a bfloat16 base adds the bfloat16 logits the
    head returns before ``.float()`` (half a float32 copy). ``floors``: (phase, feature) -> a lower bound measured
    directly (``depth_pair``)."""
    out = {}
    for phase, coef in coefs.items():
        coef = np.where([f in CPU_ONLY for f in FEATURES[phase]], 0.0, coef)
        for i, name in enumerate(FEATURES[phase]):
            if float32 is not None and name in FLOOR_TERMS[phase] and name not in CPU_ONLY:
                coef[i] = max(coef[i], float32[phase][i] + (0.5 if name == "logits" else 0.0))
            coef[i] = max(coef[i], (floors or {}).get((phase, name), 0.0))
        out[phase] = coef
    return out


def depth_pair(phase: str, shallow: Point, deep: Point) -> float:
    """The ``activations`` coefficient from two points that differ in depth only: the one term that changes."""
    i = FEATURES[phase].index("activations")
    diff = features(phase, deep.shape, deep.workload, deep.dtype_bytes) - \
        features(phase, shallow.shape, shallow.workload, shallow.dtype_bytes)
    return (deep.peak - shallow.peak) / diff[i]


def predict_step(coefs: dict[str, np.ndarray], shape: Shape, wl: Workload, lever: Lever,
                 value_head: bool) -> dict[str, float]:
    """Bytes of each phase (above the static part), the static part and the step's peak (static + the largest
    phase). ``coefs``: phase -> coefficients for the lever's dtype and checkpointing (``gpu_coefficients``)."""
    wl = replace(wl, micro=lever.micro, chunk=lever.chunk, logprob_chunk=lever.logprob_chunk)
    out = {phase: predict(phase, coefs[phase], shape, wl, lever.dtype_bytes) for phase in PHASES}
    out.update(static_bytes(shape, lever.dtype_bytes, wl.lora_r, value_head))
    out["peak"] = out["weights"] + out["trainable"] + max(out[phase] for phase in PHASES)
    return out


def fits(peak: float, budget_gib: float, headroom: float = 0.9) -> bool:
    """A peak fits a GPU of ``budget_gib`` when it is under ``headroom`` of it (CUDA context, allocator
    fragmentation and the reward model are not in the prediction)."""
    return peak < headroom * budget_gib * GIB
