"""Forward+backward time of attention configs side by side, in interleaved rounds.

    python benchmarks/side_by_side.py --length=8192 \
        "rsa;selection.window=1;selection.global_blocks=1;selection.top_k=4;selection.anchors=1;selection.mass_threshold=1.0;selection.causal_choice=previous_block" \
        "rsa"

Each argument is a preset name followed by `;section.key=value` overrides (`presets.from_spec`). Every config is compiled
(`jax.grad` of `sum(out * w)` with respect to q, k, v), warmed up once, then timed in `--repeats`
rounds in which each runs once, the order rotated every round; medians are printed. Run it under the
exclusive CPU lock for numbers worth recording.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from sparseformer import attention
from sparseformer.bench import inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("specs", nargs="+")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    q, k, v = (jnp.asarray(x) for x in inputs.random_qkv(1, a.length, a.heads, a.head_dim))
    w = jax.random.normal(jax.random.key(1), q.shape)
    fns = []
    for spec in a.specs:
        c = attention.presets.from_spec(spec)

        def loss(q, k, v, c=c):  # noqa: ANN001, ANN202
            return jnp.sum(attention.attend(q, k, v, c, causal=a.causal, rng=jax.random.key(0))[0] * w)

        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        jax.block_until_ready(f(q, k, v))
        fns.append(f)
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(a.repeats):
        for i in order[r % len(fns):] + order[: r % len(fns)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[i](q, k, v))
            times[i].append(time.perf_counter() - t0)
    for spec, t in zip(a.specs, times):
        print(f"{statistics.median(t) * 1e3:10.1f} ms  {spec}")


if __name__ == "__main__":
    main()
