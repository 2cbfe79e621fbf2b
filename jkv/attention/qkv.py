"""The fused q/k/v projection's grouped layout ``[..., K, G + 2, D]``: kv head ``k``'s ``G`` query heads, then its
key, then its value, so that one matrix multiply yields each kv head's queries beside its key and value (GQA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def fuse_qkv(wq, wk, wv, num_kv_heads: int):
    """Fuse q/k/v projections ``[..., N*D]``, ``[..., K*D]``, ``[..., K*D]`` (input features first, or biases)
    into the grouped layout ``[..., K, G + 2, D]`` (NumPy or JAX arrays)."""
    xp = jnp if isinstance(wq, jax.Array) else np
    lead, k = wq.shape[:-1], num_kv_heads
    d = wk.shape[-1] // k
    g = wq.shape[-1] // (k * d)
    parts = [wq.reshape(*lead, k, g, d), wk.reshape(*lead, k, 1, d), wv.reshape(*lead, k, 1, d)]
    return xp.concatenate(parts, axis=-2)


def unfuse_qkv(wqkv):
    """Inverse of ``fuse_qkv``: ``(wq [..., N*D], wk [..., K*D], wv [..., K*D])``."""
    *lead, k, g2, d = wqkv.shape
    g = g2 - 2
    return (
        wqkv[..., :g, :].reshape(*lead, k * g * d),
        wqkv[..., g, :].reshape(*lead, k * d),
        wqkv[..., g + 1, :].reshape(*lead, k * d),
    )
