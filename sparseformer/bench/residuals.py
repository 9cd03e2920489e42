"""What a method keeps for its backward pass: the saved residuals of one forward+backward, by source.

    python -m sparseformer.bench.residuals --presets=dense_pallas,rsa,nsa --lengths=4096,16384,65536 \
        --dtype=bfloat16 --heads=8 [--causal] [--train] [--out=DIR]

The arrays JAX's reverse mode saves between the forward and the backward pass (its
`saved_residuals` analysis of the traced program: nothing is compiled or run, so the numbers are
the same on every machine and need no GPU). The sparse presets are traced with the fused kernel
(`selection.kernel = "pallas"`, lowered as for a GPU), `dense_pallas` is JAX's own Pallas flash
attention: the reference a fused dense kernel sets, its output and a float32 log-sum-exp (cuDNN
keeps the same). The loss is the benchmark's forward+backward pass, `sum(out * w)` differentiated
for q, k and v; `--train` adds the regulariser's `aux_loss`, as training does. The method's own
arguments (q, k, v, w) are not counted: they live anyway.

Residuals bound the memory the backward pass holds on top of its inputs; the device's peak also
holds the backward's transients (gradients, recomputed chunks), which only a run on the device
measures (`sparseformer bench` on a GPU records `peak_device_bytes`). Reports the total in MiB, the
same as a multiple of one `[B, T, H, D]` array of the inputs' dtype, and the total by source line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp

from sparseformer.bench import methods

MIB = 2**20


def _source(why: str) -> str:
    """`output of OP from FILE:LINE:COL (FUNCTION)` -> `FILE:LINE (FUNCTION)`, repository-relative."""
    m = re.search(r"from (\S+?):(\d+):\d+ \(([^)]*)\)", why)
    if not m:
        return why.split(" from ")[0] if why.startswith("output of") else why
    path = m.group(1)
    if "site-packages/" in path:  # jax's own files: from the package on
        path = path.split("site-packages/", 1)[1]
    elif "sparseformer/" in path:  # ours: repository-relative
        path = path[path.index("sparseformer/"):]
    return f"{path}:{m.group(2)} ({m.group(3)})"


def loss_fn(name: str, shape: methods.Shape, *, train: bool):
    """The scalar loss of q, k, v whose gradient the benchmark (or training, with `train`) takes."""
    w = jnp.zeros((shape.batch, shape.length, shape.heads, shape.head_dim), jnp.float32)
    rng = jax.random.key(0)
    if name in methods.BASELINES:
        if name == "dense_pallas":
            from jax.experimental.pallas.ops.gpu import attention as pallas_attention

            def fn(q, k, v):  # noqa: ANN001, ANN202
                return pallas_attention.mha(q, k, v, None, sm_scale=shape.head_dim**-0.5, causal=shape.causal)
        else:
            raise ValueError(f"{name}: only dense_pallas among the baselines can be traced without a GPU "
                             "(cuDNN's attention refuses to trace without one; it keeps what dense_pallas keeps)")
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    from sparseformer import attention

    config = methods.preset_config(name)
    if config.selection.enabled:
        config.selection.kernel = "pallas"
    params = attention.init_params(config, jax.random.key(0), num_heads=shape.heads, head_dim=shape.head_dim,
                                   max_len=shape.length)

    def loss(q, k, v):  # noqa: ANN001, ANN202
        out, aux = attention.attend(q, k, v, config, params=params, causal=shape.causal, rng=rng)
        total = jnp.sum(out.astype(jnp.float32) * w)
        return total + aux["aux_loss"] if train else total

    return loss


def residuals(name: str, shape: methods.Shape, *, train: bool = False) -> dict[str, Any]:
    """The saved residuals of `name`'s forward+backward at `shape`: total bytes, the total as a
    multiple of one `[B, T, H, D]` input-dtype array, and bytes by source line (largest first)."""
    from jax._src import ad_checkpoint  # the analysis behind jax.ad_checkpoint.print_saved_residuals

    from sparseformer.attention.pallas_kernel import compile_for_gpu

    x = jnp.zeros((shape.batch, shape.length, shape.heads, shape.head_dim), jnp.dtype(shape.dtype))
    with compile_for_gpu():
        saved = ad_checkpoint.saved_residuals(loss_fn(name, shape, train=train), x, x, x)
    by_source: dict[str, int] = collections.Counter()
    total = 0
    for aval, why in saved:
        if why.startswith(("from the argument", "from a constant")):  # q, k, v and w live anyway
            continue
        n = int(aval.size) * aval.dtype.itemsize
        total += n
        by_source[_source(why)] += n
    unit = x.size * x.dtype.itemsize
    return {
        "name": name, "length": shape.length, "batch": shape.batch, "heads": shape.heads,
        "head_dim": shape.head_dim, "dtype": shape.dtype, "causal": shape.causal, "train": train,
        "residual_bytes": total, "residual_mib": total / MIB, "residual_arrays": total / unit,
        "by_source": dict(sorted(by_source.items(), key=lambda kv: -kv[1])),
    }


def markdown(rows: list[dict[str, Any]], top: int = 8) -> str:
    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    get = {(r["name"], r["length"]): r for r in rows}
    lines = ["| saved residuals, MiB (x one [B,T,H,D] input array) | " + " | ".join(map(str, lengths)) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    for n in names:
        cells = [f"{get[n, t]['residual_mib']:,.1f} ({get[n, t]['residual_arrays']:.1f})" if (n, t) in get else ""
                 for t in lengths]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for n in names:
        r = get.get((n, lengths[-1]))
        if r and r["by_source"]:
            lines += ["", f"{n} at {lengths[-1]}, largest sources (MiB):"]
            lines += [f"- {mib / MIB:,.1f}  {src}" for src, mib in list(r["by_source"].items())[:top]]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line (`tests/bench/test_gpu_scripts.py` parses gpu.sh's calls with it)."""
    p = argparse.ArgumentParser(prog="python -m sparseformer.bench.residuals", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="dense_pallas,rsa", help="comma-separated: dense_pallas and any bench preset name")
    p.add_argument("--lengths", default="4096,16384,65536")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--train", action="store_true", help="add the regulariser's aux_loss to the loss, as training does")
    p.add_argument("--out", default=None, help="directory for residuals.json and residuals.md (default: print only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        shape = methods.Shape(args.batch, length, args.heads, args.head_dim, causal=args.causal, dtype=args.dtype)
        for name in args.presets.split(","):
            rows.append(residuals(name, shape, train=args.train))
    text = markdown(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "residuals.json"), "w") as f:
            json.dump({"command": "python -m sparseformer.bench.residuals " + " ".join(argv or sys.argv[1:]),
                       "results": rows}, f, indent=1)
        with open(os.path.join(args.out, "residuals.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
