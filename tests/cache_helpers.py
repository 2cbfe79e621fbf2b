"""Helpers shared by the cache and attention tests: each format's stated error bound, in float64 NumPy, and the
cache operations jitted once (one compilation per cache type and shape, as a decode loop runs them)."""

import jax
import numpy as np

import jkv

BLOCK = 32

_write = jax.jit(lambda c, layer, k, v: c.write(layer, k, v))
_begin = jax.jit(lambda c, n: c.begin(n))
_commit = jax.jit(lambda c: c.commit())
_rollback = jax.jit(lambda c, n: c.rollback(n))
_reset_slot = jax.jit(lambda c, i: c.reset_slot(i))
_fork = jax.jit(lambda c, src, dst: c.fork(src, dst))
_insert = jax.jit(lambda c, i, single: c.insert_into_slot(i, single))


def hadamard_f64(x):
    """``x`` times the orthonormal block-diagonal Walsh-Hadamard matrix along the last axis (float64)."""
    d = x.shape[-1]
    n = d & -d
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (x.reshape(*x.shape[:-1], d // n, n) @ (h / np.sqrt(n))).reshape(x.shape)


def bound(kind, x):
    """Largest allowed |stored - x| per value of vectors ``x [..., D]`` for the kind's format (float64)."""
    x = np.asarray(x, np.float64)
    fmt = jkv.caches.kind(kind).format
    if isinstance(fmt, jkv.Q8):
        y = hadamard_f64(x) if fmt.rotated else x
        # Half a step of each block; a float16 scale is rounded up by at most one float16 ulp.
        half = (
            np.abs(y.reshape(*y.shape[:-1], y.shape[-1] // BLOCK, BLOCK)).max(-1, initial=0) / 127 * (0.5 + 2**-10)
            + 1e-7
        )  # [..., D/32]
        if not fmt.rotated:
            return np.repeat(half, BLOCK, axis=-1)
        # Rotated: the error vector is the rotated one turned back, of the same length; each value is within it.
        return np.broadcast_to(np.sqrt(np.sum(BLOCK * half**2, -1, keepdims=True)), x.shape)
    if isinstance(fmt, jkv.FP8):  # 3 mantissa bits: |x| / 16, and e4m3's subnormal step of the scale
        scale = np.abs(x).max(-1, keepdims=True) / 448
        return np.abs(x) / 16 + scale / 2**10 + 1e-7
    if kind == "bf16":
        return np.abs(x) * 2**-8
    return np.zeros_like(x)
