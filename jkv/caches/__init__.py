"""jkv caches: one protocol (``base.Cache``), layouts (``contiguous``, ``paged``) times formats (``formats``), and
the registry of named kinds the CLI, engine and generator use (``registry``)."""

from jkv.caches.base import (
    ERR_BAD_COUNT,
    ERR_BAD_LAYER,
    ERR_BAD_SLOT,
    ERR_POOL_EXHAUSTED,
    ERR_ROLLBACK_FORWARD,
    ERR_VALUE_RANGE,
    ERR_WINDOW,
    ERR_WRITE_OVERFLOW,
    ERROR_NAMES,
    Cache,
    CacheSpec,
    describe_errors,
)
from jkv.caches.contiguous import KVCache
from jkv.caches.formats import FP8, Q8, Format, Plain, dequantize, quantize
from jkv.caches.paged import NO_PAGE, PagedKVCache
from jkv.caches.plan import LayerPlan, PlannedCache
from jkv.caches.registry import PAGE_SIZE, Kind, kind, kinds, make_cache
from jkv.caches.ring import Ring
from jkv.caches.sharding import cache_sharding, cache_specs, shard_cache
from jkv.caches.snapshot import Snapshot
from jkv.caches.tokens import flat_layout, flat_starts

__all__ = [
    "ERROR_NAMES",
    "ERR_BAD_COUNT",
    "ERR_BAD_LAYER",
    "ERR_BAD_SLOT",
    "ERR_POOL_EXHAUSTED",
    "ERR_ROLLBACK_FORWARD",
    "ERR_VALUE_RANGE",
    "ERR_WINDOW",
    "ERR_WRITE_OVERFLOW",
    "FP8",
    "NO_PAGE",
    "PAGE_SIZE",
    "Q8",
    "Cache",
    "CacheSpec",
    "Format",
    "KVCache",
    "Kind",
    "LayerPlan",
    "PagedKVCache",
    "Plain",
    "PlannedCache",
    "Ring",
    "Snapshot",
    "cache_sharding",
    "cache_specs",
    "dequantize",
    "describe_errors",
    "flat_layout",
    "flat_starts",
    "kind",
    "kinds",
    "make_cache",
    "quantize",
    "shard_cache",
]
