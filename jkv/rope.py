"""Rotary position embeddings.

Two pairings of the head dimension are in use:

* ``NEOX`` (split halves): dimension ``i`` rotates with ``i + D/2``. HF transformers' ``rotate_half`` /
  ``apply_rotary_pos_emb``, GPT-NeoX, Qwen2, and Llama checkpoints in HF layout.
* ``NORM`` (adjacent pairs): dimension ``2i`` rotates with ``2i + 1``. The original Llama / GPT-J interleaved
  convention, and llama.cpp's ``llama`` GGUF layout (whose Q/K rows are permuted to match it).

Both rotate pair ``i`` by ``position * inv_freq[i]`` with ``inv_freq[i] = theta ** (-2i / D)``.
"""

from __future__ import annotations

import enum
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


class RopeStyle(str, enum.Enum):
    NEOX = "neox"
    NORM = "norm"


def inv_frequencies(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """``inv_freq[i] = theta ** (-2i / D)`` for ``i < D/2`` (float64 on the host; cast where used)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim=}")
    if theta <= 0:
        raise ValueError(f"rope theta must be positive, got {theta=}")
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_inv_frequencies(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position: int,
) -> np.ndarray:
    """Llama 3.1's frequency scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth ramp
    between (the ``rope_scaling: {"rope_type": "llama3"}`` of HF configs)."""
    inv = inv_frequencies(head_dim, theta)
    wavelen = 2 * math.pi / inv
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def apply_rope(
    x: Float[Array, "B T H D"],
    positions: Int[Array, "B T"],
    inv_freq,
    style: RopeStyle | str = RopeStyle.NEOX,
) -> Float[Array, "B T H D"]:
    """Rotate ``x`` (queries or keys, any number of heads ``H``) by each token's own position.

    Computed in float32 (float64 inputs stay float64) and returned in ``x.dtype``.
    """
    style = RopeStyle(style)
    d = x.shape[-1]
    inv_freq = jnp.asarray(inv_freq)
    if inv_freq.shape != (d // 2,) or d % 2:
        raise ValueError(f"inv_freq.shape={inv_freq.shape} must be ({d // 2},) for head_dim={d} (even)")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions.shape={positions.shape} must equal x.shape[:2]={x.shape[:2]}")
    compute = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    angle = positions.astype(compute)[..., None, None] * inv_freq.astype(compute)  # (B, T, 1, D/2)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(compute)
    if style is RopeStyle.NEOX:
        x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    return out.astype(x.dtype)
