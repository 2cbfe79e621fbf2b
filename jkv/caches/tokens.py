"""Where a step's tokens go: the padded ``[B, K, T, D]`` form and the flat ``[T, K, D]`` form, as one list of
``(slot, position)`` per token.

A flat step orders its tokens by sequence: after ``cache.begin(counts)``, sequence ``b``'s ``counts[b]`` tokens
are rows ``starts[b] .. starts[b] + counts[b] - 1`` with ``starts`` the exclusive cumulative sum of ``counts``;
rows from ``sum(counts)`` on are padding. Token ``i`` of sequence ``b`` sits at position ``lengths[b] + i``. The
mixed serving step uses the flat form: decode tokens and prompt chunks of many sequences without per-sequence
padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


def flat_starts(counts: Int[Array, " B"]) -> Int[Array, " B"]:
    """Row of each sequence's first token in a flat step: the exclusive cumulative sum of ``counts``."""
    counts = jnp.asarray(counts, jnp.int32)
    return jnp.cumsum(counts) - counts


# Jitted: a write called eagerly compiles each layout once, not each of its primitives.
@functools.partial(jax.jit, static_argnames="t")
def flat_layout(
    lengths: Int[Array, " B"], counts: Int[Array, " B"], t: int
) -> tuple[Int[Array, " T"], Int[Array, " T"], Bool[Array, " T"]]:
    """``(slot, position, live)`` of each of a flat step's ``t`` rows. Padding rows (``live`` false) have
    ``slot = 0`` and ``position = -1``."""
    counts = jnp.asarray(counts, jnp.int32)
    ends = jnp.cumsum(counts)
    rows = jnp.arange(t, dtype=jnp.int32)
    live = rows < ends[-1]
    # A row's sequence is the number of sequences that end at or before it (zero-count sequences end where they
    # start, so they own no row).
    slot = jnp.sum(ends[None, :] <= rows[:, None], axis=1, dtype=jnp.int32)
    slot = jnp.where(live, slot, 0)
    position = jnp.asarray(lengths, jnp.int32)[slot] + rows - (ends - counts)[slot]
    return slot, jnp.where(live, position, -1), live


@functools.partial(jax.jit, static_argnames="t")
def padded_layout(lengths: Int[Array, " B"], counts: Int[Array, " B"], t: int):
    """``(slot, position, live)`` of the ``B * t`` tokens of a padded step, row-major (sequence, then token)."""
    b = lengths.shape[0]
    tt = jnp.arange(t, dtype=jnp.int32)[None, :]
    live = tt < counts[:, None]
    slot = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    position = jnp.where(live, lengths[:, None] + tt, -1)
    return slot.reshape(-1), position.reshape(-1), live.reshape(-1)


def token_major(x: Array) -> Array:
    """New keys or values as ``[tokens, K, D]``: a flat ``[T, K, D]`` as is, a padded ``[B, K, T, D]`` row-major."""
    if x.ndim == 3:
        return x
    b, k, t, d = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(b * t, k, d)


@functools.partial(jax.jit, static_argnames="batch")
def any_per_slot(flag: Bool[Array, " N"], slot: Int[Array, " N"], batch: int) -> Bool[Array, " B"]:
    """Whether any of each sequence's tokens has ``flag``."""
    return jnp.zeros((batch,), bool).at[slot].max(flag)
