"""The `maxkey` / `bound` trade-off of rsa's selection at small blocks (issue 12).

    # test accuracy of trained runs when only the selection's estimate is swapped (no retraining);
    # a dense run is evaluated under rsa (its parameters adopted as they are)
    python experiments/estimators_small_blocks.py runs --estimators=maxkey,bound,oracle RUN_DIR...
    # an entry may carry other selection keys: --estimators="maxkey;anchors=8,bound"

    # relative error against exact attention on the benchmark's inputs, rsa with each estimator
    # at several block sizes (the rest of the preset unchanged)
    python experiments/estimators_small_blocks.py bench --length=4096 --block_sizes=8,16,32,64 [--causal]

Both print one JSON object at the end (and a line per measurement as they go).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np


def run_accuracy(workdir: str, estimator: str) -> float:
    """Test accuracy (%) of a run's latest checkpoint with `rsa`'s selection estimating by
    `estimator` (a dense run is switched to its config's rsa components). `estimator` may name
    other selection keys after it: `"maxkey;anchors=8"`."""
    from sparseformer.attention.presets import apply_overrides
    from sparseformer.train import loop

    estimator, *settings = estimator.split(";")

    config = loop.load_config(workdir)
    with config.unlocked():
        attention = config.model.attention
        for part in (attention.selection, attention.compression, attention.correction):
            part.enabled = True
        attention.selection.estimator = estimator
        apply_overrides(attention, [f"selection.{item}" for item in settings])
    rt, state, _ = loop.restore_run(workdir, config=config)
    return round(100 * float(rt.task_metrics(state, "test")["accuracy"]), 2)


def bench_errors(length: int, block_sizes: Sequence[int], estimators: Sequence[str], *, causal: bool) -> dict[str, float]:
    """`{"<input> b<block> <estimator>": relative error}` of rsa on each benchmark input kind."""
    import jax

    from sparseformer.attention import attend, presets
    from sparseformer.bench.inputs import INPUT_KINDS
    from sparseformer.bench.measure import reference_attention, relative_error

    out = {}
    for kind, make in INPUT_KINDS.items():
        q, k, v = make(1, length, 4, 64, causal=causal)
        ref = reference_attention(q, k, v, causal=causal)
        for b in block_sizes:
            for est in estimators:
                cfg = presets.get("rsa")
                cfg.selection.block_size, cfg.selection.estimator = b, est
                got, aux = jax.jit(lambda q, k, v, cfg=cfg: attend(q, k, v, cfg, causal=causal))(q, k, v)
                out[f"{kind} b{b} {est}"] = round(relative_error(np.asarray(got), ref), 3)
                print(f"{kind} block {b} {est}: {out[f'{kind} b{b} {est}']} ({float(aux['slots']):.1f} blocks)", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("runs", help="accuracy of trained runs under each estimator")
    r.add_argument("workdirs", nargs="+")
    r.add_argument("--estimators", default="maxkey,bound,oracle")
    b = sub.add_parser("bench", help="fidelity on the benchmark inputs per block size and estimator")
    b.add_argument("--length", type=int, default=4096)
    b.add_argument("--block_sizes", default="8,16,32,64")
    b.add_argument("--estimators", default="maxkey,bound")
    b.add_argument("--causal", action="store_true")
    args = p.parse_args(argv)
    estimators = args.estimators.split(",")
    if args.what == "runs":
        result: dict = {}
        for wd in args.workdirs:
            result[wd] = {}
            for est in estimators:
                result[wd][est] = run_accuracy(wd, est)
                print(f"{wd} {est}: {result[wd][est]}", flush=True)
    else:
        sizes = [int(s) for s in args.block_sizes.split(",")]
        result = bench_errors(args.length, sizes, estimators, causal=args.causal)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
