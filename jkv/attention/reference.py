"""Pure-``jnp`` attention references: over arrays, and over a cache with ``jkv.attend``'s arguments.

Softmax runs in float32 (float64 stays float64); a query with no valid position gets a zero output.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from jkv.caches import checks, tokens


def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def attention_reference(
    q: Float[Array, "B T N D"],
    k: Float[Array, "B K S D"],
    v: Float[Array, "B K S D"],
    q_positions: Int[Array, "B T"],
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Float[Array, "B T N D"]:
    """Causal GQA attention: query ``(b, t)`` attends to cache positions ``0 .. q_positions[b, t]`` (none when
    negative: output zero), or with ``window`` to the last ``window`` of them. ``softcap`` ``c`` caps the scaled
    scores as ``c * tanh(s / c)``. Query head ``n`` reads kv head ``n // (N // K)``. Positions no query reads may
    hold NaN. Returned in ``q.dtype``."""
    checks.window_softcap(window, softcap, scale)
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, N, D], got {q.shape}")
    b, t, n, d = q.shape
    checks.decode_args(q[:, 0], k, v, jnp.zeros((b,), jnp.int32))
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions.shape={q_positions.shape} must be {(b, t)}")
    kh, s = k.shape[1], k.shape[2]
    g = n // kh
    scale = d**-0.5 if scale is None else scale
    ct = _compute_dtype(q.dtype)
    hi = lax.Precision.HIGHEST
    qg = q.astype(ct).reshape(b, t, kh, g, d)  # (B, T, K, G, D)
    mask = jnp.arange(s)[None, None, :] <= q_positions[:, :, None]  # (B, T, S)
    if window is not None:
        mask &= jnp.arange(s)[None, None, :] > q_positions[:, :, None] - window
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(ct), precision=hi) * scale  # NaN rows: masked below
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(mask[:, None, None], jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0)), 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # Positions no query reads may hold NaN: zero them so that 0 * NaN never reaches the sum.
    valid = jnp.any(mask, axis=1)  # (B, S)
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
    checks.decode_args(q, k, v, lengths)
    return attention_reference(q[:, None], k, v, lengths[:, None] - 1, scale=scale)[:, 0]


def step_positions(lengths: Int[Array, " B"], counts: Int[Array, " B"], t: int) -> Int[Array, "B T"]:
    """Position of each query of a step: ``lengths[b] + t``, and -1 (attends to nothing) for padding
    ``t >= counts[b]``."""
    tt = jnp.arange(t, dtype=jnp.int32)[None, :]
    return jnp.where(tt < counts[:, None], lengths[:, None] + tt, -1)


def attend_reference(
    q: Float[Array, "B T N D"],
    cache,
    layer,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Float[Array, "..."]:
    """``jkv.attend`` over ``cache.layer(...)`` in plain ``jnp``: query ``t`` of sequence ``b`` sits at
    ``lengths[b] + t`` and attends causally; padding queries (``t >= counts[b]``) give zero; a layer out of range
    gives NaN. A flat ``q [T, N, D]`` (``jkv.caches.tokens``) is spread to the padded form and back. Attends in the
    format's stored basis (the rotation of a rotated Q8 cache goes onto ``q`` and the output, never onto the
    layer)."""
    fmt = cache.format
    extra = {"window": window, "softcap": softcap}
    k, v = cache.layer(layer, jnp.float32, stored=True)
    if q.ndim == 3:
        t = q.shape[0]
        slot, _, live = tokens.flat_layout(cache.lengths, cache.counts, t)
        offset = jnp.where(live, jnp.arange(t) - tokens.flat_starts(cache.counts)[slot], t)  # t: dropped
        padded = jnp.zeros((cache.batch, t, *q.shape[1:]), q.dtype).at[slot, offset].set(q, mode="drop")
        positions = step_positions(cache.lengths, cache.counts, t)
        out = attention_reference(fmt.to_stored(padded), k, v, positions, scale=scale, **extra)
        out = jnp.where(live[:, None, None], out[slot, jnp.minimum(offset, t - 1)], 0)
    else:
        positions = step_positions(cache.lengths, cache.counts, q.shape[1])
        out = attention_reference(fmt.to_stored(q), k, v, positions, scale=scale, **extra)
    return fmt.from_stored(out).astype(q.dtype)
