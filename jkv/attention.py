"""Attention over jkv caches: pure-JAX references and the dispatch point for kernels.

``decode_attention(q, cache, layer)`` is called after ``cache.write(layer, ...)`` and before ``advance``: the
query of sequence ``b`` attends to positions ``[0, lengths[b] + 1)``, its own new key included.
``decode_attention_write(q, k_new, v_new, cache, layer)`` does both (write, then attend) and returns
``(out, cache)``; for a contiguous cache on the Pallas path it is one kernel that reads the cache once and
writes the new row itself.
``prefill_attention(q, cache, layer)`` does the same for ``T`` new tokens at once, causally: query ``t`` of
sequence ``b`` sits at position ``lengths[b] + t`` and attends to every position up to and including it.

``impl`` picks the implementation: ``"xla"`` (the pure-JAX reference, any backend) or ``"pallas"`` (the Pallas
kernels; compiled on GPU, interpret mode elsewhere). ``None`` means ``default_impl()``: Pallas on GPU, XLA
elsewhere. Softmax runs in float32; a sequence with no valid position gets a zero output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from jkv import _checks
from jkv.cache import ERR_WRITE_OVERFLOW, KVCache
from jkv.paged import PagedKVCache
from jkv.paged_q8 import Q8PagedKVCache
from jkv.parallel import active_mesh, per_shard
from jkv.quant import Q8KVCache, hadamard
from jkv.sharding import attention_specs

IMPLS = ("xla", "pallas")
# ``decode_attention_write`` fuses the write into the Pallas kernel (contiguous caches); False: write, then
# attend (two scatters and the kernel). A switch for scripts/bench_decode.py to compare the two.
FUSED_DECODE_WRITE = True


def default_impl() -> str:
    """``"pallas"`` when the default backend is a GPU, else ``"xla"``."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def resolve_impl(impl: str | None) -> str:
    if impl is None:
        return default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    return impl


def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def attention_reference(
    q: Float[Array, "B T N D"],
    k: Float[Array, "B K S D"],
    v: Float[Array, "B K S D"],
    q_positions: Int[Array, "B T"],
    *,
    scale: float | None = None,
) -> Float[Array, "B T N D"]:
    """Causal GQA attention: query ``(b, t)`` attends to cache positions ``0 .. q_positions[b, t]``.

    Query head ``n`` reads kv head ``n // (N // K)``. Positions past a query's own are masked (their values may
    be anything, NaN included). Computed in float32 (float64 stays float64), returned in ``q.dtype``.
    """
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, N, D], got {q.shape}")
    b, t, n, d = q.shape
    _checks.decode_args(q[:, 0], k, v, jnp.zeros((b,), jnp.int32))
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions.shape={q_positions.shape} must be {(b, t)}")
    kh, s = k.shape[1], k.shape[2]
    g = n // kh
    scale = d**-0.5 if scale is None else scale
    ct = _compute_dtype(q.dtype)
    hi = lax.Precision.HIGHEST
    qg = q.astype(ct).reshape(b, t, kh, g, d)  # (B, T, K, G, D)
    mask = jnp.arange(s)[None, None, :] <= q_positions[:, :, None]  # (B, T, S)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(ct), precision=hi) * scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(mask[:, None, None], jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0)), 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # Unused positions may hold NaN: zero them so that 0 * NaN never reaches the sum.
    valid = jnp.arange(s)[None, :] <= jnp.max(q_positions, axis=1)[:, None]  # (B, S)
    vz = jnp.where(valid[:, None, :, None], v.astype(ct), 0)
    out = jnp.einsum("bkgts,bksd->btkgd", p, vz, precision=hi)
    out = out / jnp.maximum(jnp.moveaxis(denom, 3, 1), jnp.finfo(ct).tiny)  # (B, T, K, G, D)
    return out.reshape(b, t, n, d).astype(q.dtype)


def decode_attention_reference(
    q: Float[Array, "B N D"],
    k: Float[Array, "B K S D"],
    v: Float[Array, "B K S D"],
    lengths: Int[Array, " B"],
    *,
    scale: float | None = None,
) -> Float[Array, "B N D"]:
    """One query per sequence over its first ``lengths[b]`` cache positions (GQA, ragged batch)."""
    _checks.decode_args(q, k, v, lengths)
    return attention_reference(q[:, None], k, v, lengths[:, None] - 1, scale=scale)[:, 0]


def decode_attention(
    q: Float[Array, "B N D"], cache: KVCache, layer, *, impl: str | None = None, scale: float | None = None
) -> Float[Array, "B N D"]:
    """Decode attention for ``layer`` of ``cache``: sequence ``b`` attends to ``lengths[b] + 1`` positions."""
    impl = resolve_impl(impl)
    if not isinstance(cache, (KVCache, Q8KVCache, PagedKVCache)):
        raise TypeError(f"cache must be a jkv cache, got {type(cache).__name__}")
    _checks.layer_index(layer, cache.spec.num_layers)
    if getattr(cache, "rotated", False):
        return _in_stored_basis(decode_attention, q, cache, layer, impl=impl, scale=scale)
    lengths = jnp.minimum(cache.lengths + 1, cache.max_len)
    if impl == "pallas":
        kernel, arrays = _pallas_kernel(cache)
        call = lambda q, *rest: kernel(q, *rest[:-2], rest[-2], layer=rest[-1], scale=scale)
        mesh = active_mesh()
        if mesh is not None:  # XLA cannot partition a Pallas call: run it on each shard's local batch and heads
            specs = attention_specs(cache)
            if isinstance(cache, Q8PagedKVCache):  # four pools (codes and scales of K and V), then the tables
                pool_spec, _, tables_spec = specs
                specs = (pool_spec,) * 4 + (tables_spec,)
            return per_shard(call, mesh, arrays, specs, q, lengths, layer)
        return call(q, *arrays, lengths, layer)
    if isinstance(cache, Q8PagedKVCache):  # the gathered pages, dequantized as the contiguous Q8 path does
        k, v = cache.gather_layer(layer, jnp.float32)
    elif isinstance(cache, PagedKVCache):
        k, v = cache.gather_layer(layer)
    elif isinstance(cache, Q8KVCache):
        k, v = cache.dequantize_layer(layer, jnp.float32)
    else:
        k, v = cache.k[layer], cache.v[layer]
    return decode_attention_reference(q, k, v, lengths, scale=scale)


def _in_stored_basis(attention, q, cache, layer, **kw):
    """Attention over a rotated Q8 cache, which holds hadamard(k) and hadamard(v) (``jkv.quant``): scores are
    kept by the rotation and the output comes out rotated, so attend with hadamard(q) over the values as stored
    and rotate the output back; no layer is ever rotated back, and the kernels never see the rotation."""
    out = attention(hadamard(q).astype(q.dtype), cache.replace(rotated=False), layer, **kw)
    return hadamard(out).astype(out.dtype)


def decode_attention_write(
    q: Float[Array, "B N D"],
    k_new: Float[Array, "B K 1 D"],
    v_new: Float[Array, "B K 1 D"],
    cache,
    layer,
    *,
    impl: str | None = None,
    scale: float | None = None,
    reserved: bool = False,
) -> tuple[Float[Array, "B N D"], object]:
    """``cache.write(layer, k_new, v_new)`` then ``decode_attention(q, cache, layer)``; returns ``(out, cache)``.

    One new position per sequence (``k_new``/``v_new`` ``[B, K, 1, D]``). On the Pallas path a contiguous
    ``KVCache`` takes both in one kernel (``pallas_kernels.decode.decode_attention_append``): the
    new row comes from ``k_new``/``v_new`` and is written by the program that attends over it, which saves the
    write's own kernels (two per layer and step). Same results, errors and overflow behaviour as the two calls.
    ``reserved`` goes to ``cache.write`` (the step protocol of ``jkv.cache``).
    """
    impl = resolve_impl(impl)
    fused = (
        FUSED_DECODE_WRITE
        and impl == "pallas"
        and type(cache) is KVCache
        and getattr(k_new, "ndim", None) == 4
        and k_new.shape[2] == 1
        and active_mesh() is None
    )
    if not fused:
        cache = cache.write(layer, k_new, v_new, reserved=reserved)
        return decode_attention(q, cache, layer, impl=impl, scale=scale), cache
    from pallas_kernels import decode as kernels

    ok = cache._check_write(layer, k_new, v_new)
    lengths = jnp.minimum(cache.lengths + 1, cache.max_len)
    out, k, v = kernels.decode_attention_append(
        q, cache.k, cache.v, lengths, k_new[:, :, 0], v_new[:, :, 0], append=ok, layer=layer, scale=scale
    )
    errors = cache.errors | jnp.where(ok, 0, ERR_WRITE_OVERFLOW).astype(cache.errors.dtype)
    return out, cache.replace(k=k, v=v, errors=errors)


def _pallas_kernel(cache):
    """The Pallas decode kernel for ``cache`` and the cache arrays it reads (whole caches: no per-layer copy)."""
    if isinstance(cache, Q8PagedKVCache):  # through the block table, dequantizing inside the loads
        from pallas_kernels import paged_q8

        pools = (cache.k_pages, cache.k_scale_pages, cache.v_pages, cache.v_scale_pages)
        return paged_q8.paged_q8_decode_attention, (*pools, cache.block_tables)
    if isinstance(cache, PagedKVCache):  # reads pages through the block table: no gathered copy of the sequences
        from pallas_kernels import paged

        return paged.paged_decode_attention, (cache.k_pages, cache.v_pages, cache.block_tables)
    if isinstance(cache, Q8KVCache):  # dequantizes inside the K/V loads: no dequantized copy of the layer
        from pallas_kernels import decode_q8

        return decode_q8.q8_decode_attention, (cache.k, cache.k_scale, cache.v, cache.v_scale)
    from pallas_kernels import dispatch  # Mosaic GPU where it is faster and can run, else Triton

    return dispatch.decode_attention_auto, (cache.k, cache.v)


def prefill_attention(
    q: Float[Array, "B T N D"], cache: KVCache, layer, *, impl: str | None = None, scale: float | None = None
) -> Float[Array, "B T N D"]:
    """Causal attention of ``T`` new tokens (already written at ``lengths[b] ..``) over prefix and themselves."""
    resolve_impl(impl)
    if not isinstance(cache, (KVCache, Q8KVCache, PagedKVCache)):
        raise TypeError(f"cache must be a jkv cache, got {type(cache).__name__}")
    _checks.layer_index(layer, cache.spec.num_layers)
    if getattr(cache, "rotated", False):
        return _in_stored_basis(prefill_attention, q, cache, layer, impl=impl, scale=scale)
    t = q.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if isinstance(cache, PagedKVCache):  # Q8 pages dequantize to float32 here, as the contiguous Q8 path does
        dtype = jnp.float32 if isinstance(cache, Q8PagedKVCache) else None
        return attention_reference(q, *cache.gather_layer(layer, dtype), positions, scale=scale)
    if isinstance(cache, Q8KVCache):
        k, v = cache.dequantize_layer(layer, jnp.float32)
        return attention_reference(q, k, v, positions, scale=scale)
    return attention_reference(q, cache.k[layer], cache.v[layer], positions, scale=scale)
