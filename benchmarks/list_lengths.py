"""What rsa's choice asks of the fused kernel's dk/dv partial sums, on the benchmark's inputs.

    python benchmarks/list_lengths.py [--lengths=4096,16384,65536] [--inputs=random,peaky,...]
        [--preset=rsa] [--causal] [--out=FILE.json]

The fused kernel's dk/dv programs walk each key block's inverted list (the query blocks that chose
it) in pieces of `pallas_kernel.LIST_PIECE` entries; every piece after a list's first writes a
float32 partial sum, and the buffers for them are static: `Plan.extra_pieces`, room for
`LONG_LISTS` lists of every query block. A call whose lists need more further pieces walks longer
pieces instead (`pallas_kernel.piece_length`). This tool runs the preset's block choice (the same
`choose_blocks` as `attend`, its causal queries when causal) on each input of
`sparseformer.bench.inputs` (float32, B=1, H=8, D=64: the benchmark's shape), builds the kernel's
own inverted lists and reports, per input, length and head: the longest
list, how many lists run past one piece, the further pieces they need at the default piece, the
partial sums the default holds, and the piece the kernel walks. It answers whether `LONG_LISTS`
fits what the method chooses on structured inputs, without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.attention import pallas_kernel, presets
from sparseformer.attention.selection import causal_queries, choose_blocks, to_blocks
from sparseformer.bench import inputs as bench_inputs

# the benchmark's timing input and its fidelity inputs (`inputs.INPUT_KINDS`), by name
INPUTS = {"random": lambda *shape, causal: bench_inputs.random_qkv(*shape), **bench_inputs.INPUT_KINDS}


def list_needs(preset: str, kind: str, T: int, *, causal: bool = False, H: int = 8, D: int = 64) -> dict:
    """One input kind at length `T`: the preset's selection, the kernel's inverted lists and what
    their pieces need, per head."""
    cfg = presets.get(preset).selection
    b, n = cfg.block_size, T // cfg.block_size
    q, k = (jnp.asarray(x) for x in INPUTS[kind](1, T, H, D, causal=causal)[:2])
    qh, kh = jnp.swapaxes(q, 1, 2) * D**-0.5, jnp.swapaxes(k, 1, 2)  # head-major, scale in q (as attend)
    qids = jnp.arange(n)
    q_est = causal_queries(qh, qids, b, cfg.causal_choice, cfg.anchors) if causal else to_blocks(qh, b)
    sel = choose_blocks(q_est, to_blocks(kh, b), None, qids, num_query_blocks=n, cfg=cfg, causal=causal,
                        rng=jax.random.key(0))
    plan = pallas_kernel.make_plan(causal, sel, num_heads=H, head_dim=D, has_mask=False)
    pieces, _ = pallas_kernel.inverted_lists(plan, sel.idx, sel.valid, sel.row_start)
    pieces = np.asarray(pieces)[0]  # [H, m + extra, 4]
    lengths = np.stack([np.bincount(np.asarray(sel.idx[0, h])[np.asarray(sel.valid[0, h])], minlength=n)
                        for h in range(H)])  # [H, m]
    further = np.maximum(0, -(-lengths // plan.piece) - 1).sum(-1)
    walked = (pieces[..., 2] - pieces[..., 1]).max(-1)
    return {"input": kind, "T": T, "causal": causal, "query_blocks": n, "piece": plan.piece,
            "long_lists": plan.long_lists, "partial_sums": plan.extra_pieces,
            "longest_list": lengths.max(-1).tolist(), "lists_past_a_piece": (lengths > plan.piece).sum(-1).tolist(),
            "further_pieces_needed": further.tolist(), "piece_walked": walked.tolist(),
            "fits": bool((further <= plan.extra_pieces).all())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="4096,16384,65536")
    p.add_argument("--inputs", default=",".join(INPUTS))
    p.add_argument("--preset", default="rsa")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    kinds = a.inputs.split(",")
    for kind in kinds:
        if kind not in INPUTS:
            p.error(f"--inputs: {kind!r}; allowed: {', '.join(INPUTS)}")
    try:
        lengths = [int(x) for x in a.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths: {a.lengths!r}; allowed: comma-separated whole numbers of tokens")
    if a.preset not in presets.names() or not presets.get(a.preset).selection.enabled:
        p.error(f"--preset: {a.preset!r}; allowed: a preset that selects blocks")
    rows = []
    for T in lengths:
        for kind in kinds:
            r = list_needs(a.preset, kind, T, causal=a.causal)
            rows.append(r)
            print(f"T={T} {kind:14s} partial sums {r['partial_sums']:4d}: further pieces needed per head "
                  f"{min(r['further_pieces_needed'])}-{max(r['further_pieces_needed'])} "
                  f"(lists past {r['piece']}: {min(r['lists_past_a_piece'])}-{max(r['lists_past_a_piece'])}, "
                  f"longest {max(r['longest_list'])}); pieces walked {min(r['piece_walked'])}-{max(r['piece_walked'])}"
                  f"{'' if r['fits'] else ' (grown)'}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"preset": a.preset, "causal": a.causal, "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
