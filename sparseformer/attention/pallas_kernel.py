"""The fused exact kernel (`selection.kernel = "pallas"`): block-sparse flash attention in Pallas.

The `scan` kernel gathers every chosen key/value block into device memory and runs one small
matmul per slot for all query blocks at once; on a GPU that reaches a few percent of a fused
kernel's rate. This kernel walks the same `Selection` the way flash attention walks a row:

- **forward**: one program per (query block, batch, key/value head tile). It loads its query tile
  once, then for each *valid* slot of its list (compacted to the front, so an unused slot costs
  nothing) loads that key and value block straight from the whole K/V array and updates the
  online-softmax state (running max, normaliser, accumulator) held on chip. Only the output and
  its log-sum-exp are written.
- **dq**: the same walk, recomputing the probabilities from the stored log-sum-exp.
- **dk, dv**: one program per (key block, batch, key/value head) walks the *inverted* lists (for
  each key block, the query blocks that chose it, built once per call by a sort: the transposed
  mask of splash attention), so every gradient is written by exactly one program, in a fixed
  order: no atomics, and the backward pass is deterministic (a killed and resumed run reproduces
  its losses on a GPU too). A key block chosen by many query blocks (a global block is chosen by
  all of them) has its list cut into pieces of `LIST_PIECE` entries, each a program of its own
  writing float32 partial sums, so one long list does not keep the GPU waiting on a single program;
  a small second kernel adds a long block's partial sums in a fixed order (nothing left to walk
  after the dk/dv kernel: `FINISH_WALKS_FIRST`). Every gradient is written once, in its final
  dtype: no float32 copy of dk and dv is ever whole in memory. The partial sums are sized for
  `LONG_LISTS` lists of every query block, not for the worst case (every slot of every query block
  on a few blocks); a call whose lists need more pieces than that cuts them into longer pieces
  instead (fewer programs, the same sums). The long lists' pieces, full-length, are the first
  programs of each (batch, key/value head), the other blocks' lists (mostly shorter) after them: a
  GPU starts the longest programs first, so the last to finish are short ones (`EXTRAS_FIRST`).

Grouped-query attention: the query heads of a key/value head share one choice (`Selection.group`),
so one program stacks `heads_per_tile` of them into its query tile (`rows = heads_per_tile * b`)
and a key block is loaded once for all of them; the dk/dv programs walk every head of the group.

Masks: causal (key position <= query position, which only bites inside the diagonal block, as
selection never picks a future block), key padding, and `Selection.row_start` (a slot that serves
only the rows of its query block from an offset on). Logits, softmax statistics and accumulators
are float32 whatever the input dtype; the matmuls take the inputs' dtype (bfloat16/float16 run
on tensor cores). Float32 inputs multiply as JAX's matmul precision says, like XLA's own float32
matmuls: TF32 tensor cores by default on a GPU, full float32 (no tensor cores) under
`jax.default_matmul_precision("highest")` (`benchmarks/triton_sm90.py` compiled both: the default
runs `wgmma ... tf32`, "highest" plain FMAs).

Backend: Pallas' Triton lowering (`jax.experimental.pallas.triton`). It supports data-dependent
block addresses read from an index array inside the kernel, which is all this walk needs; it is
present in jax 0.10.x and, deprecated, in 0.11.x. On a CPU the same kernel runs in Pallas'
interpret mode (slow: for tests), unless `compile_for_gpu()` asks for the GPU lowering (to lower
for `cuda` on a machine without one). On a TPU the same `Plan` and lists run the Mosaic TPU kernels
of `pallas_tpu` (`compile_for_tpu()` lowers them on a CPU, `tpu_interpret()` interprets them).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparseformer.attention.dense import LOG0, softmax_delta

# A key block's inverted list is walked by programs of at least this many entries each (more only
# when a call's long lists need more pieces than the partial sums hold: `LONG_LISTS`).
LIST_PIECE = 16
# The dk/dv float32 partial sums hold the pieces of this many lists of every query block at
# `LIST_PIECE` entries (a global block, an attention sink; or many shorter lists, as rsa's choice on
# topic-segmented inputs makes): `[B, Hk, LONG_LISTS * ceil(n / piece), b, D]` each (one piece fewer
# a list when the finish kernel walks first pieces: `FINISH_WALKS_FIRST`), 16 / piece of a bfloat16
# `[B, T, Hk, D]` array for dk and dv together, where the worst case (all `K` slots of every query
# block on `K` blocks) takes 4 K / piece. BENCHMARKS.md ("Partial sums for long lists") has what
# rsa's lists need on the benchmark's inputs.
LONG_LISTS = 4
# The dk/dv grid runs each (batch, key/value head)'s further pieces (every one full-length but the
# last of its list) before its key blocks' first pieces (most lists are shorter than a piece). The GPU
# starts programs in grid order, so the last to finish are short ones: with the further pieces last,
# the final (batch, head)'s full-length pieces started when the GPU was already full and ran on alone.
# A list-scheduling model of rsa's dk/dv grid on its own choices (132 SMs x 2 programs, a program's
# time its entries + 1) puts that tail at 3-7% of the dk/dv and finish kernels causal at 4K-16K, up
# to 9% bidirectional at 4K, and -3% to +3% at 64K (BENCHMARKS.md, "Order of the dk/dv programs");
# `launch_options(extras_first=False)` restores the other order, for the GPU stage to time both.
EXTRAS_FIRST = True
# Every piece of a long list is walked by the dk/dv kernel into a partial sum, and the finish kernel
# only adds them. It used to walk each long list's first piece itself (no partial sum spent on a first
# piece), but that walk ran after the whole dk/dv kernel: one full piece's walk on the critical path,
# modelled at 31-38% of the dk/dv and finish kernels' time at 4K whenever a list is long, 1-19% at 16K
# and 0-5% at 64K (BENCHMARKS.md, "Order of the dk/dv programs"), for one more partial sum per long
# list (the buffers: `LONG_LISTS * ceil(n / piece)` pieces instead of `LONG_LISTS * (ceil(n / piece)
# - 1)`). The gradients are the same, bit for bit; `launch_options(finish_walks_first=True)`
# restores the other way, for the GPU stage to time both.
FINISH_WALKS_FIRST = False
# Rows x head dim of one program's query tile at most, in 16-bit elements (the accumulator lives in
# registers, the tiles in shared memory: a float32 tile counts twice on a GPU).
MAX_TILE_ELEMENTS = 128 * 128

# (kernel family, interpret) forced by `compile_for_gpu`, `compile_for_tpu` or `tpu_interpret`.
_TARGET: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar("sparseformer_pallas", default=None)
# (num_warps, num_stages) forced by `launch_options`
_LAUNCH: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("sparseformer_launch", default=None)
# entries of an inverted-list piece forced by `launch_options(list_piece=...)`
_PIECE: contextvars.ContextVar[int | None] = contextvars.ContextVar("sparseformer_piece", default=None)
# long lists the partial sums are sized for, forced by `launch_options(long_lists=...)`
_LONG: contextvars.ContextVar[int | None] = contextvars.ContextVar("sparseformer_long_lists", default=None)
# program order of the dk/dv grid forced by `launch_options(extras_first=...)`
_ORDER: contextvars.ContextVar[bool | None] = contextvars.ContextVar("sparseformer_extras_first", default=None)
# whether the finish kernel walks long lists' first pieces, forced by `launch_options(finish_walks_first=...)`
_FINISH: contextvars.ContextVar[bool | None] = contextvars.ContextVar("sparseformer_finish_walks", default=None)


@contextlib.contextmanager
def _target(family: str, interpret: bool):
    token = _TARGET.set((family, interpret))
    try:
        yield
    finally:
        _TARGET.reset(token)


@contextlib.contextmanager
def compile_for_gpu():
    """Lower the kernel for the GPU even when the default backend is the CPU (no interpret mode):
    for `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` on a machine without a GPU.
    Without a GPU, the lowering targets an abstract H200 (`_abstract_gpu`)."""
    with _target("triton", False), _abstract_gpu():
        yield


def _abstract_gpu():
    """The GPU model the Triton lowering reads when there is no GPU: an abstract H200 (compute
    capability 9.0). jax 0.10 assumed 9.0 when it found no GPU; jax 0.11 raises instead, unless an
    abstract device says which GPU is meant. Its mesh axes are `Auto`, so code traced inside keeps
    its own sharding behaviour. Used under both versions (0.10.2 lowers the same kernels with it)."""
    if jax.devices()[0].platform == "gpu":  # a real GPU: jax reads its model itself
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), (jax.sharding.AxisType.Auto,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def compile_for_tpu():
    """Lower the TPU kernel (`pallas_tpu`) on a machine without a TPU:
    for `jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`."""
    return _target("tpu", False)


def tpu_interpret():
    """Run the TPU kernel in Pallas' TPU interpret mode (on a CPU: for tests)."""
    return _target("tpu", True)


def kernel_target() -> tuple[str, bool]:
    """(`"triton"` or `"tpu"`, interpret): the TPU kernel on a TPU, the Triton one compiled on a
    GPU and interpreted elsewhere, unless a context above says otherwise."""
    forced = _TARGET.get()
    if forced is not None:
        return forced
    backend = jax.default_backend()
    return ("tpu", False) if backend == "tpu" else ("triton", backend != "gpu")


def _compiled_gpu() -> bool:
    """Whether the Triton kernel is compiled for a GPU here (not interpreted, not the TPU kernel)."""
    return kernel_target() == ("triton", False)


def fixed_params(interpret: bool, num_warps: int = 4, num_stages: int = 2):
    """Triton launch options of a kernel with one fixed launch (the fused estimate and pooled
    branch: not in the launch sweep); None when interpreted."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _wide(dtype) -> int:
    """How many 16-bit elements one element of `dtype` weighs in shared memory (float32: 2)."""
    return max(1, jnp.dtype(dtype).itemsize // 2) if dtype is not None else 1


def _triton_missing() -> str | None:
    """Why this JAX cannot lower Pallas to Triton (None when it can): the backend is deprecated from
    jax 0.11 and will leave JAX in some later release; `auto` then takes `scan` on a GPU."""
    try:
        importlib.import_module("jax.experimental.pallas.triton")
    except ImportError as e:
        return f"this JAX ({jax.__version__}) has no Pallas Triton backend ({e}); use selection.kernel 'scan'"
    return None


def unsupported_reason(block_size: int, head_dim: int, dtype=None, *, compiled_gpu: bool = False) -> str | None:
    """Why the kernel cannot run these shapes (None when it can): Triton tiles are powers of two
    and its matmuls need every dimension >= 16. Compiled for a GPU (`compiled_gpu`), JAX must still
    have its Pallas Triton backend, and a float32 block's tiles must fit an SM's shared memory:
    `block_size x head_dim <= MAX_TILE_ELEMENTS / 2` (`benchmarks/triton_sm90.py`: float32 blocks of
    128 with head dim 128 need 257-385 KiB of the 227 KiB an H100/H200 program may take; 16-bit ones
    fit)."""
    for name, x in (("selection.block_size", block_size), ("head dim", head_dim)):
        if x < 16 or x & (x - 1):
            return f"{name} {x}: the pallas kernel needs a power of two >= 16"
    if compiled_gpu and (missing := _triton_missing()):
        return missing
    if compiled_gpu and block_size * head_dim * _wide(dtype) > MAX_TILE_ELEMENTS:
        return (f"selection.block_size {block_size} x head dim {head_dim} in {jnp.dtype(dtype).name} needs more "
                f"shared memory than a GPU program has (at most {MAX_TILE_ELEMENTS // _wide(dtype)} elements a block "
                "in this dtype; bfloat16 and float16 take twice as many)")
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call."""

    causal: bool
    block: int  # b: rows of a query block, keys of a key block
    heads_per_tile: int  # query heads of one group stacked in a program's query tile
    tiles_per_group: int  # group size // heads_per_tile
    slots: int  # K: slots per query block
    num_query_blocks: int  # n
    num_key_blocks: int  # m
    has_start: bool
    has_mask: bool
    interpret: bool
    tpu: bool = False  # the Mosaic TPU kernels of `pallas_tpu` instead of the Triton ones
    # q, k, v (and dq, dk, dv) in the public `[B, T, H, D]` layout, read in place (one head per tile,
    # Triton): no head-major copies of the inputs; q is scaled by `scale` as it is loaded
    bthd: bool = False
    scale: float = 1.0
    piece: int = LIST_PIECE  # entries of an inverted list a dk/dv program walks, at least
    long_lists: int = LONG_LISTS  # lists of every query block the partial sums hold at `piece`
    extras_first: bool = EXTRAS_FIRST  # dk/dv programs: the further pieces, then the first pieces
    finish_walks_first: bool = FINISH_WALKS_FIRST  # else a long list's first piece is a further piece too

    @property
    def rows(self) -> int:
        return self.heads_per_tile * self.block

    @property
    def extra_pieces(self) -> int:
        """Further-piece programs per (batch, key/value head), each with a float32 `[b, D]` partial
        sum of dk and of dv: the further pieces of `long_lists` lists of all `n` query blocks at `piece`
        entries (every piece of them when the finish kernel walks no first piece), never more than
        any selection can use (`ceil(n K / piece)`), at least 1."""
        n, K = self.num_query_blocks, self.slots
        worst = -(-n * K // self.piece)
        per_list = -(-n // self.piece) - (1 if self.finish_walks_first else 0)
        return max(1, min(worst, self.long_lists * per_list))

    @property
    def first_program(self) -> int:
        """The dk/dv program that walks key block 0's first piece (block `j`'s: this + `j`)."""
        return self.extra_pieces if self.extras_first else 0

    @property
    def extra_program(self) -> int:
        """The dk/dv program that walks further piece 0 (piece `e`'s: this + `e`)."""
        return 0 if self.extras_first else self.num_key_blocks

    def params(self, head_dim: int, *, key_blocks: bool = False):
        """Triton launch options: 4 warps for tiles up to 64 x 64 and blocks up to 64, else 8; loads
        pipelined 2 stages deep, except in the dk/dv kernels (`key_blocks`) when a group spans several
        tiles: their unrolled walk over the group's tiles keeps one set of pipelined buffers per tile,
        which outgrows shared memory (8 bfloat16 heads of dim 128 per key/value head: 565 KiB of 227;
        one stage: 113 KiB; `benchmarks/triton_sm90.py`)."""
        from jax.experimental.pallas import triton as pl_triton

        warps = 4 if self.rows * head_dim <= 64 * 64 and self.block <= 64 else 8
        forced = _LAUNCH.get()
        if forced is not None:
            return pl_triton.CompilerParams(num_warps=forced[0], num_stages=forced[1])
        stages = 1 if key_blocks and self.tiles_per_group > 1 else 2
        return pl_triton.CompilerParams(num_warps=warps, num_stages=stages)


@contextlib.contextmanager
def launch_options(num_warps: int | None = None, num_stages: int | None = None, *, list_piece: int | None = None,
                   long_lists: int | None = None, extras_first: bool | None = None,
                   finish_walks_first: bool | None = None):
    """Compile the Triton programs traced inside with these launch options instead of the defaults
    (4 warps for tiles up to 64 x 64 and blocks up to 64, else 8; 2 pipeline stages), and/or cut the
    dk/dv inverted lists into pieces of at least `list_piece` entries instead of `LIST_PIECE` (larger
    pieces: a long list keeps fewer programs busy, and fewer partial sums are needed), and/or size the
    float32 partial sums for `long_lists` lists of every query block instead of `LONG_LISTS` (more:
    more memory, and pieces stay short when many blocks are chosen by nearly every query block;
    `Plan.extra_pieces`), and/or order the dk/dv programs otherwise (`extras_first=False`: each key
    block's first piece, then the further pieces; `EXTRAS_FIRST`), and/or walk every piece in the
    dk/dv kernel or not (`finish_walks_first=True`: the finish kernel walks each long list's first
    piece, one partial sum fewer per long list; `FINISH_WALKS_FIRST`): for tuning them on a GPU
    (`benchmarks/gpu_check.py`'s launch sweep) and reading their static cost
    (`benchmarks/triton_sm90.py`). Warps and stages are given together or not at all."""
    if (num_warps is None) != (num_stages is None):
        raise ValueError("launch_options: give num_warps and num_stages together")
    for name, x in (("list_piece", list_piece), ("long_lists", long_lists)):
        if x is not None and (not isinstance(x, int) or x < 1):
            raise ValueError(f"launch_options: {name} {x!r}; allowed: an integer >= 1")
    for name, x in (("extras_first", extras_first), ("finish_walks_first", finish_walks_first)):
        if x is not None and not isinstance(x, bool):
            raise ValueError(f"launch_options: {name} {x!r}; allowed: True, False")
    tokens = [(_LAUNCH, _LAUNCH.set((int(num_warps), int(num_stages))))] if num_warps is not None else []
    if list_piece is not None:
        tokens.append((_PIECE, _PIECE.set(int(list_piece))))
    if long_lists is not None:
        tokens.append((_LONG, _LONG.set(int(long_lists))))
    if extras_first is not None:
        tokens.append((_ORDER, _ORDER.set(extras_first)))
    if finish_walks_first is not None:
        tokens.append((_FINISH, _FINISH.set(finish_walks_first)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def make_plan(causal: bool, selection, *, num_heads: int, head_dim: int, has_mask: bool, dtype=None) -> Plan:
    group = selection.group
    family, interpret = kernel_target()
    # compiled for a GPU, a float32 tile weighs twice its elements in shared memory (interpreted,
    # any tile runs: the tests keep stacking heads in float32)
    wide = _wide(dtype) if _compiled_gpu() else 1
    hp = 1
    while (hp * 2 <= group and group % (hp * 2) == 0
           and 2 * hp * selection.block_size * head_dim * wide <= MAX_TILE_ELEMENTS):
        hp *= 2
    return Plan(
        causal=causal,
        block=selection.block_size,
        heads_per_tile=hp,
        tiles_per_group=group // hp,
        slots=selection.idx.shape[-1],
        num_query_blocks=selection.idx.shape[2],
        num_key_blocks=selection.num_key_blocks,
        has_start=selection.row_start is not None,
        has_mask=has_mask,
        interpret=interpret,
        tpu=family == "tpu",
        piece=_PIECE.get() or LIST_PIECE,  # the module constants read now: tests shrink them
        long_lists=_LONG.get() or LONG_LISTS,
        extras_first=EXTRAS_FIRST if _ORDER.get() is None else _ORDER.get(),
        finish_walks_first=FINISH_WALKS_FIRST if _FINISH.get() is None else _FINISH.get(),
    )


# ---------------------------------------------------------------- the lists each program walks


def forward_lists(plan: Plan, idx, valid, row_start, qids):
    """Per (batch, kv head, query block): `[count, qid, block_0..block_{K-1}, start_0..]` int32,
    valid slots first in their original order (an unused slot is never visited). `[B, Hk, n, M]`."""
    B, Hk, n, K = idx.shape
    order = jnp.argsort(~valid, axis=-1, stable=True)
    parts = [
        jnp.sum(valid, -1, dtype=jnp.int32)[..., None],
        jnp.broadcast_to(qids.astype(jnp.int32)[:, None], (B, Hk, n, 1)),
        jnp.take_along_axis(idx, order, -1).astype(jnp.int32),
    ]
    if plan.has_start:
        parts.append(jnp.take_along_axis(row_start, order, -1).astype(jnp.int32))
    meta = jnp.concatenate(parts, -1)
    width = _next_pow2(meta.shape[-1])
    return jnp.pad(meta, ((0, 0), (0, 0), (0, 0), (0, width - meta.shape[-1])))


def inverted_lists(plan: Plan, idx, valid, row_start):
    """For each key block, the query blocks that chose it, cut into pieces.

    Pieces are `plan.piece` entries (`LIST_PIECE` unless `launch_options` says otherwise), or, for a
    (batch, key/value head) whose lists need more further pieces than the `plan.extra_pieces` partial
    sums hold, the shortest length that fits them (`piece_length`): every list is still walked once.

    Returns `pieces [B, Hk, P, 4]` int32 rows `(key block, first entry, end entry, later)` for the
    `P = m + plan.extra_pieces` programs: key block `j`'s first piece is program
    `plan.first_program + j`, `later` 1 when further pieces follow it; the further pieces, in
    key-block order, are programs `plan.extra_program + e`, `later` 0 (the further pieces come first
    unless `plan.extras_first` is off); unused programs have an empty range. Unless
    `plan.finish_walks_first`, a long list's first piece is empty and all its pieces are further
    pieces. And
    `entries [B, Hk, E]` int32: the sorted query blocks (then their row starts), `E` a power of two.
    """
    B, Hk, n, K = idx.shape
    m = plan.num_key_blocks
    nk = n * K
    qblock = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, K))
    key = jnp.where(valid, idx * n + qblock, m * n).reshape(B, Hk, nk)  # sorted by block, then query
    order = jnp.argsort(key, axis=-1, stable=True)
    sorted_key = jnp.take_along_axis(key, order, -1)
    bounds = jax.vmap(jax.vmap(lambda s: _searchsorted(s, jnp.arange(m + 1) * n)))(sorted_key)  # [B, Hk, m+1]
    start, end = bounds[..., :-1], bounds[..., 1:]
    piece = piece_length(plan, end - start)[..., None]  # [B, Hk, 1]
    # block j's first piece: program first_program + j; its further pieces: programs extra_program +
    # (their rank among all further pieces, in key-block order)
    extra = _further_pieces(end - start, piece, plan.finish_walks_first)  # [B, Hk, m]
    skip = 1 if plan.finish_walks_first else 0  # pieces of a long list the finish kernel walks
    first_end = jnp.minimum(end, start + piece)
    if not plan.finish_walks_first:  # a long list's first piece is one of its further pieces
        first_end = jnp.where(extra > 0, start, first_end)
    extra_before = jnp.cumsum(extra, -1) - extra
    p = jnp.arange(plan.extra_pieces)
    # owner block of extra piece p: the last block whose extras start at or before p
    owner = jax.vmap(jax.vmap(lambda eb, ex: _searchsorted(eb + ex, p, side="right")))(extra_before, extra)
    owner_c = jnp.minimum(owner, m - 1)
    rank = p - jnp.take_along_axis(extra_before, owner_c, -1)  # 0-based rank among the owner's extras
    e_start = jnp.take_along_axis(start, owner_c, -1) + (rank + skip) * piece
    e_end = jnp.minimum(jnp.take_along_axis(end, owner_c, -1), e_start + piece)
    in_use = owner < m
    e_start, e_end = jnp.where(in_use, e_start, 0), jnp.where(in_use, e_end, 0)
    firsts = jnp.stack([jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (B, Hk, m)), start, first_end,
                        extra > 0], -1).astype(jnp.int32)
    extras = jnp.stack([owner_c, e_start, e_end, jnp.zeros_like(owner_c)], -1).astype(jnp.int32)
    pieces = jnp.concatenate([extras, firsts] if plan.extras_first else [firsts, extras], -2)
    qsorted = (sorted_key % n).astype(jnp.int32)
    parts = [qsorted]
    if plan.has_start:
        parts.append(jnp.take_along_axis(row_start.reshape(B, Hk, nk), order, -1).astype(jnp.int32))
    entries = jnp.concatenate(parts, -1)
    width = _next_pow2(entries.shape[-1])
    return pieces, jnp.pad(entries, ((0, 0), (0, 0), (0, width - entries.shape[-1])))


def _searchsorted(a, v, side: str = "left"):
    """`jnp.searchsorted` comparing every `v` with every `a` at once: one fused reduction on a GPU,
    where the default binary search is a loop of ~log2(len(a)) dependent trips, a few kernel
    launches each (`benchmarks/gpu_aot.py`); the lists here are short enough for the comparisons."""
    return jnp.searchsorted(a, v, side=side, method="compare_all")


def _further_pieces(lengths, piece, finish_walks_first: bool):
    """Partial-sum programs that lists of `lengths` entries take in pieces of `piece`: every piece
    after the first, or every piece of a list longer than one when the finish kernel walks none."""
    pieces = -(-lengths // piece)
    return jnp.maximum(0, pieces - 1) if finish_walks_first else jnp.where(lengths > piece, pieces, 0)


def partial_sums_needed(plan: Plan, lengths):
    """`[...]` int32: the partial sums (the dk/dv programs that write one) that inverted lists of
    `lengths [..., m]` entries take in pieces of `plan.piece`; the kernel has room for
    `plan.extra_pieces` (else its pieces grow: `piece_length`)."""
    return jnp.sum(_further_pieces(jnp.asarray(lengths), plan.piece, plan.finish_walks_first), -1)


def piece_ladder(plan: Plan) -> tuple[int, ...]:
    """The lengths a dk/dv piece may take, shortest first: every length from `plan.piece` to twice
    it, then steps of 2**(1/4) (19%), up to `n` (no list is longer: a query block chooses a key
    block once)."""
    piece, n = plan.piece, plan.num_query_blocks
    ladder = list(range(piece, 2 * piece + 1))
    while ladder[-1] < n:
        ladder.append(max(ladder[-1] + 1, math.ceil(ladder[-1] * 2**0.25)))
    return tuple(ladder)


def piece_length(plan: Plan, lengths):
    """`[B, Hk]` int32: the entries a dk/dv program walks for each (batch, key/value head) whose
    inverted lists are `lengths [B, Hk, m]` long: the shortest length of `piece_ladder` whose further
    pieces fit the `plan.extra_pieces` partial sums (`plan.piece` unless the lists need more). All
    the ladder's lengths are tried at once: one small fused reduction, no loop, so the backward pass
    waits on nothing sequential (a bisection's loop would be a dozen dependent steps on a GPU). Past
    the ladder's end (a list longer than `n`, which a valid selection does not make) the longest
    list's length, which needs no further piece."""
    ladder = jnp.asarray(piece_ladder(plan), jnp.int32)  # [c]
    needed = jnp.sum(_further_pieces(lengths[..., None, :], ladder[:, None], plan.finish_walks_first), -1)
    fits = needed <= plan.extra_pieces
    shortest = jnp.min(jnp.where(fits, ladder, jnp.iinfo(jnp.int32).max), -1)
    longest = jnp.maximum(jnp.max(lengths, -1), plan.piece).astype(jnp.int32)
    return jnp.where(jnp.any(fits, -1), shortest, longest)


def piece_owners(plan: Plan, pieces):
    """For the reduction: per key block, the range of its further pieces `[B, Hk, m, 2]` (indices
    into the partial sums: piece `e` is program `plan.extra_program + e`), so partial sums are added
    in one fixed order."""
    m, x0 = plan.num_key_blocks, plan.extra_program
    extras = pieces[..., x0:x0 + plan.extra_pieces, :]
    owner = extras[..., 0]
    used = extras[..., 2] > extras[..., 1]
    key = jnp.where(used, owner, m)
    lo = jax.vmap(jax.vmap(lambda s: _searchsorted(s, jnp.arange(m), side="left")))(key)
    hi = jax.vmap(jax.vmap(lambda s: _searchsorted(s, jnp.arange(m), side="right")))(key)
    return jnp.stack([lo, hi], -1).astype(jnp.int32)


# ---------------------------------------------------------------- kernels


def _dot_t(a, b):
    """`a @ b.T` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """`a.T @ b` with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def pair_mask(plan: Plan, qid, blk, start, kmask_ref_or_block):
    """Allowed pairs of a `[rows, b]` tile (None when all are), for query block `qid` against key
    block `blk`; `kmask` is the key block's `[b]` mask (a ref slice or a loaded block)."""
    b, rows = plan.block, plan.rows
    r = lax.rem(lax.broadcasted_iota(jnp.int32, (rows, b), 0), b)  # lax.rem: Mosaic TPU has no floor-mod
    c = lax.broadcasted_iota(jnp.int32, (rows, b), 1)
    mask = None

    def both(x, y):
        return y if x is None else x & y

    if plan.causal:
        mask = both(mask, blk * b + c <= qid * b + r)
    if plan.has_start:
        mask = both(mask, r >= start)
    if plan.has_mask:
        kmask = kmask_ref_or_block != 0
        mask = both(mask, kmask if kmask.ndim == 2 else kmask[None, :])  # [1, b] on a TPU
    return mask


def _scaled(plan: Plan, q):
    """A loaded query tile times the plan's scale, in its own dtype (as `attend` scales q)."""
    return q if plan.scale == 1.0 else q * jnp.asarray(plan.scale, q.dtype)


def _forward_kernel(meta_ref, q_ref, k_ref, v_ref, *refs, plan: Plan):
    kmask_ref = refs[0] if plan.has_mask else None
    o_ref, lse_ref = refs[-2:]
    b, rows, K = plan.block, plan.rows, plan.slots
    q = _scaled(plan, q_ref[...])
    count, qid = meta_ref[0], meta_ref[1]

    def body(j, carry):
        acc, m_i, l_i = carry
        blk = meta_ref[2 + j]
        start = meta_ref[2 + K + j] if plan.has_start else None
        keys = pl.ds(blk * b, b)
        s = _dot_t(q, k_ref[keys, :])
        mask = pair_mask(plan, qid, blk, start, kmask_ref[keys] if plan.has_mask else None)
        if mask is not None:
            s = jnp.where(mask, s, LOG0)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        alpha = jnp.exp(m_i - m_new)
        p = jnp.exp(s - m_new[:, None])
        if mask is not None:  # a row with nothing allowed in this slot must gain nothing
            p = jnp.where(mask, p, 0.0)
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l_i * alpha + jnp.sum(p, axis=1)

    D = q.shape[-1]
    init = (jnp.zeros((rows, D), jnp.float32), jnp.full((rows,), LOG0, jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, m_i, l_i = lax.fori_loop(0, count, body, init)
    has = l_i > 0
    safe = jnp.where(has, l_i, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has, m_i + jnp.log(safe), LOG0)


def _dq_kernel(meta_ref, q_ref, k_ref, v_ref, *refs, plan: Plan):
    kmask_ref = refs[0] if plan.has_mask else None
    do_ref, lse_ref, dd_ref, dq_ref = refs[-4:]
    b, K = plan.block, plan.slots
    q = _scaled(plan, q_ref[...])
    do = do_ref[...].astype(q.dtype)
    lse, dd = lse_ref[...], dd_ref[...]
    count, qid = meta_ref[0], meta_ref[1]

    def body(j, dq):
        blk = meta_ref[2 + j]
        start = meta_ref[2 + K + j] if plan.has_start else None
        keys = pl.ds(blk * b, b)
        k = k_ref[keys, :]
        p = jnp.exp(_dot_t(q, k) - lse[:, None])
        mask = pair_mask(plan, qid, blk, start, kmask_ref[keys] if plan.has_mask else None)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot_t(do, v_ref[keys, :]) - dd[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * plan.scale if plan.scale != 1.0 else dq).astype(dq_ref.dtype)  # d/dq of (scale * q)


def _walk_key_block(plan: Plan, first, end, refs):
    """dk, dv (float32 `[b, D]`) of one key block from the query blocks `entries[first:end]` of its
    inverted list. `refs`: (pieces, entries, qids, q, k, v[, kmask], d_out, lse, delta, ...)."""
    pieces_ref, entries_ref, qid_ref, q_ref, k_ref, v_ref = refs[:6]
    kmask_ref = refs[6] if plan.has_mask else None
    do_ref, lse_ref, dd_ref = refs[6 + plan.has_mask:9 + plan.has_mask]
    b, rows, R = plan.block, plan.rows, plan.tiles_per_group
    blk = pieces_ref[0]
    keys = pl.ds(blk * b, b)
    k, v = k_ref[keys, :], v_ref[keys, :]
    kmask = kmask_ref[keys] if plan.has_mask else None
    start_off = plan.num_query_blocks * plan.slots  # entries: query blocks, then their row starts

    def body(t, carry):
        dk, dv = carry
        i = entries_ref[t]
        qid = qid_ref[i]
        start = entries_ref[start_off + t] if plan.has_start else None
        mask = pair_mask(plan, qid, blk, start, kmask)
        q_rows = pl.ds(i * rows, rows)
        for r in range(R):  # every query head of the group, a tile at a time
            q = _scaled(plan, q_ref[q_rows, r, :] if plan.bthd else q_ref[r, q_rows, :])
            do = do_ref[r, q_rows, :].astype(q.dtype)
            p = jnp.exp(_dot_t(q, k) - lse_ref[r, q_rows][:, None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + _t_dot(p.astype(do.dtype), do)
            ds = p * (_dot_t(do, v) - dd_ref[r, q_rows][:, None])
            dk = dk + _t_dot(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((b, k.shape[-1]), jnp.float32)
    return lax.fori_loop(first, end, body, (zeros, zeros))


def _dkv_kernel(*refs, plan: Plan):
    """One piece of a key block's inverted list. A block whose list is one piece (its first piece's
    program, `plan.first_program + j`) writes its dk, dv in their final dtype; a further piece writes
    its float32 partial sums. Every piece of a long list is a further piece (its first piece is
    empty), and `_finish_kernel` adds their partial sums (with `plan.finish_walks_first`, the first
    piece is left to `_finish_kernel` to walk, then the others' sums added): so dk and dv are never
    held whole in float32 (that was 4 bfloat16-sized arrays, then their rounded copies).
    A program with nothing to write does nothing, not even load its key block: a long block's first
    piece, and the further-piece programs this call's lists leave unused (their partial sums are
    never read, as `piece_owners` ranges cover the used ones only)."""
    dk_ref, dv_ref, dk_extra_ref, dv_extra_ref = refs[-4:]
    pieces_ref = refs[0]
    first, end, later = pieces_ref[1], pieces_ref[2], pieces_ref[3]
    program = pl.program_id(0) - plan.first_program
    is_first = (program >= 0) & (program < plan.num_key_blocks)
    whole = is_first & (later == 0)  # a never-chosen block too: zero gradients
    further = jnp.logical_not(is_first) & (end > first)

    @pl.when(whole | further)
    def _():
        dk, dv = _walk_key_block(plan, first, end, refs)

        @pl.when(is_first)  # the whole list: straight into dk, dv
        def _():
            dk_ref[...] = dk.astype(dk_ref.dtype)
            dv_ref[...] = dv.astype(dv_ref.dtype)

        @pl.when(jnp.logical_not(is_first))  # a further piece: a partial sum, added later
        def _():
            dk_extra_ref[...] = dk
            dv_extra_ref[...] = dv


def _finish_kernel(*refs, plan: Plan):
    """A long key block's gradient: its pieces' partial sums added in program order (after walking
    its first piece, with `plan.finish_walks_first`), written once in the final dtype (other blocks
    keep what `_dkv_kernel` wrote)."""
    ranges_ref, *refs = refs
    dk_x_ref, dv_x_ref, _dk_in, _dv_in, dk_ref, dv_ref = refs[-6:]
    pieces_ref = refs[0]

    @pl.when(pieces_ref[3] != 0)
    def _():
        if plan.finish_walks_first:
            dk, dv = _walk_key_block(plan, pieces_ref[1], pieces_ref[2], refs)
        else:  # every piece is a partial sum: add them, nothing to walk or load
            dk = dv = jnp.zeros(dk_ref.shape, jnp.float32)
        lo, hi = ranges_ref[0], ranges_ref[1]
        dk = lax.fori_loop(lo, hi, lambda p, acc: acc + dk_x_ref[p], dk)
        dv = lax.fori_loop(lo, hi, lambda p, acc: acc + dv_x_ref[p], dv)
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------- calls


def _call(kernel, plan: Plan, grid, in_specs, out_specs, out_shape, args, name, head_dim, aliases=None,
          key_blocks=False):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases or {},
        interpret=plan.interpret,
        compiler_params=None if plan.interpret else plan.params(head_dim, key_blocks=key_blocks),
        name=name,
    )(*args)


def _q_spec(plan: Plan, D: int):  # [B, Hk, R, n*rows, D] -> one query tile
    R = plan.tiles_per_group
    return pl.BlockSpec((None, None, None, plan.rows, D), lambda i, bb, h: (bb, h // R, h % R, i, 0))


def _q_in_spec(plan: Plan, D: int):  # q (and dq): a query tile, read in place from [B, T, H, D] when bthd
    if plan.bthd:  # one head a tile: program h is query head h
        return pl.BlockSpec((None, plan.block, None, D), lambda i, bb, h: (bb, i, h, 0))
    return _q_spec(plan, D)


def _row_spec(plan: Plan):  # [B, Hk, R, n*rows] -> one tile's rows
    R = plan.tiles_per_group
    return pl.BlockSpec((None, None, None, plan.rows), lambda i, bb, h: (bb, h // R, h % R, i))


def _walk_specs(plan: Plan, S: int, D: int, M: int):
    """Specs of (meta, q, k, v[, kmask]) for the programs that walk a query block's list."""
    R = plan.tiles_per_group
    if plan.bthd:  # [B, S, Hk, D]: the key/value head's rows, strided
        kv = pl.BlockSpec((None, S, None, D), lambda i, bb, h: (bb, 0, h // R, 0))
    else:
        kv = pl.BlockSpec((None, None, S, D), lambda i, bb, h: (bb, h // R, 0, 0))
    specs = [pl.BlockSpec((None, None, None, M), lambda i, bb, h: (bb, h // R, i, 0)), _q_in_spec(plan, D), kv, kv]
    if plan.has_mask:
        specs.append(pl.BlockSpec((None, S), lambda i, bb, h: (bb, 0)))
    return specs


def _tiles_shape(plan: Plan, q, k):
    """`[B, Hk, R, n * rows, D]`: the head-major tiles the output, its log-sum-exp and d_out use."""
    if not plan.bthd:
        return q.shape
    B, T, _, D = q.shape
    return (B, k.shape[2], plan.tiles_per_group, T * plan.heads_per_tile, D)


def _kv_len(plan: Plan, k) -> int:
    return k.shape[1] if plan.bthd else k.shape[2]


def _forward(plan: Plan, qg, k, v, meta, kmask):
    B, Hk, R, TR, D = tiles = _tiles_shape(plan, qg, k)
    S, n = _kv_len(plan, k), plan.num_query_blocks
    grid = (n, B, Hk * R)
    args = (meta, qg, k, v) + ((kmask,) if plan.has_mask else ())
    # the output in the inputs' dtype (as flash attention stores it): half the memory the backward
    # keeps in bfloat16; the log-sum-exp stays float32
    out_shape = (jax.ShapeDtypeStruct(tiles, qg.dtype), jax.ShapeDtypeStruct(tiles[:-1], jnp.float32))
    return _call(
        _forward_kernel, plan, grid, _walk_specs(plan, S, D, meta.shape[-1]), (_q_spec(plan, D), _row_spec(plan)),
        out_shape, args, "sparseformer_block_sparse_fwd", D,
    )


def _backward(plan: Plan, qg, k, v, meta, pieces, entries, qids, kmask, out, lse, d_out, d_lse):
    B, Hk, R, TR, D = _tiles_shape(plan, qg, k)
    S, n, m, b = _kv_len(plan, k), plan.num_query_blocks, plan.num_key_blocks, plan.block
    dd = softmax_delta(out, d_out, d_lse)
    d_out = d_out.astype(qg.dtype)  # the kernels multiply in the inputs' dtype: half the bytes to read
    mask_args = (kmask,) if plan.has_mask else ()

    dq = _call(
        _dq_kernel, plan, (n, B, Hk * R),
        _walk_specs(plan, S, D, meta.shape[-1]) + [_q_spec(plan, D), _row_spec(plan), _row_spec(plan)],
        _q_in_spec(plan, D), jax.ShapeDtypeStruct(qg.shape, qg.dtype),  # float32 sums, stored rounded once
        (meta, qg, k, v) + mask_args + (d_out, lse, dd), "sparseformer_block_sparse_dq", D,
    )

    P = pieces.shape[2]
    n_pad = _next_pow2(n)
    qids_p = jnp.pad(qids.astype(jnp.int32), (0, n_pad - n))
    whole_tiles = pl.BlockSpec((None, None, R, TR, D), lambda p, bb, hk: (bb, hk, 0, 0, 0))
    whole_rows = pl.BlockSpec((None, None, R, TR), lambda p, bb, hk: (bb, hk, 0, 0))
    if plan.bthd:  # the group's R query heads and the key/value head, read in place
        whole_q = pl.BlockSpec((None, TR, R, D), lambda p, bb, hk: (bb, 0, hk, 0))
        whole_kv = pl.BlockSpec((None, S, None, D), lambda p, bb, hk: (bb, 0, hk, 0))
        key_block = lambda j: pl.BlockSpec((None, b, None, D), lambda p, bb, hk: (bb, j(p), hk, 0))  # noqa: E731
        grad_shape = (B, S, Hk, D)
    else:
        whole_q = whole_tiles
        whole_kv = pl.BlockSpec((None, None, S, D), lambda p, bb, hk: (bb, hk, 0, 0))
        key_block = lambda j: pl.BlockSpec((None, None, b, D), lambda p, bb, hk: (bb, hk, j(p), 0))  # noqa: E731
        grad_shape = (B, Hk, S, D)
    f0, x0, X = plan.first_program, plan.extra_program, plan.extra_pieces  # the grid's order: `inverted_lists`
    piece_row = lambda row: pl.BlockSpec((None, None, None, 4), lambda p, bb, hk: (bb, hk, row(p), 0))  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, entries.shape[-1]), lambda p, bb, hk: (bb, hk, 0)),
        pl.BlockSpec((n_pad,), lambda p, bb, hk: (0,)),
        whole_q, whole_kv, whole_kv,
    ]
    if plan.has_mask:
        in_specs.append(pl.BlockSpec((None, S), lambda p, bb, hk: (bb, 0)))
    in_specs += [whole_tiles, whole_rows, whole_rows]
    # a program that writes no block of an output still names one: a neighbour's, which it leaves alone
    first_out = key_block(lambda p: jnp.clip(p - f0, 0, m - 1))
    extra_out = pl.BlockSpec((None, None, None, b, D), lambda p, bb, hk: (bb, hk, jnp.clip(p - x0, 0, X - 1), 0, 0))
    grad = jax.ShapeDtypeStruct(grad_shape, k.dtype)  # written once, in the final dtype
    extra_shape = jax.ShapeDtypeStruct((B, Hk, X, b, D), jnp.float32)
    walk_args = (pieces, entries, qids_p, qg, k, v) + mask_args + (d_out, lse, dd)
    dk, dv, dk_x, dv_x = _call(
        _dkv_kernel, plan, (P, B, Hk), [piece_row(lambda p: p)] + in_specs,
        (first_out, first_out, extra_out, extra_out),
        (grad, grad, extra_shape, extra_shape), walk_args, "sparseformer_block_sparse_dkv", D, key_blocks=True,
    )
    # the long blocks: their partial sums (after the first piece's walk, with finish_walks_first),
    # into dk and dv in place (the others pass through)
    whole_extra = pl.BlockSpec((None, None, X, b, D), lambda j, bb, hk: (bb, hk, 0, 0, 0))
    finish_specs = [pl.BlockSpec((None, None, None, 2), lambda j, bb, hk: (bb, hk, j, 0)), piece_row(lambda j: f0 + j)]
    finish_specs += in_specs
    finish_specs += [whole_extra, whole_extra, key_block(lambda j: j), key_block(lambda j: j)]
    finish_args = (piece_owners(plan, pieces),) + walk_args + (dk_x, dv_x, dk, dv)
    n_args = len(finish_args)
    dk, dv = _call(
        _finish_kernel, plan, (m, B, Hk), finish_specs, (key_block(lambda j: j), key_block(lambda j: j)),
        (grad, grad), finish_args, "sparseformer_block_sparse_dkv_finish", D,
        aliases={n_args - 2: 0, n_args - 1: 1}, key_blocks=True,
    )
    return dq, dk, dv


def _to_tiles(plan: Plan, x):
    """`[B, H, T(, D)]` -> the kernel's `[B, Hk, R, n * rows(, D)]`: a tile is `heads_per_tile` heads of
    one query block (a reshape when a tile holds one head)."""
    hp, R, n, b = plan.heads_per_tile, plan.tiles_per_group, plan.num_query_blocks, plan.block
    B, H, Hk, tail = x.shape[0], x.shape[1], x.shape[1] // (R * hp), x.shape[3:]
    x = x.reshape((B, Hk, R, hp, n, b) + tail)
    return jnp.swapaxes(x, 3, 4).reshape((B, Hk, R, n * hp * b) + tail)


def _from_tiles(plan: Plan, x):
    """The inverse of `_to_tiles`."""
    hp, R, n, b = plan.heads_per_tile, plan.tiles_per_group, plan.num_query_blocks, plan.block
    B, Hk, tail = x.shape[0], x.shape[1], x.shape[4:]
    x = x.reshape((B, Hk, R, n, hp, b) + tail)
    return jnp.swapaxes(x, 3, 4).reshape((B, Hk * R * hp, n * b) + tail)


# The custom VJP takes and returns the `[B, H, T, D]` layout, so what it saves for the backward pass
# (q and the output) are the very arrays the rest of `attend` holds, not tiled copies of them.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(plan, q, k, v, meta, idx, valid, row_start, qids, kmask):
    return _fused_fwd(plan, q, k, v, meta, idx, valid, row_start, qids, kmask)[0]


def _fused_fwd(plan, q, k, v, meta, idx, valid, row_start, qids, kmask):
    qg = q if plan.bthd else _to_tiles(plan, q)
    if plan.tpu:
        from sparseformer.attention import pallas_tpu

        out, lse = pallas_tpu.forward(plan, qg, k, v, meta, kmask)
    else:
        out, lse = _forward(plan, qg, k, v, meta, kmask)
    out, lse = _from_tiles(plan, out), _from_tiles(plan, lse)
    return (out, lse), (q, k, v, meta, idx, valid, row_start, qids, kmask, out, lse)


def _fused_bwd(plan, res, cts):
    q, k, v, meta, idx, valid, row_start, qids, kmask, out, lse = res
    qg = q if plan.bthd else _to_tiles(plan, q)
    out, lse = _to_tiles(plan, out), _to_tiles(plan, lse)
    # d_out in the inputs' dtype (the kernels multiply in it; delta accumulates in float32): no
    # float32 copy of the output's cotangent
    d_out = _to_tiles(plan, cts[0].astype(q.dtype))
    d_lse = _to_tiles(plan, cts[1].astype(jnp.float32))
    if plan.tpu:
        from sparseformer.attention import pallas_tpu

        dq, dk, dv = pallas_tpu.backward(plan, qg, k, v, meta, idx, valid, row_start, qids, kmask, out, lse,
                                         d_out, d_lse)
    else:
        pieces, entries = inverted_lists(plan, idx, valid, row_start)
        dq, dk, dv = _backward(plan, qg, k, v, meta, pieces, entries, qids, kmask, out, lse, d_out, d_lse)
    dq = dq if plan.bthd else _from_tiles(plan, dq)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_block_attention(causal: bool, q, k, v, selection, kv_mask=None, *, layout: str = "BHTD", scale: float = 1.0):
    """Exact attention of each query block over its chosen key blocks, fused (see the module).

    Args:
      causal: the causal mask (inside diagonal blocks; selection never picks a future block).
      q: `[B, H, T, D]` queries (layout "BHTD") or `[B, T, H, D]` ("BTHD"); `T = n * block_size`
        (the selection's rows). Multiplied by `scale` (`attend` passes 1/sqrt(D) with "BTHD" and
        queries already scaled with "BHTD").
      k, v: `[B, Hk, S, D]` keys and values ("BHTD") or `[B, S, Hk, D]` ("BTHD"), one per key/value
        head (`H = Hk * group`).
      selection: the `Selection` (its `group` heads share one choice: the first head's is used).
      kv_mask: `[B, S]` bool key mask, or None.
      layout: "BTHD" reads q, k, v in place (the layout `attend` receives), so the backward pass keeps
        the caller's arrays rather than head-major copies, and returns dq, dk, dv in it too (one
        query head a tile, on a GPU; otherwise the arrays are transposed once here).

    Returns:
      out `[B, H, T, D]` in q's dtype (zero rows where nothing is allowed) and its float32
      log-sum-exp `[B, H, T]` (LOG0 there), head-major in both layouts: the same as the `scan` and
      `masked` kernels, which return a float32 output.
    """
    if layout not in ("BHTD", "BTHD"):
        raise ValueError(f"fused_block_attention: layout {layout!r}; allowed: 'BHTD', 'BTHD'")
    bthd = layout == "BTHD"
    H, D = (q.shape[2], q.shape[3]) if bthd else (q.shape[1], q.shape[3])
    Hk, G = (k.shape[2] if bthd else k.shape[1]), selection.group
    if H != Hk * G:
        raise ValueError(f"model.attention: {H} query heads for {Hk} key/value heads and group {G}")
    reason = unsupported_reason(selection.block_size, D, q.dtype, compiled_gpu=_compiled_gpu())
    if reason:
        raise ValueError(f"model.attention.selection.kernel: 'pallas' cannot run: {reason}")
    plan = make_plan(causal, selection, num_heads=H, head_dim=D, has_mask=kv_mask is not None, dtype=q.dtype)
    if plan.tpu and q.dtype == jnp.float16:
        raise ValueError("model.attention.selection.kernel: 'pallas' on a TPU takes float32 or bfloat16, not float16")
    if bthd and (plan.tpu or plan.heads_per_tile > 1):
        # Mosaic TPU tiles and a tile of several heads need the head-major layout: transpose here
        q = jnp.swapaxes(q * jnp.asarray(scale, q.dtype) if scale != 1.0 else q, 1, 2)
        k, v, bthd, scale = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), False, 1.0
    elif not bthd and scale != 1.0:
        q = q * jnp.asarray(scale, q.dtype)
        scale = 1.0
    plan = dataclasses.replace(plan, bthd=bthd, scale=float(scale))
    b = plan.block
    first = lambda x: None if x is None else x[:, ::G]  # noqa: E731 (one head per group)
    idx, valid, row_start = first(selection.idx), first(selection.valid), first(selection.row_start)
    meta = forward_lists(plan, idx, valid, row_start, selection.qids)
    if kv_mask is None:
        kmask = None
    elif plan.tpu:
        from sparseformer.attention.pallas_tpu import key_mask

        kmask = key_mask(kv_mask, b)
    else:
        kmask = kv_mask.astype(jnp.int32)
    out, lse = _fused(plan, q, k, v, meta, idx, valid, row_start, selection.qids, kmask)
    return out, lse
