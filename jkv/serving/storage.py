"""What the engine's cache holds: slots, pages and per-layer rings, sized from the options and the free memory."""

from __future__ import annotations

import gc
import sys
from typing import NamedTuple

import jax

from jkv import memory
from jkv.caches import CacheSpec, Ring
from jkv.serving import steps
from jkv.serving.options import EngineOptions, default_num_slots


class Storage(NamedTuple):
    """``per_token``: bytes per position of a slot's format; ``plan``: the per-layer plan's options (None: every
    layer full-length); ``num_pages`` / ``page_size``: None for contiguous caches."""

    spec: CacheSpec
    per_token: int
    num_slots: int
    page_size: int | None
    num_pages: int | None
    plan: dict | None

    @property
    def window_slack(self) -> int | None:
        return None if self.plan is None else self.plan["slack"]

    def make_cache(self, options: EngineOptions):
        return steps.make_cache(
            options.cache, self.spec, self.num_slots, num_pages=self.num_pages, plan=self.plan,
            **dict(options.cache_options),
        )  # fmt: skip


def plan_storage(options: EngineOptions, config, weights_dtype, mesh=None, verbose: bool = True) -> Storage:
    """Slots (``options.num_slots`` or what fits the free memory), pages of the paged kinds (every slot can fill
    its row, and prefix entries pin at most ``prefix_cache_bytes`` more, as far as the free memory goes; beyond
    that the scheduler makes requests wait) and the rings of windowed layers (every slot fills its ring, plus one
    step's chunks and pinned prefixes, so that a ring's pool never runs out)."""
    dtype = steps.kind_dtype(options.cache, weights_dtype if options.cache_dtype is None else options.cache_dtype)
    spec = CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, options.max_len, dtype)
    probe = steps.make_cache(options.cache, spec.replace(max_len=steps.PAGE_SIZE), 1, **dict(options.cache_options))
    per_token = probe.format.bytes_per_token(probe.spec)
    paged = steps.is_paged(options.cache)
    windows, plan = options.windows(config), None
    slot_per_token = per_token
    if windows is not None:  # a per-layer plan: windowed layers on rings
        plan = {"windows": windows, "slack": options.slack(paged)}
        ring = memory.plan_bytes(spec, 1, windows, slack=plan["slack"], page_size=steps.PAGE_SIZE)
        slot_per_token = -(-ring * per_token // memory.cache_bytes(spec, 1))  # what a slot really takes
    num_slots = options.num_slots or default_num_slots(spec, slot_per_token, mesh, verbose)
    if not paged:
        return Storage(spec, per_token, num_slots, None, None, plan)
    page_size = steps.PAGE_SIZE
    page_bytes = per_token * page_size
    full = num_slots * (options.max_len // page_size) + options.prefix_cache_bytes // page_bytes
    num_pages = options.num_pages or max(min(full, memory.usable_bytes() // page_bytes), 1)
    if plan is not None:
        ring_pages = max(Ring(w, plan["slack"]).pages_per_sequence(page_size) for w in windows if w is not None)
        extra = -(-options.batch_tokens // page_size) + options.prefix_cache_bytes // page_bytes
        plan["window_pages"] = num_slots * (ring_pages + 1) + extra
    return Storage(spec, per_token, num_slots, page_size, num_pages, plan)


def allocate(storage: Storage, options: EngineOptions, mesh=None, verbose: bool = True):
    """``(storage, cache)``: the cache of ``storage``, its buffers placed on the device. What was sized from the
    free memory (a paged pool without ``options.num_pages``; a contiguous batch without ``options.num_slots``)
    that the allocator cannot place, its free memory being fragmented (the bytes are free but not in one block),
    is retried an eighth smaller (whole data-parallel groups of ``mesh``), down to one sequence's pages or one
    slot; each retry is said on stderr when ``verbose``. Any other failure, or sizes the caller gave, raise."""
    while True:
        cache = None
        try:
            cache = storage.make_cache(options)
            jax.block_until_ready(cache)  # a failed allocation surfaces here, not at some later step
            return storage, cache
        except jax.errors.JaxRuntimeError as e:
            smaller = _smaller(storage, options, mesh, e) if "RESOURCE_EXHAUSTED" in str(e) else None
            if smaller is None:
                raise
        if verbose:
            paged = storage.num_pages is not None
            what, fewer = ("pool", f"{storage.num_pages} pages") if paged else ("cache", f"{storage.num_slots} slots")
            tried = smaller.num_pages if paged else smaller.num_slots
            print(f"jkv engine: a {what} of {fewer} {_UNPLACED}; trying {tried}", file=sys.stderr)
        storage = smaller
        del cache
        gc.collect()  # the failed attempt's buffers


_UNPLACED = "did not fit the device's free memory in one piece (fragmented)"


def _smaller(storage: Storage, options: EngineOptions, mesh, error) -> Storage | None:
    """``storage`` an eighth smaller after ``error``; None where the caller gave the size; ``MemoryError`` below
    one sequence's pages or one slot."""
    if storage.num_pages is not None:  # paged
        if options.num_pages is not None:
            return None
        floor = storage.spec.max_len // storage.page_size
        fewer = storage.num_pages - max(storage.num_pages // 8, 1)
        if fewer < floor:
            raise MemoryError(
                f"the device could not place a page pool of {storage.num_pages} pages, and fewer than {floor} (one "
                f"sequence of max_len={storage.spec.max_len}) cannot serve: free device memory or lower max_len"
            ) from error
        return storage._replace(num_pages=fewer)
    if options.num_slots is not None:
        return None
    group = 1 if mesh is None else mesh.shape.get("dp", 1)
    fewer = storage.num_slots - max(storage.num_slots // 8 // group, 1) * group
    if fewer < group:
        raise MemoryError(
            f"the device could not place a cache of {storage.num_slots} slots of max_len={storage.spec.max_len}: "
            "free device memory or lower max_len"
        ) from error
    return storage._replace(num_slots=fewer)
