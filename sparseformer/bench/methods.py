"""What the benchmark can run, looked up by name: the dense baseline and every attention preset.

`dense` is `jax.nn.dot_product_attention` (its cuDNN implementation on a GPU), not the project's
own dense reference: the baseline is what a user would otherwise call. `dense_pallas` is JAX's own
Pallas (Triton) flash attention, a dense kernel written the way the fused sparse kernel is (GPU
only). Every other name is an attention preset (`sparseformer.attention.presets`), run through
`attend`; `PRESET/exact` is the preset's selection alone (estimate and exact kernel: compression
and correction off), which times the exact part.

FLOPs are those the method performs, counted from its shapes and budget: `4 * D` per computed
query-key pair (`QK^T` and `PV`). Dense on XLA computes the full `T x S` square even when causal
(the mask is applied to the full score matrix), so it is counted in full. The backward pass is
counted as `BACKWARD_FLOP_FACTOR` (2) times the forward, so forward+backward is 3x the forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

BACKWARD_FLOP_FACTOR = 2
PASSES: dict[str, int] = {"fwd": 1, "fwd_bwd": 1 + BACKWARD_FLOP_FACTOR}
"""Pass name -> multiple of the forward FLOPs it performs."""

AttnFn = Callable[[jax.Array, jax.Array, jax.Array, Any, jax.Array], jax.Array]


class SkipCase(Exception):
    """A method cannot run this case (e.g. linformer with a causal mask); the reason is recorded."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark case's shape: `[batch, length, heads, head_dim]`, dtype and masking."""

    batch: int
    length: int
    heads: int
    head_dim: int
    causal: bool = False
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Method:
    """A runnable method: `fn(q, k, v, params, rng) -> out` (jittable), its params and forward FLOPs."""

    name: str
    fn: AttnFn
    params: Any
    flops: dict[str, int]  # forward: "exact" (exactly computed pairs) and "total"
    implementation: str
    kernel: str = "none"  # the exact part's kernel (`selection.kernel` resolved), or the dense implementation


def dense_flops(shape: Shape) -> dict[str, int]:
    """Forward FLOPs of full attention: `4 * B * H * T * S * D` (the full square, even when causal)."""
    total = 4 * shape.batch * shape.heads * shape.length * shape.length * shape.head_dim
    return {"exact": total, "estimator": 0, "compression": 0, "total": total}


def _dense_implementation(dense_impl: str, shape: Shape) -> str | None:
    """`None` lets JAX pick (XLA on CPU); `auto` picks cuDNN on a GPU for 16-bit inputs."""
    if dense_impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and shape.dtype in ("bfloat16", "float16") else None
    return None if dense_impl == "xla" else dense_impl


def build_dense(name: str, shape: Shape, *, dense_impl: str = "auto") -> Method:
    """`jax.nn.dot_product_attention(q, k, v, is_causal=causal)`, the baseline."""
    impl = _dense_implementation(dense_impl, shape)

    def fn(q: jax.Array, k: jax.Array, v: jax.Array, params: Any, rng: jax.Array) -> jax.Array:
        del params, rng
        return jax.nn.dot_product_attention(q, k, v, is_causal=shape.causal, implementation=impl)

    return Method(name, fn, {}, dense_flops(shape), impl or "xla", impl or "xla")


def build_dense_pallas(name: str, shape: Shape, *, dense_impl: str = "auto") -> Method:
    """JAX's Pallas (Triton) flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`): the
    dense baseline written the way the fused sparse kernel is. GPU only: on a CPU it could only run
    interpreted, which would time the interpreter (it compiles for a GPU under
    `pallas_kernel.compile_for_gpu()`, as `benchmarks/gpu_aot.py` does without one)."""
    del dense_impl
    from sparseformer.attention.pallas_kernel import kernel_target

    if kernel_target() != ("triton", False):
        raise SkipCase("a GPU kernel (Pallas/Triton); on this backend it would run interpreted")
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    except ImportError as e:  # moved out of jax (to tokamax) in some release
        raise SkipCase(f"jax.experimental.pallas.ops.gpu.attention is not available: {e}") from e
    scale = shape.head_dim**-0.5

    def fn(q: jax.Array, k: jax.Array, v: jax.Array, params: Any, rng: jax.Array) -> jax.Array:
        del params, rng
        return pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=shape.causal)

    flops = dense_flops(shape)
    if shape.causal:  # this kernel skips the blocks above the diagonal
        flops = {key: val // 2 for key, val in flops.items()}
    return Method(name, fn, {}, flops, "pallas-triton", "pallas-triton")


def _exact_only(config: Any) -> Any:
    """The preset's selection alone: compression, correction and the fidelity rows off."""
    config.compression.enabled = False
    config.correction.update(enabled=False, gate=False, aux_weight=0.0, aux_rows=0)
    return config


def _kernel(kernel: str) -> Callable[[Any], Any]:
    def force(config: Any) -> Any:
        """The preset with its exact part on one kernel (the others give the same result)."""
        config.selection.kernel = kernel
        return config

    return force


VARIANTS: dict[str, Callable[[Any], Any]] = {
    "exact": _exact_only, **{kernel: _kernel(kernel) for kernel in ("scan", "masked", "pallas")},
}
"""`PRESET/VARIANT` -> how the variant changes the preset's config: `exact` the selection alone;
`scan`, `masked`, `pallas` the exact part on that kernel (`auto` otherwise), e.g. to time the fused
kernel against the one it replaces in one run."""


def _split(name: str) -> tuple[str, str, str]:
    """`PRESET[/VARIANT][;section.field=value...]` -> (preset, variant, overrides)."""
    head, _, overrides = name.partition(";")
    base, _, variant = head.partition("/")
    return base, variant, overrides


def preset_config(name: str) -> Any:
    """The attention config a method name stands for: `PRESET`, `PRESET/VARIANT` (`VARIANTS`), each
    optionally with `;section.field=value` overrides (`presets.from_spec`), e.g.
    `rsa;selection.block_size=32;selection.top_k=15`. Raises ValueError for a bad name or override,
    SkipCase when a variant does not apply."""
    from sparseformer import attention  # imported lazily: dense runs without the attention package

    base, variant, overrides = _split(name)
    config = attention.presets.from_spec(f"{base};{overrides}")
    if variant:
        if variant not in VARIANTS:
            raise ValueError(f"{name}: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        if not config.selection.enabled:
            raise SkipCase(f"{base} selects nothing, so it has no exact part to time alone")
        config = VARIANTS[variant](config)
    return config


def build_preset(name: str, shape: Shape, *, dense_impl: str = "auto") -> Method:
    """An attention preset (see `preset_config` for the names) through `sparseformer.attention.attend`;
    raises SkipCase when it cannot run."""
    del dense_impl
    from sparseformer import attention  # imported lazily: dense runs without the attention package
    from sparseformer.attention.config import selection_kernel

    config = preset_config(name)
    try:
        attention.validate(config, causal=shape.causal, seq_len=shape.length)
    except ValueError as e:
        raise SkipCase(str(e)) from e
    params = attention.init_params(
        config, jax.random.key(0), num_heads=shape.heads, head_dim=shape.head_dim, max_len=shape.length
    )
    counted = attention.flops(
        config,
        batch=shape.batch,
        q_len=shape.length,
        kv_len=shape.length,
        heads=shape.heads,
        head_dim=shape.head_dim,
        causal=shape.causal,
    )

    def fn(q: jax.Array, k: jax.Array, v: jax.Array, params: Any, rng: jax.Array) -> jax.Array:
        out, _aux = attention.attend(q, k, v, config, params=params, causal=shape.causal, rng=rng)
        return out

    counts = {key: int(val) for key, val in counted.items() if isinstance(val, (int, float))}
    kernel = (selection_kernel(config, shape.length, head_dim=shape.head_dim, dtype=shape.dtype)
              if config.selection.enabled else "none")
    return Method(name, fn, params, counts, "sparseformer", kernel)


BASELINE_NAME = "dense"
BASELINES: dict[str, Callable[..., Method]] = {BASELINE_NAME: build_dense, "dense_pallas": build_dense_pallas}
"""Methods that are not attention presets, by name."""


def is_known(name: str, known: list[str]) -> bool:
    """A baseline, a preset, or `PRESET/VARIANT`, either of the latter with `;` overrides (whose
    values `preset_config` checks)."""
    if name in known:
        return True
    base, variant, _ = _split(name)
    return base in known and base not in BASELINES and (not variant or variant in VARIANTS)


def known_names() -> list[str]:
    """The baselines, then every attention preset (none if the attention package is missing)."""
    try:
        from sparseformer.attention import presets
    except ImportError:
        return list(BASELINES)
    return list(BASELINES) + [n for n in presets.names() if n not in BASELINES]


def build(name: str, shape: Shape, *, dense_impl: str = "auto") -> Method:
    """Look a method up by name and build it for `shape`."""
    return BASELINES.get(name, build_preset)(name, shape, dense_impl=dense_impl)


def pass_flops(method: Method, pass_name: str) -> tuple[int, int]:
    """(total, exact) FLOPs of one pass of `method`."""
    factor = PASSES[pass_name]
    return factor * method.flops["total"], factor * method.flops["exact"]


def make_pass(method: Method, pass_name: str) -> Callable[..., Any]:
    """The function one pass runs: `fwd(q, k, v, params, rng) -> out`, `fwd_bwd(q, k, v, params, rng, w) -> (dq, dk, dv)`.

    The backward pass differentiates `sum(out * w)` with a fixed random `w`, so every output element
    has its own cotangent (a plain sum would let XLA simplify the cotangent to a constant).
    """

    def fwd(q, k, v, params, rng):  # noqa: ANN001, ANN202 (traced arrays)
        return method.fn(q, k, v, params, rng)

    def fwd_bwd(q, k, v, params, rng, w):  # noqa: ANN001, ANN202
        def loss(q_, k_, v_):  # noqa: ANN001, ANN202
            return jnp.sum(method.fn(q_, k_, v_, params, rng).astype(jnp.float32) * w)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}[pass_name]
