"""Memory planning: how many sequences (or how long a context) fit a byte budget, and what a cache takes
(``cache_bytes``; a per-layer plan with windowed rings: ``plan_bytes``).

``budget`` defaults to the device's free memory (``device.memory_stats()``: ``bytes_limit - bytes_in_use``);
on backends that report no statistics (the CPU), the host's available physical memory is used.
"""

from __future__ import annotations

import math
import os
import warnings

import jax

from jkv.caches import CacheSpec, checks

# Kept free for activations, compiled programs and allocator slack (the seeds reserve a fixed 3.5 GB on GPU).
DEFAULT_RESERVE_BYTES = 1 << 30
DEFAULT_RESERVE_FRACTION = 0.05
PER_SEQUENCE_BYTES = 12  # int32 lengths, counts and error bits


def bytes_per_token(spec: CacheSpec, format=None) -> int:
    """K + V bytes one position of one sequence takes across all layers (stored in ``format``; default the
    spec's dtype as it is)."""
    if format is None:
        return spec.bytes_per_token
    from jkv.caches.formats import bind

    return bind(format, spec).bytes_per_token(spec)


def bytes_per_layer_per_token(spec: CacheSpec) -> int:
    return spec.bytes_per_token // spec.num_layers


def cache_bytes(spec: CacheSpec, batch: int, per_token: int | None = None) -> int:
    """Bytes of a ``KVCache.init(spec, batch)`` (buffers plus the int32 lengths, counts and error bits).

    ``per_token`` overrides ``spec.bytes_per_token`` for other formats (``bytes_per_token(spec, format)``).
    """
    per_token = spec.bytes_per_token if per_token is None else per_token
    return batch * (per_token * spec.max_len + PER_SEQUENCE_BYTES)


def device_free_bytes(device: jax.Device | None = None) -> int:
    """Free memory on ``device`` (default: the first local device)."""
    device = device or jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def usable_bytes(budget: int | None = None, reserve: int | None = None) -> int:
    """``budget`` (default: device free memory) less a reserve (default: max(1 GiB, 5%) of the free memory)."""
    free = device_free_bytes() if budget is None else _bytes("budget", budget)
    if reserve is None:
        reserve = 0 if budget is not None else max(DEFAULT_RESERVE_BYTES, int(free * DEFAULT_RESERVE_FRACTION))
    return max(free - _bytes("reserve", reserve), 0)


def _bytes(name: str, value) -> int:
    """A byte count given as an int or a float (``8e9``), or ``ValueError`` naming it."""
    if not checks.is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number of bytes >= 0")
    return int(value)


def max_batch(
    spec: CacheSpec,
    budget: int | None = None,
    reserve: int | None = None,
    limit: int | None = None,
    per_token: int | None = None,
) -> int:
    """Largest batch of ``spec.max_len``-long sequences whose cache fits; 0 (with a warning) if none does.

    ``budget``: bytes available (default: the device's free memory, less ``reserve``). ``limit``: an upper cap.
    ``per_token``: bytes per position for formats other than ``spec.dtype`` (the Q8 cache).
    """
    usable = usable_bytes(budget, reserve)
    per_seq = cache_bytes(spec, 1, per_token)
    n = usable // per_seq
    if n < 1:
        warnings.warn(
            f"jkv: not even one sequence fits: one sequence of max_len={spec.max_len} needs "
            f"{per_seq:,} bytes of KV cache but only {usable:,} bytes are usable. "
            "Lower max_len, use a smaller cache dtype (bf16 or Q8), or free device memory.",
            stacklevel=2,
        )
        return 0
    return int(min(n, limit) if limit is not None else n)


def max_len_for(spec: CacheSpec, batch: int, budget: int | None = None, reserve: int | None = None) -> int:
    """Largest ``max_len`` at which ``batch`` sequences fit; 0 (with a warning) if not even one position does."""
    usable = usable_bytes(budget, reserve)
    n = (usable // batch - PER_SEQUENCE_BYTES) // spec.bytes_per_token if batch else 0
    if n < 1:
        warnings.warn(
            f"jkv: not even one position fits for {batch=}: one position takes {spec.bytes_per_token:,} bytes per "
            f"sequence but only {usable:,} bytes are usable.",
            stacklevel=2,
        )
        return 0
    return int(n)


def plan_bytes(
    spec: CacheSpec,
    batch: int,
    windows,
    *,
    slack: int,
    page_size: int = 16,
    format=None,
    layout: str = "contiguous",
    num_pages: int | None = None,
) -> int:
    """Device bytes of a per-layer plan (``PlannedCache.init(spec, batch, windows=..., slack=..., layout=...)``
    with its default ring pools): full layers hold ``max_len`` positions per sequence (a paged full group:
    ``num_pages``), each windowed layer its ring's pages (``Ring.pages_per_sequence``), plus block tables, page
    counts and the per-sequence ints of every group."""
    from jkv.caches.ring import Ring

    windows = tuple(windows)
    per_layer = bytes_per_token(spec, format) // spec.num_layers  # one position of one layer, K and V
    m = -(-spec.max_len // page_size)  # block-table width

    def paged(layers: int, pages: int) -> int:  # pools, tables, refcounts and pins, ints
        return layers * pages * page_size * per_layer + 4 * (batch * m + 2 * pages) + batch * PER_SEQUENCE_BYTES

    total = batch * PER_SEQUENCE_BYTES  # the plan's own lengths, counts and errors
    full = windows.count(None)
    if full and layout == "paged":
        total += paged(full, batch * m if num_pages is None else num_pages)
    elif full:
        total += full * batch * spec.max_len * per_layer + batch * PER_SEQUENCE_BYTES
    for window in sorted({w for w in windows if w is not None}):
        pages = batch * min(Ring(window, slack).pages_per_sequence(page_size), m)
        total += paged(windows.count(window), pages)
    return total
