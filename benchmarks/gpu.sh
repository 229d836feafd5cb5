#!/usr/bin/env bash
# The GPU run (issue 8): one command on a machine with an NVIDIA GPU and JAX (CUDA) installed.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# Runs the GPT-2-small-shaped language-model train step (12 blocks, width 768, 12 heads,
# context 1024, bf16 compute over f32 params) at several batch sizes, with fundl's default
# attention kernel and with XLA's for contrast, reporting tokens/s and model FLOPs
# utilisation; then the MLP and CNN suites (fundl against plain JAX and the installed peers,
# interleaved). JSON records go to OUT_DIR (default benchmarks/results). Record the figures
# in benchmarks/RESULTS.md with the device named.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())"
run() {  # name, then gpt2.py arguments
  local name=$1; shift
  timeout 150 python3 benchmarks/gpt2.py --steps 20 --json "$out/gpt2_$name.json" "$@" \
    2>"/tmp/gpt2_$name.err" | tail -1 || echo "gpt2 $name failed: $(tail -3 "/tmp/gpt2_$name.err")"
}
run b8 --batch 8
run b16 --batch 16
run b16_xla --batch 16 --attention xla
run b32 --batch 32
timeout 200 python3 -m benchmarks --suite mlp --suite cnn --json "$out/suites_gpu.json" 2>&1 | tail -32
