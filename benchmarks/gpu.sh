#!/usr/bin/env bash
# The GPU run (issue 8): one command on a machine with an NVIDIA GPU and JAX (CUDA) installed.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# Runs the GPT-2-small-shaped language-model train step (12 blocks, width 768, 12 heads,
# context 1024, bf16 compute over f32 params) at batch 16 to 128, and the same model
# hand-written in plain JAX at batch 16, reporting tokens/s and model FLOPs utilisation;
# then the MLP and CNN suites (fundl against plain JAX and the installed peers,
# interleaved). JSON records go to OUT_DIR (default benchmarks/results). Record the figures
# in benchmarks/RESULTS.md with the device named.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# cuBLAS for every matmul: XLA's Triton GEMMs ran the GPT-2 step 12-15% slower on an H200.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())"
run() {  # name, then gpt2.py arguments
  local name=$1; shift
  timeout 150 python3 benchmarks/gpt2.py --steps 20 --json "$out/gpt2_$name.json" "$@" \
    2>"/tmp/gpt2_$name.err" | tail -1 || echo "gpt2 $name failed: $(tail -3 "/tmp/gpt2_$name.err")"
}
run b16 --batch 16
run b16_plain --batch 16 --impl plain
run b64 --batch 64
run b128 --batch 128
run b128_v50304 --batch 128 --vocab 50304
timeout 200 python3 -m benchmarks --suite mlp --suite cnn --json "$out/suites_gpu.json" 2>&1 | tail -32
