#!/usr/bin/env bash
# One prepared check for a CUDA machine: a few PPO and GRPO steps of a config-built Qwen2.5-0.5B-shaped model in
# bfloat16 with gradient checkpointing, micro-batches and rollout chunks, an exact resume from a mid-run
# checkpoint (benchmarks/gpu_check.py); two GRPO steps with each policy-loss and scoring setting
# (model.ppo.cliprange_high, importance_sampling sequence, policy_loss cispo, entropy_coef, init_kl_coef 0 with
# no reference, fast_rollout false on-policy: benchmarks/gpu_check_settings.py); and the per-phase memory
# measurement with torch.cuda's peak statistics, its fitted memory model and the 7B prediction
# (benchmarks/bench_memory.py --device cuda). Writes benchmarks/GPU_RESULTS.md (and GPU_MEMORY.md/.json beside it).
#
#   benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root; ~10 minutes on one GPU
#   benchmarks/gpu_check.sh --device cpu    # a dry run on CPU with tiny sizes (tests/models/test_gpu_check.py runs it)
#
# Environment: PYTHON (default .venv/bin/python, else python), GPU_CHECK_OUT (default benchmarks/), the folder the
# reports are written to, GPU_CHECK_CACHE (default benchmarks/.cache), where the models are built,
# GPU_CHECK_MEMORY_FAMILIES (default "ppo bfloat16 True,grpo bfloat16 True"), the memory benchmark's families.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${GPU_CHECK_OUT:-benchmarks}
mkdir -p "$OUT"
if [ "$DEVICE" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  MEMORY=(--tiny --threads 1)
else
  MEMORY=(--families "${GPU_CHECK_MEMORY_FAMILIES:-ppo bfloat16 True,grpo bfloat16 True}")
fi
CACHE=${GPU_CHECK_CACHE:-benchmarks/.cache}
WORK="$OUT/.gpu_check_work"
"$PY" benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT/GPU_RESULTS.md" --work "$WORK" --cache "$CACHE"
"$PY" benchmarks/gpu_check_settings.py --device "$DEVICE" --out "$OUT/GPU_RESULTS.md" --work "$WORK/settings" \
  --cache "$CACHE"
"$PY" benchmarks/bench_memory.py --device "$DEVICE" "${MEMORY[@]}" --out "$OUT/GPU_MEMORY" --cache "$CACHE"
{ echo; echo "## Memory benchmark (bench_memory.py --device $DEVICE)"; echo; tail -n +3 "$OUT/GPU_MEMORY.md"; } \
  >> "$OUT/GPU_RESULTS.md"
rm -rf "$WORK"
echo "wrote $OUT/GPU_RESULTS.md"
