"""What the PPO step benchmark runs: the systems, the model sizes, the PPO and GRPO step, the workloads' lengths
and the machine-rate measurements' sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
DEFAULT_CACHE = HERE / ".cache"
TRL_VENV = HERE / ".venv-trl"
TRL_PINS = ["trl==0.11.4", "transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0"]
TORCH_PIN = "torch==2.13.0"
SYSTEMS = ("lit_rlhf", "lit_rlhf_fast", "lit_rlhf_grpo", "trl_batched", "trl_loop", "floor")
LIT_SYSTEMS = ("lit_rlhf", "lit_rlhf_fast", "lit_rlhf_grpo")
LIT_PPO_SYSTEMS = ("lit_rlhf", "lit_rlhf_fast")  # the PPO variants the goals are checked for
SYSTEM_LABELS = {
    "lit_rlhf": "lit_rlhf PPOModule exact (fast_rollout false)",
    "lit_rlhf_fast": "lit_rlhf PPOModule (fast_rollout, default)",
    "lit_rlhf_grpo": "lit_rlhf GRPO k 4 fast_rollout",
    "trl_batched": "TRL 0.11.4 batched generate",
    "trl_loop": "TRL 0.11.4 recipe loop",
    "floor": "bare PyTorch floor",
    "flop_limit": "FLOP limit",
    "flop_limit_grpo": "FLOP limit GRPO k 4",
}
DTYPES = ("float32", "bfloat16")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}
PHASES = ("generate", "reward", "forward", "advantages", "update", "other")
LIT_PHASES = {  # lit_rlhf's module.timings keys -> report phases
    "time/ppo/generate": "generate",
    "time/ppo/reward": "reward",
    "time/ppo/forward": "forward",
    "time/ppo/advantages": "advantages",
    "time/ppo/update": "update",
}


@dataclass(frozen=True)
class ModelSize:
    """The T5 architecture under test."""

    name: str
    vocab_size: int
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    d_kv: int

    @property
    def inner(self) -> int:  # attention width h * d_kv
        return self.num_heads * self.d_kv


FLAN_T5_BASE = ModelSize("flan-t5-base", 32128, 768, 2048, 12, 12, 64)
TINY_T5 = ModelSize("tiny-t5", 2000, 64, 256, 2, 4, 16)  # lit_rlhf.models.tiny.build_tiny_t5's defaults
FLAN_T5_BASE_PARAMETERS = 247_577_856
LORA_PARAMETERS = 3_538_944  # 72 adapted Linear layers (q, v of enc self, dec self, dec cross) x 2 x 768 x 32
VALUE_HEAD_PARAMETERS = 769


@dataclass(frozen=True)
class PPOShape:
    """What one PPO step does, the same for every system."""

    rollout_batch: int = 16
    mini_batch: int = 4
    ppo_epochs: int = 1
    learning_rate: float = 1.41e-5
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q", "v")
    vf_coef: float = 0.1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    kl_coef: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95


PPO = PPOShape()
# GRPO beside PPO: the same 16 responses per step from 4 prompts x 4 samples (each batch's first 4 prompts; the
# 4 samples of prompt j get the lengths of rows 4j..4j+3), mini-batch 4; the recipe's settings
# (configs/detox_flan_t5_grpo.yaml): k3 KL in the loss, beta 0.04 fixed, per-sequence loss mean; no value head.
GRPO_SAMPLES_PER_PROMPT = 4
GRPO_SETTINGS = dict(advantage_estimator="grpo", kl_in_loss=True, init_kl_coef=0.04, adaptive_kl=False,
                     loss_aggregation="sequence_mean")
WORKLOAD_A_PROMPT_TOKENS = 200
# New tokens per response, [low, high) as the recipe's LengthSampler and lit_rlhf's max_new_tokens; --tiny
# shortens them so that the smoke run takes seconds.
NEW_TOKENS = {"A": (32, 33), "B": (100, 400)}
NEW_TOKENS_TINY = {"A": (8, 9), "B": (8, 24)}
# Warm-up steps (not measured) generate this many tokens per response: a full-length workload-B warm-up would
# cost as much as a measured step. The measured steps' draws start from the seed, whatever the warm-up.
WARMUP_NEW_TOKENS = 32
WARMUP_NEW_TOKENS_TINY = 8
LENGTH_SEED = 0
DATA_SEED = 0

# The machine's rates the limits divide by
GEMM_REPEATS = 20
GEMM_REPEATS_TINY = 1  # --tiny: the rates are printed, not compared (one timed 2048 GEMM after one untimed)
DECODE_ROWS = (16, 8, 4, 1)  # rows still decoding at which the decode-step table compares steps with their limits
BANDWIDTH_MIB = 512  # the read-bandwidth tensor (fp32), far larger than the caches
BANDWIDTH_MIB_TINY = 64
BANDWIDTH_REPEATS = 20  # one pass over 512 MiB takes ~50 ms: on a shared machine most passes are interrupted
