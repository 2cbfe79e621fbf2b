"""Attention over jkv caches: ``attend`` and ``attend_write`` for ``q [B, T, N, D]``.

Query ``t`` of sequence ``b`` sits at position ``lengths[b] + t`` and attends causally to positions
``<= lengths[b] + t``; queries ``t >= counts[b]`` are padding and give zero (``counts`` is the step's, from
``cache.begin``). A flat ``q [T, N, D]`` holds the step's tokens ordered by sequence (``jkv.caches.tokens``):
the mixed serving step's form, with no padding per sequence. A layer out of range under ``jit`` gives NaN (and
``attend_write`` records ``ERR_BAD_LAYER``).

``impl``: ``"xla"`` (the pure-``jnp`` reference, any backend), ``"pallas"`` (the Pallas kernels: compiled on GPU,
interpret mode elsewhere) or ``None`` (``default_impl()``: Pallas on GPU, XLA elsewhere). On the Pallas path a
padded ``T = 1`` step runs the decode kernel registered for the cache's kind (``jkv.attention.kernels.DECODE``),
windows and soft caps included (a ring's pages through its block table, from the window's first page on); flat
steps and ``T > 1`` run the multi-token kernel (``MULTI_TOKEN``: flash attention over the cache's storage, pages
through the block table, no ``T x S`` scores); kinds without a kernel, and steps under an active device mesh at
``T > 1``, run the reference over ``cache.layer(...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jkv.attention import kernels
from jkv.attention.reference import attend_reference
from jkv.caches import checks, tokens
from jkv.parallel import active_mesh, per_shard
from pallas_kernels import multi_token_config

IMPLS = ("xla", "pallas")


def default_impl() -> str:
    """``"pallas"`` when the default backend is a GPU, else ``"xla"``."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def resolve_impl(impl: str | None) -> str:
    if impl is None:
        return default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    return impl


def _check_q(q, cache) -> None:
    if not hasattr(cache, "layout") or not hasattr(cache, "format"):
        raise TypeError(f"cache must be a jkv cache, got {type(cache).__name__}")
    shape = getattr(q, "shape", None)
    if shape is None or len(shape) not in (3, 4):
        raise ValueError(f"q must have shape [B, T, N, D] (or flat [T, N, D]), got {shape}")
    if shape[-1] != cache.spec.head_dim or (len(shape) == 4 and shape[0] != cache.batch):
        raise ValueError(
            f"q.shape={tuple(shape)} does not match the cache's batch={cache.batch}, D={cache.spec.head_dim}"
        )
    checks.gqa_heads(shape[-2], cache.spec.num_kv_heads)
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating array, got dtype {q.dtype}")


def _check_step(q, k) -> None:
    """Queries and keys of one step in the same form with the same tokens (static shapes: free under ``jit``)."""
    qs, ks = getattr(q, "shape", ()), getattr(k, "shape", ())
    if len(qs) not in (3, 4) or len(ks) not in (3, 4):
        return  # the cache's and attend's own checks name the bad shape
    if (len(qs) == 4) != (len(ks) == 4):
        raise ValueError(f"q.shape={tuple(qs)} and k.shape={tuple(ks)} mix a padded [B, ...] and a flat step")
    tq, tk = (qs[1], ks[2]) if len(qs) == 4 else (qs[0], ks[0])
    if tq != tk:
        raise ValueError(f"q has T={tq} tokens but k has T={tk}: a step's queries, keys and values share T")


def _check_window(window, cache) -> None:
    """A ring keeps only its window: attention over it must not look further back."""
    if cache.window is not None and (window is None or window > cache.window):
        raise ValueError(f"{window=} reads further back than the cache's ring keeps (window={cache.window})")


def _masking(window, cache) -> int | None:
    """``window``, or None where it masks nothing: a plain cache (no ring) holds at most ``max_len`` positions, all
    inside a window that long, so the kernels take their unwindowed path (on the GPU the faster kernels)."""
    if window is not None and cache.window is None and window >= cache.spec.max_len:
        return None
    return window


def _live(q, cache):
    """Which queries are real (not padding): ``[B, T]``, or ``[T]`` for a flat ``q``."""
    if q.ndim == 3:  # a flat step's live rows come first: sum(counts) of them
        return jnp.arange(q.shape[0]) < jnp.sum(cache.counts)
    return jnp.arange(q.shape[1])[None, :] < cache.counts[:, None]


def _finish(out, cache, layer_ok, *, padding_zero: bool = False):
    """Padding queries to zero (``padding_zero``: the kernel already gave them zero), everything to NaN for a layer
    out of range. A static layer adds no operation (a decode step is launch-bound at small batches)."""
    if not padding_zero:
        live = _live(out, cache)
        out = jnp.where(live[..., None, None], out, jnp.zeros((), out.dtype))
    return out if layer_ok is True else jnp.where(layer_ok, out, jnp.full((), jnp.nan, out.dtype))


def attend(
    q: Float[Array, "B T N D"] | Float[Array, "T N D"],
    cache,
    layer,
    *,
    impl: str | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Float[Array, "B T N D"] | Float[Array, "T N D"]:
    """Causal attention of the step's queries over ``layer`` of ``cache`` (module docstring). ``window``: a query
    sees only the last ``window`` positions (itself included); ``softcap`` ``c`` caps scores as ``c*tanh(s/c)``."""
    impl = resolve_impl(impl)
    _check_q(q, cache)
    checks.window_softcap(window, softcap, scale)
    layer, layer_ok = checks.index_in_range("layer", layer, cache.spec.num_layers)
    cache, layer = cache.for_layer(layer)  # a per-layer plan: the group holding the layer
    _check_window(window, cache)
    window = _masking(window, cache)
    decode = q.ndim == 4 and q.shape[1] == 1
    kernel = kernels.decode_kernel(cache) if impl == "pallas" and decode else None
    if kernel is None:
        multi = kernels.multi_token_kernel(cache) if impl == "pallas" and active_mesh() is None else None
        if multi is not None:
            at = checks.clamped(layer, layer_ok)
            out = _multi_token(multi, q, cache, at, scale=scale, window=window, softcap=softcap)
            return _finish(out, cache, layer_ok, padding_zero=True)
        out = attend_reference(q, cache, layer, scale=scale, window=window, softcap=softcap)
        return _finish(out, cache, layer_ok)
    fmt = cache.format
    qs = fmt.to_stored(q[:, 0])
    # The one query sits at lengths[b] and reads lengths[b] + 1 positions; a padding row reads none (output zero).
    n = jnp.where(cache.counts > 0, cache.lengths + 1, 0)
    at = checks.clamped(layer, layer_ok)
    options = dict(scale=scale, window=window, softcap=softcap)
    call = lambda q, *rest: kernel.fn(q, *rest[:-2], rest[-2], layer=rest[-1], **options)
    mesh = active_mesh()
    if mesh is not None:  # XLA cannot partition a Pallas call: run it on each shard's local batch and heads
        out = per_shard(call, mesh, kernel.arrays, kernel.specs, qs, n, at)
    else:
        out = call(qs, *kernel.arrays, n, at)
    return _finish(fmt.from_stored(out).astype(q.dtype)[:, None], cache, layer_ok, padding_zero=True)


def _multi_token(kernel, q, cache, layer, **options):
    """The multi-token kernel over the cache's whole storage at an in-range ``layer``: a flat ``q [T, N, D]`` as
    is (sequence ``b``'s queries from row ``flat_starts(counts)[b]``), a padded ``[B, T, N, D]`` as ``B * T`` rows
    (``b * T``)."""
    fmt, spec = cache.format, cache.spec
    if q.ndim == 3:
        flat, q_starts, max_count = q, tokens.flat_starts(cache.counts), None
    else:
        b, t, n, d = q.shape
        flat, q_starts, max_count = q.reshape(b * t, n, d), jnp.arange(b, dtype=jnp.int32) * t, t
    stored_dtype = cache.storage()[0].dtype  # the K values' storage: int8 / float8 for Q8 / FP8
    config = multi_token_config(
        q.shape[-2], spec.num_kv_heads, spec.head_dim, stored_dtype, max_len=spec.max_len, max_count=max_count
    )
    out = kernel(
        fmt.to_stored(flat), *cache.storage(), q_starts, cache.lengths, cache.counts,
        layer=layer, config=config, **options,
    )  # fmt: skip
    return fmt.from_stored(out).astype(q.dtype).reshape(q.shape)


def attend_write(
    q: Float[Array, "B T N D"] | Float[Array, "T N D"],
    k: Float[Array, "B K T D"] | Float[Array, "T K D"],
    v: Float[Array, "B K T D"] | Float[Array, "T K D"],
    cache,
    layer,
    *,
    impl: str | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
):
    """``cache.write(layer, k, v)`` then ``attend(q, cache, layer, ...)``; returns ``(out, cache)``. On the Pallas path
    a kind registered in ``kernels.FUSED_APPEND`` with ``T = 1`` (for a per-layer plan: a layer whose group is such
    a kind) does both in one kernel (the program attending over the new position writes it), saving the write's own
    kernels; same results and error bits."""
    impl = resolve_impl(impl)
    _check_step(q, k)
    checks.window_softcap(window, softcap, scale)
    fused = impl == "pallas" and getattr(k, "ndim", 0) == 4 and k.shape[2] == 1 and getattr(q, "ndim", 0) == 4
    # a per-layer plan: the group holding the layer (its full layers are plain contiguous caches)
    target, inner = cache.for_layer(layer) if fused else (cache, layer)
    if not (fused and kernels.fused_append(target)) or active_mesh() is not None:
        cache = cache.write(layer, k, v)
        return attend(q, cache, layer, impl=impl, scale=scale, window=window, softcap=softcap), cache
    _check_q(q, target)
    return _fused_append(q, (k, v), cache, layer, target, inner, scale=scale, window=window, softcap=softcap)


def attend_write_qkv(
    qkv: Float[Array, "B T K G2 D"],
    cache,
    layer,
    *,
    q_dtype,
    impl: str | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
):
    """:func:`attend_write` of a step's queries, keys and values held as one array, a fused q/k/v projection's
    layout: ``qkv[b, t, h, :G]`` are kv head ``h``'s ``G`` queries (query heads ``h*G ..``), ``qkv[b, t, h, G]`` its
    key and ``qkv[b, t, h, G + 1]`` its value (rotary embeddings applied); queries in ``q_dtype``, keys and values
    as given. Where the decode step writes inside its kernel and the cache stores ``q_dtype``, the kernel reads the
    rows in place (``pallas_kernels.decode.decode_attention_packed``: the array is one launch of XLA's, where the
    queries, keys and values sliced from it were three); otherwise the slices go to :func:`attend_write`. Same
    results either way."""
    if getattr(qkv, "ndim", 0) != 5 or qkv.shape[3] < 3:
        raise ValueError(f"qkv must have shape [B, T, K, G + 2, D] with G >= 1, got {getattr(qkv, 'shape', None)}")
    impl = resolve_impl(impl)
    b, t, kh, rows, d = qkv.shape
    group = rows - 2
    fused = impl == "pallas" and t == 1 and active_mesh() is None
    target, inner = cache.for_layer(layer) if fused else (cache, layer)
    if fused and kernels.fused_append(target) and jnp.dtype(q_dtype) == target.storage()[0].dtype:
        q = jax.ShapeDtypeStruct((b, t, kh * group, d), q_dtype)  # its slices' shapes, for the checks
        _check_q(q, target)
        packed = qkv[:, 0].astype(q_dtype)  # [B, K, G + 2, D]
        return _fused_append(q, packed, cache, layer, target, inner, scale=scale, window=window, softcap=softcap)
    q = qkv[:, :, :, :group].reshape(b, t, kh * group, d).astype(q_dtype)
    k, v = (jnp.swapaxes(qkv[:, :, :, group + i], 1, 2) for i in (0, 1))  # [B, K, T, D]
    return attend_write(q, k, v, cache, layer, impl=impl, scale=scale, window=window, softcap=softcap)


def _fused_append(q, new, cache, layer, target, inner, *, scale, window, softcap):
    """The decode step's write and attention in one kernel over ``target`` (the cache, or the group of a per-layer
    plan holding ``layer``, at ``inner``): ``new`` the step's ``(k, v)`` ``[B, K, 1, D]``, or the packed
    ``[B, K, G + 2, D]`` of :func:`attend_write_qkv` (then ``q`` only gives shapes)."""
    from pallas_kernels import decode as fused_kernel

    _check_window(window, target)
    window = _masking(window, target)
    if isinstance(new, tuple):
        k, v = new
    else:  # the packed rows' keys and values, for the write plan's checks and the format's range check
        group = new.shape[2] - 2
        k, v = (new[:, :, group + i][:, :, None] for i in (0, 1))
    at, slot, positions, errors = target.write_plan(inner, k, v)  # T = 1: token i is sequence i's
    _, range_errors = target.encode_new(k, v, slot, positions)
    _, layer_ok = checks.index_in_range("layer", inner, target.spec.num_layers)
    append = positions < target.max_len
    n = jnp.where(target.counts > 0, target.lengths + 1, 0)  # a padding row reads nothing: its output is zero
    kbuf, vbuf = target.storage()
    options = dict(append=append, layer=at, scale=scale, window=window, softcap=softcap)
    if isinstance(new, tuple):
        out, kbuf, vbuf = fused_kernel.decode_attention_append(
            q[:, 0], kbuf, vbuf, n, k[:, :, 0], v[:, :, 0], **options
        )
    else:
        out, kbuf, vbuf = fused_kernel.decode_attention_packed(new, kbuf, vbuf, n, **options)
    target = target.replace(data=(kbuf, vbuf), errors=target.errors | errors | range_errors)
    return _finish(out[:, None], target, layer_ok, padding_zero=True), cache.with_layer_cache(layer, target)
