"""What rsa's choice asks of the fused kernel's dk/dv partial sums, on the benchmark's inputs.

    python benchmarks/list_lengths.py [--lengths=4096,16384,65536] [--inputs=random,peaky,...]
        [--preset=rsa] [--causal] [--out=FILE.json]

The fused kernel's dk/dv programs walk each key block's inverted list (the query blocks that chose
it) in pieces of `pallas_kernel.LIST_PIECE` entries; every piece of a list longer than one piece
writes a float32 partial sum (every piece but the first when the finish kernel walks first pieces:
`pallas_kernel.FINISH_WALKS_FIRST`), and the buffers for them are static: `Plan.extra_pieces`, room
for `LONG_LISTS` lists of every query block. A call whose lists need more partial sums walks longer
pieces instead (`pallas_kernel.piece_length`). This tool runs the preset's block choice (the same
`choose_blocks` as `attend`, its causal queries when causal) on each input of
`sparseformer.bench.inputs` (float32, B=1, H=8, D=64: the benchmark's shape), builds the kernel's
own inverted lists and reports, per input, length and head: the longest list, how many lists run
past one piece, the partial sums they need at the default piece, the partial sums the default
holds, and the piece the kernel walks. It answers whether `LONG_LISTS` fits what the method chooses
on structured inputs, without a GPU.

It also models the time of the dk/dv kernel and the finish kernel after it, in each of their ways
(`DKV_WAYS`): the default, each other way alone and both together: the programs in the other order
(`pallas_kernel.EXTRAS_FIRST`: every (batch, head)'s long lists' pieces, then its first pieces, or
the other way round), and the finish kernel walking long lists' first pieces itself or only adding
partial sums (`pallas_kernel.FINISH_WALKS_FIRST`: one partial sum fewer per long list, so pieces grow
less often, but a piece's walk after the dk/dv kernel). The GPU starts programs in grid order on the
first free slot (`SLOTS`: an H200's 132 SMs x the 2 dk/dv programs one SM holds,
`benchmarks/results/triton_sm90`), a program taking its entries + 1 (loading its key block), a
program with nothing to walk almost nothing, and the finish kernel its first piece's walk (when it
walks one) and `ADD_PARTIAL_SUM` per partial sum. A model, not a measurement: it ignores memory
contention and what two programs on one SM cost each other; the GPU stage's launch sweep times
every way.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.attention import pallas_kernel, presets
from sparseformer.attention.selection import causal_queries, choose_blocks, to_blocks
from sparseformer.bench import inputs as bench_inputs

# dk/dv programs an H200 runs at once in the model: 132 SMs x 2 (rsa's dk/dv program, bfloat16, 4 warps,
# is limited to 2 an SM by its registers: benchmarks/results/triton_sm90/triton_sm90.md)
SLOTS = 132 * 2
IDLE_PROGRAM = 0.05  # the modelled time of a program with nothing to walk, in entries
# the modelled time of adding one further piece's float32 partial sums (dk and dv, `[b, D]` each) in
# the finish kernel, in entries (a guess: reads 4x the bytes of an entry's query tile, no matmul)
ADD_PARTIAL_SUM = 0.5

# the benchmark's timing input and its fidelity inputs (`inputs.INPUT_KINDS`), by name
INPUTS = {"random": lambda *shape, causal: bench_inputs.random_qkv(*shape), **bench_inputs.INPUT_KINDS}


def program_times(plan, pieces) -> np.ndarray:
    """`[B * Hk * P]` modelled times of the dk/dv programs in launch order (grid `(P, B, Hk)`, the
    first axis fastest): entries walked + 1, or `IDLE_PROGRAM` for a program that writes nothing (a
    long block's first piece, empty or left to the finish kernel to walk; an unused further piece)."""
    pieces = np.asarray(pieces)  # [B, Hk, P, 4]
    entries = pieces[..., 2] - pieces[..., 1]
    program = np.arange(pieces.shape[2]) - plan.first_program
    is_first = (program >= 0) & (program < plan.num_key_blocks)
    works = np.where(is_first, pieces[..., 3] == 0, entries > 0)
    return np.where(works, entries + 1.0, IDLE_PROGRAM).reshape(-1)  # (batch, head) major, program fastest


def finish_times(plan, pieces) -> np.ndarray:
    """`[B * Hk * m]` modelled times of the finish kernel's programs in launch order (grid
    `(m, B, Hk)`): a long block's first piece (entries + 1; nothing when `plan.finish_walks_first` is
    off) and the partial sums it adds, or `IDLE_PROGRAM`."""
    pieces = np.asarray(pieces)
    firsts = pieces[..., plan.first_program:plan.first_program + plan.num_key_blocks, :]
    ranges = np.asarray(pallas_kernel.piece_owners(plan, jnp.asarray(pieces)))  # [B, Hk, m, 2]
    walk = firsts[..., 2] - firsts[..., 1] + 1.0 if plan.finish_walks_first else 0.0
    work = walk + ADD_PARTIAL_SUM * (ranges[..., 1] - ranges[..., 0])
    return np.where(firsts[..., 3] != 0, work, IDLE_PROGRAM).reshape(-1)


def modelled_time(times: np.ndarray, slots: int = SLOTS) -> float:
    """When the last of `times` ends if each starts, in order, on the first free of `slots`."""
    heap = [0.0] * slots
    heapq.heapify(heap)
    for t in times:
        heapq.heappush(heap, heapq.heappop(heap) + t)
    return float(max(heap))


# the dk/dv kernels' ways the model compares: the default, each other way alone, and both together
_ORDER = (f"further_pieces_{'last' if pallas_kernel.EXTRAS_FIRST else 'first'}",
          dict(extras_first=not pallas_kernel.EXTRAS_FIRST))
_FINISH = (f"finish_{'adds_only' if pallas_kernel.FINISH_WALKS_FIRST else 'walks_first_pieces'}",
           dict(finish_walks_first=not pallas_kernel.FINISH_WALKS_FIRST))
DKV_WAYS = {"default": {}, _ORDER[0]: _ORDER[1], _FINISH[0]: _FINISH[1],
            f"{_ORDER[0]}+{_FINISH[0]}": {**_ORDER[1], **_FINISH[1]}}


def dkv_model(causal: bool, sel, *, H: int, D: int, slots: int = SLOTS) -> dict:
    """Per way of `DKV_WAYS`, the modelled time of the dk/dv kernel (`dkv`), of the finish kernel
    after it (`finish`), their sum (`total`) and the piece walked (`piece`); and `bound`: the default
    dk/dv kernel's least time in any order (its work spread evenly over the slots, or its longest
    program)."""
    out = {}
    for way, options in DKV_WAYS.items():
        with pallas_kernel.launch_options(**options):
            plan = pallas_kernel.make_plan(causal, sel, num_heads=H, head_dim=D, has_mask=False)
        pieces, _ = pallas_kernel.inverted_lists(plan, sel.idx, sel.valid, sel.row_start)
        times = program_times(plan, pieces)
        dkv, finish = modelled_time(times, slots), modelled_time(finish_times(plan, pieces), slots)
        out[way] = {"dkv": dkv, "finish": finish, "total": dkv + finish,
                    "piece": int(np.max(np.asarray(pieces[..., 2] - pieces[..., 1])))}
        if way == "default":
            out["bound"] = float(max(times.sum() / slots, times.max()))
    return out


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
    needed = np.asarray(pallas_kernel.partial_sums_needed(plan, lengths))
    walked = (pieces[..., 2] - pieces[..., 1]).max(-1)
    return {"input": kind, "T": T, "causal": causal, "query_blocks": n, "piece": plan.piece,
            "long_lists": plan.long_lists, "partial_sums": plan.extra_pieces,
            "longest_list": lengths.max(-1).tolist(), "lists_past_a_piece": (lengths > plan.piece).sum(-1).tolist(),
            "partial_sums_needed": needed.tolist(), "piece_walked": walked.tolist(),
            "fits": bool((needed <= plan.extra_pieces).all()), "dkv_model": dkv_model(causal, sel, H=H, D=D)}


def _model_line(model: dict) -> str:
    base = model["default"]
    others = "; ".join(f"{way.replace('_', ' ')} {m['total']:.0f} ({m['total'] / base['total'] - 1:+.1%}"
                       f"{'' if m['piece'] <= base['piece'] else ', pieces ' + str(m['piece'])})"
                       for way, m in model.items() if way not in ("default", "bound"))
    return (f"default {base['dkv']:.0f} + finish {base['finish']:.0f} = {base['total']:.0f} "
            f"(bound {model['bound']:.0f}); {others}")


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
            print(f"T={T} {kind:14s} partial sums {r['partial_sums']:4d}: needed per head "
                  f"{min(r['partial_sums_needed'])}-{max(r['partial_sums_needed'])} "
                  f"(lists past {r['piece']}: {min(r['lists_past_a_piece'])}-{max(r['lists_past_a_piece'])}, "
                  f"longest {max(r['longest_list'])}); pieces walked {min(r['piece_walked'])}-{max(r['piece_walked'])}"
                  f"{'' if r['fits'] else ' (grown)'}; dk/dv model {_model_line(r['dkv_model'])}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"preset": a.preset, "causal": a.causal, "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
