#!/usr/bin/env bash
# Fetch, on a machine with the network, the pure-Python packages the GPU machine's image lacks
# (it has jax, flax, optax, numpy, absl, PyYAML, matplotlib, tqdm, psutil), into .whl/ (ignored by
# git), for benchmarks/gpu.sh to install there: the device tool carries .whl when asked
# (`carry: [".whl"]`).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  -d .whl "ml-collections>=1.1,<2"
ls .whl
