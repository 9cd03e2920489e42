#!/usr/bin/env bash
# The attention benchmark on a CUDA GPU: bfloat16, 4K-64K tokens, cuDNN dense attention as the baseline.
#
#   benchmarks/gpu.sh OUT_DIR [extra `sparseformer bench` flags, e.g. --causal or --presets=dense,rsa]
#
# Writes OUT_DIR/bench.json, bench.md and bench.png (and OUT_DIR/bench.log). Uses $PYTHON if set,
# else .venv-gpu/ in the repository, created on first use with jax[cuda12] (nothing system-wide).
# On a GPU the memory probe reports the device's peak bytes in use (`peak_device_bytes`), and a
# case is skipped when XLA's compiled bytes exceed the device memory still free.
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUT_DIR [bench flags]}
shift
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ ! -x .venv-gpu/bin/python ]]; then
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q -e . "jax[cuda12]>=0.10.2,<0.11"
  fi
  PY=.venv-gpu/bin/python
fi

if ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)'; then
  echo "gpu.sh: JAX sees no GPU (backend $("$PY" -c 'import jax; print(jax.default_backend())'))" >&2
  exit 1
fi
"$PY" -c 'import jax; print(jax.devices())'

mkdir -p "$OUT"
PYTHONUNBUFFERED=1 "$PY" -m sparseformer bench \
  --dtype=bfloat16 \
  --lengths=4096,8192,16384,32768,65536 \
  --dense-impl=cudnn \
  --rss=all \
  --out="$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
