#!/usr/bin/env bash
# The GPU run: one command on a machine with an NVIDIA GPU and JAX (CUDA) installed.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# Runs the GPT-2-small-shaped language-model train step (12 blocks, width 768, 12 heads,
# context 1024, bf16 compute over f32 params) at batch 16 to 128, and the same model
# hand-written in plain JAX at batch 16, reporting tokens/s and model FLOPs utilisation;
# then the suites at GPU sizes in bf16 (`python -m benchmarks --gpu`: mlp, cnn, attention,
# transformer, rnn; fundl against plain JAX and the installed peers, interleaved, with
# throughput and MFU), one process per suite under its own timeout, their records merged
# into suites_gpu.json. JSON records go to OUT_DIR (default benchmarks/results; 6 files).
# Record the figures in benchmarks/RESULTS.md with the device named. About 5-6 minutes.
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
  timeout 150 python3 -m benchmarks.gpt2 --steps 20 --json "$out/gpt2_$name.json" "$@" \
    2>"/tmp/gpt2_$name.err" | tail -1 || echo "gpt2 $name failed: $(tail -3 "/tmp/gpt2_$name.err")"
}
run b16 --batch 16
run b16_plain --batch 16 --impl plain
run b64 --batch 64
run b128 --batch 128
run b128_v50304 --batch 128 --vocab 50304
tmp="$(mktemp -d)"
for spec in mlp:60 cnn:60 attention:90 transformer:75 rnn:90; do  # suite:timeout (seconds)
  suite=${spec%%:*}
  timeout -k 10 "${spec#*:}" python3 -m benchmarks --gpu --suite "$suite" \
    --json "$tmp/$suite.json" >"$tmp/$suite.txt" 2>&1 \
    || echo "suite $suite failed or timed out: $(tail -3 "$tmp/$suite.txt")"
  grep -v '^jax=' "$tmp/$suite.txt" | tail -40
done
python3 - "$tmp" "$out/suites_gpu.json" <<'PY'
import json, pathlib, sys
tmp, out = pathlib.Path(sys.argv[1]), sys.argv[2]
suites = ["mlp", "cnn", "attention", "transformer", "rnn"]
records = {s: json.loads((tmp / f"{s}.json").read_text()) for s in suites
           if (tmp / f"{s}.json").exists()}
merged = {"environment": next((r["environment"] for r in records.values()), None),
          "results": [case for r in records.values() for case in r["results"]],
          "missing_suites": [s for s in suites if s not in records]}
pathlib.Path(out).write_text(json.dumps(merged, indent=2))
print(f"{out}: {len(merged['results'])} cases; missing suites: {merged['missing_suites']}")
PY
rm -rf "$tmp"
