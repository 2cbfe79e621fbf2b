"""Argument validation shared by the caches, attention references and kernel wrappers.

Checks run on the host with concrete values. Values that are tracers (inside ``jit``/``vmap``) are skipped
here; the traced code paths record error bits instead (see ``jkv.caches.base``).
"""

from __future__ import annotations

import os
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


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def host_all(ok, message: Callable[[], str]) -> None:
    """Raise ``ValueError(message())`` if ``ok`` is concrete and not all true."""
    value = concrete_value(ok)
    if value is not None and not bool(np.all(value)):
        raise ValueError(message())


def int32_value(name: str, value):
    """``value`` (an int or integer array) as int32, refusing on the host what int32 cannot hold (never wrapped)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{name} must be an int or an integer array, got {value!r}")
    host = concrete_value(value) if not isinstance(value, int) else np.asarray(value, dtype=object)
    if host is not None:
        if host.dtype != object and not np.issubdtype(host.dtype, np.integer):
            raise TypeError(f"{name} must be an int or an integer array, got dtype {host.dtype}")
        if host.dtype == object and not all(isinstance(x, int | np.integer) for x in np.ravel(host)):
            raise TypeError(f"{name} must be an int or an integer array, got {value!r}")
        flat = [int(x) for x in np.ravel(host)]
        bad = [x for x in flat if not INT32_MIN <= x <= INT32_MAX]
        if bad:
            raise ValueError(f"{name}={bad[0]} does not fit int32 (expected a value in [{INT32_MIN}, {INT32_MAX}])")
        return jnp.asarray(np.asarray(flat, np.int32).reshape(np.shape(host)))
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must be an int or an integer array, got dtype {arr.dtype}")
    return arr.astype(jnp.int32)


def per_sequence_ints(name: str, value, batch: int):
    """An int or ``int[B]`` as an int32 array broadcast to ``[B]`` (host values checked to fit int32)."""
    arr = int32_value(name, value)
    if arr.ndim == 0:
        return jnp.broadcast_to(arr, (batch,))
    if arr.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or shape ({batch},), got shape {arr.shape}")
    return arr


def index_in_range(name: str, value, size: int):
    """An integer index as int32 and whether it lies in ``[0, size)`` (a bool array; raises on the host)."""
    if isinstance(value, (float, bool)) or (hasattr(value, "dtype") and not jnp.issubdtype(value.dtype, jnp.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if getattr(value, "ndim", 0) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
    host = concrete_value(value)
    if host is not None and not 0 <= int(host) < size:
        raise ValueError(f"{name}={int(host)} out of range: expected an index in [0, {size})")
    if isinstance(value, (int, np.integer)):  # a static index stays static (XLA updates in place more often)
        return int(value), True
    index = int32_value(name, value)
    return index, (index >= 0) & (index < size)


def allocation(shapes: list[tuple[tuple[int, ...], object]], what: str) -> int:
    """Bytes of arrays of ``(shape, dtype)``; ``ValueError`` before anything is allocated when their element
    count overflows or they exceed the memory of the local devices."""
    total = 0
    for shape, dtype in shapes:
        size = 1
        for n in shape:
            size *= int(n)
        if size >= 2**62:
            raise ValueError(f"{what}: an array of shape {shape} has {size} elements, more than any device holds")
        total += size * jnp.dtype(dtype).itemsize
    free = sum(_device_bytes(d) for d in jax.local_devices())
    if total > free:
        raise ValueError(f"{what} needs {total:,} bytes, more than the {free:,} bytes of the local devices")
    return total


def _device_bytes(device) -> int:
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def new_kv(name: str, x, batch: int, spec, *, flat: bool = False) -> None:
    """New keys/values of one layer of a cache with ``spec``: padded ``[B, K, T, D]``, or ``[T, K, D]`` when
    ``flat`` (``jkv.caches.tokens``)."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != (3 if flat else 4):
        raise ValueError(f"{name} must have shape [B, K, T, D] (or a flat step's [T, K, D]), got {shape}")
    if flat:
        t, k, d = shape
        ok = (k, d) == (spec.num_kv_heads, spec.head_dim) and t >= 1
        expected = f"a flat step's [T>=1, K={spec.num_kv_heads}, D={spec.head_dim}]"
    else:
        b, k, t, d = shape
        ok = (b, k, d) == (batch, spec.num_kv_heads, spec.head_dim) and t >= 1
        expected = f"[B={batch}, K={spec.num_kv_heads}, T>=1, D={spec.head_dim}]"
    if not ok:
        raise ValueError(f"{name}.shape={tuple(shape)} does not match {expected}")
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


def length_within(what: str, length, bound, bound_text: Callable[[], str]):
    """``length`` as an int32 scalar and whether it lies in ``[0, bound]``; a host value outside raises, naming
    ``what`` and ``bound_text()`` (under ``jit`` the caller flags it)."""
    length = int32_value("length", length)
    if length.ndim:
        raise TypeError(f"length must be an integer scalar, got shape {length.shape}")
    fits = (length >= 0) & (length <= bound)
    host_all(fits, lambda: f"{what} length={int(length)} must lie in [0, {bound_text()}]")
    return length, fits


def page_ids(what: str, pages, num_pages: int):
    """Page ids as ``PagedKVCache.pin`` returns them: an integer vector of pool pages, -1 for none (host values
    outside the pool raise, naming ``what``: they would be dropped or read as another page)."""
    pages = jnp.asarray(pages)
    if not jnp.issubdtype(pages.dtype, jnp.integer) or pages.ndim != 1:
        raise TypeError(f"pages must be an integer vector, got {pages!r}")
    known = (pages >= -1) & (pages < num_pages)
    host_all(
        known, lambda: f"{what} {np.asarray(pages)[~np.asarray(known)].tolist()} outside the pool [0, {num_pages})"
    )
    return pages


def clamped(index, ok):
    """``index`` where ``ok``, else 0 (static indices stay static); callers drop or mask what it reads."""
    return index if ok is True else jnp.where(ok, index, 0)


def window_softcap(window, softcap, scale=None) -> None:
    """An attention window (positions a query sees, itself included), a logit soft cap and a score scale, each
    optional (static numbers; NumPy's count)."""
    if window is not None and (not isinstance(window, int | np.integer) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window={window!r} must be a positive int (or None: no window)")
    if softcap is not None and not _positive_number(softcap):
        raise ValueError(f"softcap={softcap!r} must be a positive finite number (or None: no cap)")
    if scale is not None and not _positive_number(scale):
        raise ValueError(f"scale={scale!r} must be a positive finite number (or None: 1/sqrt(D))")


def is_number(x) -> bool:
    """An int or a float, NumPy's included (``np.float32`` is not a ``float``); never a bool."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _positive_number(x) -> bool:
    return is_number(x) and bool(np.isfinite(x)) and x > 0
