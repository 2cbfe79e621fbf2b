"""The kernel registries: ``(layout, format type) -> adapter``; an adapter returns the Pallas kernel for a cache
of that kind, which reads the cache's ``storage()`` arrays whole (no per-layer copy).

* ``DECODE`` (T = 1): ``(q [B, N, D], *arrays, lengths, *, layer, scale, window, softcap)`` where ``lengths``
  counts the valid positions, the new token's included. Kinds without an entry, and head_dims the decode kernels
  do not take (``pallas_kernels.checks.takes_head_dim``: they read a head_dim such as Phi-3's 96 in power-of-two
  column chunks, any multiple of 16 up to 256), take the multi-token kernel.
* ``MULTI_TOKEN`` (T > 1, flat or padded steps, windows, soft caps; ``pallas_kernels.multi_token``):
  ``(q [T, N, D], *arrays, q_starts, lengths, counts, *, layer, scale, window, softcap, config)``; head_dims it
  does not take (``pallas_kernels.multi_token_args.takes_head_dim``) run the reference."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

from jkv.caches import sharding
from jkv.caches.formats import FP8, Q8, Plain
from pallas_kernels import checks as kernel_checks
from pallas_kernels.multi_token_args import takes_head_dim


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


def _decode_takes(cache) -> bool:
    return kernel_checks.takes_head_dim(cache.spec.head_dim, chunked=True)


def decode_kernel(cache) -> Kernel | None:
    """The T = 1 Pallas kernel for ``cache``, or None where the kind has none or its head_dim is not one the
    decode kernels take."""
    entry = DECODE.get(key(cache))
    if entry is None or not _decode_takes(cache):
        return None
    return Kernel(entry(), tuple(cache.storage()), sharding.storage_specs(cache))


def multi_token_kernel(cache) -> Callable | None:
    """The T > 1 Pallas kernel for ``cache``, or None where the kind has none or its head_dim is not one the
    multi-token kernels take."""
    entry = MULTI_TOKEN.get(key(cache))
    return None if entry is None or not takes_head_dim(cache.spec.head_dim) else entry()


def fused_append(cache) -> bool:
    """Whether ``cache``'s decode step writes its new row inside the attention kernel."""
    return key(cache) in FUSED_APPEND and _decode_takes(cache)
