#!/usr/bin/env bash
# Installs what benchmarks/gpu_aot.py needs to compile for a GPU on a machine without one: JAX's CUDA
# plugin at the installed jax's version, ptxas (nvidia-cuda-nvcc) and cuDNN (the dense baseline's
# fused attention), into .gpu-aot/ (about 1.7 GB, git-ignored; the project's venv is untouched).
#   benchmarks/gpu_aot_deps.sh [PYTHON]     (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
JAX=$("$PY" -c 'import jax; print(jax.__version__)')
"$PY" -m pip install -q --no-deps --target .gpu-aot "jax-cuda12-plugin==$JAX" "jax-cuda12-pjrt==$JAX" \
  "nvidia-cuda-nvcc-cu12>=12.8,<13" "nvidia-cudnn-cu12>=9.8,<10"
echo "installed into .gpu-aot (jax $JAX): run benchmarks/gpu_aot.py"
