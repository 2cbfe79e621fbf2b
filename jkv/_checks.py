"""Argument validation shared by the caches, attention references and kernel wrappers.

Checks run on the host with concrete values. Values that are tracers (inside ``jit``/``vmap``) are skipped
here; the traced code paths record error flags instead (see ``jkv.cache``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def concrete_value(x):
    """NumPy value of ``x`` if it is known on the host, else ``None``."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # e.g. an array committed to a device that cannot be read back
        return None


def positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def host_all(ok, message: Callable[[], str]) -> None:
    """Raise ``ValueError(message())`` if ``ok`` is concrete and not all true."""
    value = concrete_value(ok)
    if value is not None and not bool(np.all(value)):
        raise ValueError(message())


def layer_index(layer, num_layers: int) -> None:
    if isinstance(layer, (float, bool)) or (hasattr(layer, "dtype") and not jnp.issubdtype(layer.dtype, jnp.integer)):
        raise TypeError(f"layer must be an integer, got {layer!r}")
    value = concrete_value(layer)
    if value is not None and not 0 <= int(value) < num_layers:
        raise ValueError(f"layer={int(value)} out of range for {num_layers=}")


def slot_index(slot, batch: int) -> None:
    if isinstance(slot, (float, bool)) or (hasattr(slot, "dtype") and not jnp.issubdtype(slot.dtype, jnp.integer)):
        raise TypeError(f"slot must be an integer, got {slot!r}")
    value = concrete_value(slot)
    if value is not None and not 0 <= int(value) < batch:
        raise ValueError(f"slot={int(value)} out of range for {batch=}")


def per_sequence_ints(name: str, value, batch: int):
    """An int or ``int[B]`` as an int32 array broadcast to ``[B]``."""
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must be an int or an integer array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        return jnp.broadcast_to(arr.astype(jnp.int32), (batch,))
    if arr.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or shape ({batch},), got shape {arr.shape}")
    return arr.astype(jnp.int32)


def new_kv(name: str, x, batch: int, spec) -> None:
    """New keys/values ``[B, K, T, D]`` for one layer of a cache with ``spec``."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{name} must have shape [B, K, T, D], got {shape}")
    b, k, t, d = shape
    if (b, k, d) != (batch, spec.num_kv_heads, spec.head_dim) or t < 1:
        raise ValueError(
            f"{name}.shape={tuple(shape)} does not match [B={batch}, K={spec.num_kv_heads}, T>=1, D={spec.head_dim}]"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")


def same_layout(name: str, got, want) -> None:
    """Two cache specs agree on everything but ``max_len``."""
    for field in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
        g, w = getattr(got, field), getattr(want, field)
        if g != w:
            raise ValueError(f"{name} has {field}={g}, expected {w}")


def gqa_heads(num_q_heads: int, num_kv_heads: int) -> int:
    """Queries per kv head; raises if the query heads do not split evenly over the kv heads."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} must be a positive multiple of {num_kv_heads=}")
    return num_q_heads // num_kv_heads


def decode_args(q, k, v, lengths) -> tuple[int, int, int, int, int]:
    """Validate ``q [B, N, D]``, ``k``/``v [B, K, S, D]``, ``lengths int[B]``; return ``(B, N, K, S, D)``."""
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must have shape [B, N, D], got {getattr(q, 'shape', None)}")
    if getattr(k, "ndim", None) != 4 or getattr(v, "shape", None) != k.shape:
        raise ValueError(
            f"k and v must both have shape [B, K, S, D], got {getattr(k, 'shape', None)} and "
            f"{getattr(v, 'shape', None)}"
        )
    b, n, d = q.shape
    bk, kh, s, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"q.shape={q.shape} does not match k.shape={k.shape} (batch and head_dim must agree)")
    gqa_heads(n, kh)
    if getattr(lengths, "shape", None) != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be int[{b}], got {getattr(lengths, 'shape', None)}")
    value = concrete_value(lengths)
    if value is not None and (value.min(initial=0) < 0 or value.max(initial=0) > s):
        raise ValueError(f"lengths={value} must lie in [0, S={s}]")
    return b, n, kh, s, d
