#!/usr/bin/env bash
# The whole GPU measurement of the attention kernels, in one call, in order of importance:
#
#   1. check   benchmarks/gpu_check.py: the compiled fused kernel against the scan kernel (outputs,
#              log-sum-exps, gradients; bf16/f16/f32, causal, padding, GQA, row starts), then the fused
#              pooled branch and estimate against XLA's, each backward pass run twice bit for bit,
#              and the kernel alone against cuDNN and against
#              the scan kernel (TFLOP/s). If it fails, the later stages time the sparse presets on
#              the scan kernel (PRESET/scan), so the run still measures the linear-memory branches
#   2. bidir   sparseformer bench, bfloat16, B=1, H=8, D=64, 4K-64K: dense (cuDNN), dense_pallas
#              (JAX's Pallas flash attention), rsa, rsa/exact (its exact part alone), nsa, bigbird, local
#   3. causal  the same, causal, 4K/16K/64K: dense, dense_pallas, rsa, rsa/exact, nsa
#   4. memory  peak device memory of a fresh process, fwd+bwd, dense and rsa, 4K/16K/64K, and what each
#              method keeps for its backward pass (python -m sparseformer.bench.residuals, traced)
#   5. breakdown  benchmarks/breakdown.py: where rsa's time goes (choice, exact kernel, compressed
#              branch, the rest) at 4K/16K/64K, bidirectional, and causal at 16K
#   6. tune    benchmarks/gpu_check.py --tune: the fused kernel compiled with each (num_warps,
#              num_stages), then with dk/dv list pieces of 64, the dk/dv programs' other order and
#              the finish kernel walking first pieces, at 16K, bidirectional and causal; then with
#              4 sinks, partial sums for 4 long lists (the default) against 2 and 1 (pieces grown
#              to 32 and 67) (skipped if the check failed)
#
#   benchmarks/gpu.sh OUT_DIR [STAGE ...]        (default: all six stages)
#
# Each stage writes OUT_DIR/STAGE/; everything is packed into OUT_DIR/results.tar.gz as it goes
# (the device tool returns a few files only), with OUT_DIR/summary.txt beside it. Python: $PYTHON,
# else python3 (on the lent GPU machine: its own JAX 0.11 with CUDA); the repository goes on
# PYTHONPATH; pure-Python packages it lacks (ml_collections) are installed from .whl/ when present
# (fetch them here with benchmarks/gpu_wheels.sh). About 10 minutes on an H200 (compiles included; an
# estimate: it has not run yet), so with a 10-minute limit per call run `check bidir`, then the rest
# (`causal memory breakdown tune`; each stage is packed as it ends, so a call cut short keeps them).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUT_DIR [check bidir causal memory breakdown tune]}
shift
STAGES=${*:-check bidir causal memory breakdown tune}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/sparseformer-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/sparseformer-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# One persistent compilation cache for every stage and process: the fresh-process memory probes load
# the programs the benchmark compiled (no second compile, and no autotuning buffers in the device
# peak they read, which cannot be reset), and a second call on the same machine recompiles less.
# Compile times (bench.json `compile_s`) of a program compiled by an earlier stage are cache loads.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/sparseformer-gpu-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
if ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)'; then
  echo "gpu.sh: JAX sees no GPU" >&2
  exit 1
fi
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv >>"$OUT/summary.txt" 2>&1 || true

KERNEL_OK=1  # 0 once the check stage finds the fused kernel wrong or broken on this GPU
FAILED_MARK=${TMPDIR:-/tmp}/sparseformer_gpu_kernel_failed  # remembered for a later call on the same machine
[[ -f $FAILED_MARK ]] && KERNEL_OK=0
presets() {  # the stage's presets; after a failed check, the sparse ones on the scan kernel instead
  local out=() p
  IFS=, read -ra names <<<"$1"
  for p in "${names[@]}"; do
    if [[ $KERNEL_OK == 1 || $p == dense* ]]; then out+=("$p")
    elif [[ $p != */* ]]; then out+=("$p/scan"); fi
  done
  (IFS=,; echo "${out[*]}")
}
pack() { tar -czf "$OUT/results.tar.gz" -C "$OUT" --exclude=results.tar.gz . 2>/dev/null; }
bench() {  # bench STAGE FLAGS...
  local stage=$1; shift
  mkdir -p "$OUT/$stage"
  "$PY" -m sparseformer bench --dtype=bfloat16 --heads=8 --head-dim=64 --dense-impl=cudnn \
    --out="$OUT/$stage" "$@" >"$OUT/$stage/bench.log" 2>&1
  echo "== $stage: exit $?" | tee -a "$OUT/summary.txt"
  sed -n '/## Targets/,/^$/p' "$OUT/$stage/bench.md" 2>/dev/null | tee -a "$OUT/summary.txt"
  pack
}

for stage in $STAGES; do
  SECONDS=0
  case $stage in
    check)
      mkdir -p "$OUT/check"
      rm -f "$FAILED_MARK"
      KERNEL_OK=1
      "$PY" benchmarks/gpu_check.py "$OUT/check" 2>&1 | tee "$OUT/check/check.log" | tail -9 | tee -a "$OUT/summary.txt"
      if [[ ${PIPESTATUS[0]} != 0 ]]; then
        KERNEL_OK=0
        touch "$FAILED_MARK"
        echo "== check failed: the bench stages time the sparse presets on the scan kernel (PRESET/scan)" |
          tee -a "$OUT/summary.txt"
      fi
      cp "$OUT/check/check.json" "$OUT/check.json" 2>/dev/null
      pack ;;
    bidir)
      bench bidir --presets="$(presets dense,dense_pallas,rsa,rsa/exact,nsa,bigbird,local)" \
        --lengths=4096,8192,16384,32768,65536 --rss=none --repeats=5 ;;
    causal)
      bench causal --causal --presets="$(presets dense,dense_pallas,rsa,rsa/exact,nsa)" \
        --lengths=4096,16384,65536 --rss=none --repeats=5 ;;
    memory)
      bench memory --presets="$(presets dense,rsa)" --passes=fwd_bwd --lengths=4096,16384,65536 --rss=all \
        --no-fidelity --repeats=1 --warmup=0
      # what each method keeps for its backward pass (traced, seconds): explains the peaks above
      "$PY" -m sparseformer.bench.residuals --presets=dense_pallas,rsa,nsa,bigbird,local \
        --lengths=4096,16384,65536 --out="$OUT/memory" >"$OUT/memory/residuals.log" 2>&1
      echo "== residuals: exit $?" | tee -a "$OUT/summary.txt"
      pack ;;
    breakdown)
      mkdir -p "$OUT/breakdown"
      { "$PY" benchmarks/breakdown.py "$OUT/breakdown" --lengths=4096,16384,65536 &&
        "$PY" benchmarks/breakdown.py "$OUT/breakdown/causal" --lengths=16384 --causal; } 2>&1 |
        tee "$OUT/breakdown/breakdown.log" | grep "^T=" | tee -a "$OUT/summary.txt"
      pack ;;
    tune)
      mkdir -p "$OUT/tune"
      if [[ $KERNEL_OK == 1 ]]; then
        "$PY" benchmarks/gpu_check.py "$OUT/tune" --tune 2>&1 | tee "$OUT/tune/tune.log" | grep "^T=" |
          tee -a "$OUT/summary.txt"
      else
        echo "== tune skipped: the kernel check failed" | tee -a "$OUT/summary.txt"
      fi
      pack ;;
    *) echo "gpu.sh: unknown stage $stage (check, bidir, causal, memory, breakdown, tune)" >&2; exit 2 ;;
  esac
  echo "   ($stage took ${SECONDS}s)" | tee -a "$OUT/summary.txt"
done
pack
