"""The kernel registries: ``(layout, format type) -> adapter``; an adapter returns the Pallas kernel for a cache
of that kind, which reads the cache's ``storage()`` arrays whole (no per-layer copy).

* ``DECODE`` (T = 1): ``(q [B, N, D], *arrays, lengths, *, layer, scale, window, softcap)`` where ``lengths``
  counts the valid positions, the new token's included. Kinds without an entry take the multi-token kernel.
* ``MULTI_TOKEN`` (T > 1, flat or padded steps, windows, soft caps; ``pallas_kernels.multi_token``):
  ``(q [T, N, D], *arrays, q_starts, lengths, counts, *, layer, scale, window, softcap, config)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

from jkv.caches import sharding
from jkv.caches.formats import FP8, Q8, Plain


class Kernel(NamedTuple):
    fn: Callable
    arrays: tuple
    specs: tuple


def _entry(module: str, name: str):
    """An adapter that imports ``module`` when first asked (the Triton modules need a GPU or interpret mode)."""

    def entry():
        return getattr(importlib.import_module(module), name)

    return entry


FP8_KERNELS = "pallas_kernels.decode_fp8"  # the Q8 kernels with one scale per row: e4m3 read in place
DISPATCH = "pallas_kernels.dispatch"  # Mosaic GPU where it can run, else Triton


DECODE = {
    ("contiguous", Plain): _entry(DISPATCH, "decode_attention_auto"),
    # dequantizes inside the K/V loads: no dequantized copy of the layer
    ("contiguous", Q8): _entry("pallas_kernels.decode_q8", "q8_decode_attention"),
    ("contiguous", FP8): _entry(FP8_KERNELS, "fp8_decode_attention"),
    # reads pages through the block table: no gathered copy
    ("paged", Plain): _entry("pallas_kernels.paged", "paged_decode_attention"),
    ("paged", Q8): _entry("pallas_kernels.paged_q8", "paged_q8_decode_attention"),
    ("paged", FP8): _entry(FP8_KERNELS, "paged_fp8_decode_attention"),
}


MULTI_TOKEN = {
    ("contiguous", Plain): _entry(DISPATCH, "multi_token_attention_auto"),
    ("contiguous", Q8): _entry("pallas_kernels", "q8_multi_token_attention"),
    ("contiguous", FP8): _entry("pallas_kernels", "fp8_multi_token_attention"),
    ("paged", Plain): _entry(DISPATCH, "paged_multi_token_attention_auto"),
    ("paged", Q8): _entry("pallas_kernels", "paged_q8_multi_token_attention"),
    ("paged", FP8): _entry("pallas_kernels", "paged_fp8_multi_token_attention"),
}
# Kinds whose decode step writes the new row inside the attention kernel (pallas_kernels.decode).
FUSED_APPEND = {("contiguous", Plain)}


def key(cache) -> tuple[str, type]:
    return cache.layout, type(cache.format)


def decode_kernel(cache) -> Kernel | None:
    """The T = 1 Pallas kernel for ``cache``, or None where the kind has none."""
    entry = DECODE.get(key(cache))
    if entry is None:
        return None
    return Kernel(entry(), tuple(cache.storage()), sharding.storage_specs(cache))


def multi_token_kernel(cache) -> Callable | None:
    """The T > 1 Pallas kernel for ``cache``, or None where the kind has none."""
    entry = MULTI_TOKEN.get(key(cache))
    return None if entry is None else entry()


def fused_append(cache) -> bool:
    return key(cache) in FUSED_APPEND
