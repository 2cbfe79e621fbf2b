"""The paged layout: a pool of pages shared by all sequences, per-sequence block tables, and the allocator of
``jkv.caches.pool`` running inside ``jit``. One final class for every format.

Every stored array of the format is a pool ``[L, P, K, page_size, X]``. Logical position ``s`` of sequence ``b``
lives in page ``block_tables[b, s // page_size]`` at offset ``s % page_size``, in every layer at once (one page
index covers all ``L`` layers, as in vLLM); ``block_tables[b, j] == -1`` means "no page". ``begin`` reserves the
step's pages once (allocating missing pages and copying a shared one first: copy-on-write); ``write`` only
scatters. ``rollback`` and ``reset_slot`` give back every page past the new length.

``ring`` (``jkv.caches.ring``): the cache of windowed layers; pages that fall out of reach go back at each
``begin``, so only entries from the ring's first kept page on name pages.

Invariants (tests/caches/test_paged_allocator.py): ``refcounts`` equals the histogram of the non-negative table
entries plus ``pins``; every entry below ``cdiv(lengths[b], page_size)`` names a page; only entries below that
bound are shared, and among those only the last can be partially filled.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import jit, lax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int

from jkv.caches import checks, pool, tokens
from jkv.caches.base import ERR_BAD_SLOT, ERR_POOL_EXHAUSTED, ERR_WINDOW, Cache, CacheSpec
from jkv.caches.contiguous import KVCache, all_arrays, convert, slot_arrays
from jkv.caches.formats import Format, Plain, bind
from jkv.caches.ring import Ring
from jkv.caches.sharding import DP, TP

NO_PAGE = pool.NO_PAGE


@struct.dataclass
class PagedKVCache(Cache):
    """Paged KV cache of ``B`` sequences in any format; see the module docstring for layout and protocol."""

    pages: tuple[Array, ...]  # the format's arrays as pools [L, P, K, page_size, X], in format.names order
    # Tables, counts, lengths and error bits are arrays (not static fields): changing them never recompiles a step.
    block_tables: Int[Array, "B M"]  # physical page of each logical page, NO_PAGE where none
    refcounts: Int[Array, " P"]  # references to each page (table entries + pins); 0 = free
    pins: Int[Array, " P"]  # references held outside the block tables (pin / unpin)
    lengths: Int[Array, " B"]
    counts: Int[Array, " B"]
    errors: Int[Array, " B"]
    spec: CacheSpec = struct.field(pytree_node=False)
    format: Format = struct.field(pytree_node=False)
    ring: Ring | None = struct.field(pytree_node=False, default=None)  # windowed layers: jkv.caches.ring

    layout = "paged"

    # ------------------------------------------------------------------ construction and shape
    @classmethod
    def init(
        cls,
        spec: CacheSpec,
        batch: int,
        *,
        page_size: int,
        num_pages: int | None = None,
        format: Format | None = None,
        ring: Ring | None = None,
    ) -> PagedKVCache:
        """``batch`` empty sequences over ``num_pages`` pages of ``page_size`` positions (default: enough for
        every sequence to be full, or to fill its ``ring``; fewer oversubscribes memory, the point of paging).
        ``spec.max_len`` must be a multiple of ``page_size``."""
        if not isinstance(spec, CacheSpec):
            raise TypeError(f"spec must be a jkv.CacheSpec, got {type(spec).__name__}")
        checks.positive_int("batch", batch)
        checks.positive_int("page_size", page_size)
        if spec.max_len % page_size:
            raise ValueError(f"spec.max_len={spec.max_len} must be a multiple of {page_size=}")
        max_pages = spec.max_len // page_size
        if ring is not None:
            ring = Ring(*ring).check()
        held = max_pages if ring is None else min(ring.pages_per_sequence(page_size), max_pages)
        num_pages = batch * held if num_pages is None else num_pages
        checks.positive_int("num_pages", num_pages)
        format = bind(Plain() if format is None else format, spec)
        lead = (spec.num_layers, num_pages, spec.num_kv_heads, page_size)
        shapes = [((*lead, width), dtype) for dtype, width in format.arrays(spec)]
        tables = [((batch, max_pages), jnp.int32), ((batch, 3), jnp.int32), ((num_pages, 2), jnp.int32)]
        checks.allocation(shapes + tables, f"a paged {format} cache of {batch=}, {num_pages=} and {spec}")
        zeros = lambda n: jnp.zeros((n,), jnp.int32)
        return cls(
            tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes),
            jnp.full((batch, max_pages), NO_PAGE, jnp.int32),
            zeros(num_pages),
            zeros(num_pages),
            zeros(batch),
            zeros(batch),
            zeros(batch),
            spec=spec,
            format=format,
            ring=ring,
        )

    def with_format(self, format: Format) -> PagedKVCache:
        """Every page re-stored in ``format`` (as ``KVCache.with_format``); tables, sharing and pins kept."""
        format = bind(format, self.spec)
        return self.replace(pages=convert(self.pages, self.format, format, self.spec.dtype), format=format)

    @property
    def window(self) -> int | None:
        return None if self.ring is None else self.ring.window

    def first_page(self, lengths, counts=0):
        """First logical page each sequence keeps for a step of ``counts`` at ``lengths`` (0 without a ring)."""
        if self.ring is None:
            return jnp.zeros_like(jnp.asarray(lengths))
        return self.ring.first_page(lengths, counts, self.page_size)

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[3]

    @property
    def num_pages(self) -> int:
        return self.pages[0].shape[1]

    @property
    def max_pages(self) -> int:
        """Block-table width: pages one sequence can hold."""
        return self.block_tables.shape[1]

    def num_free_pages(self) -> Int[Array, ""]:
        return jnp.sum(self.refcounts == 0, dtype=jnp.int32)

    def pages_held(self) -> Int[Array, " B"]:
        """Pages each sequence's table names (shared pages count for every sharer)."""
        return jnp.sum(self.block_tables >= 0, axis=1, dtype=jnp.int32)

    # ------------------------------------------------------------------ allocator steps
    def _release(self, drop: Array) -> PagedKVCache:
        tables, refcounts = pool.release(self.block_tables, self.refcounts, drop)
        return self.replace(block_tables=tables, refcounts=refcounts)

    def _release_rows(self, hit: Array) -> PagedKVCache:
        return self._release(jnp.broadcast_to(hit[:, None], self.block_tables.shape))

    def _reserve(self, target: Array) -> tuple[PagedKVCache, Array]:
        """Pages for positions up to ``target [B]`` (copy-on-write of a shared one); the cache and ``got [B]``."""
        tables, refcounts, got, src, dst = pool.reserve(
            self.block_tables, self.refcounts, self.lengths, target, self.page_size
        )
        checks.host_all(
            got,
            lambda: (
                f"page pool exhausted: reserving up to {np.asarray(target)} positions at lengths="
                f"{np.asarray(self.lengths)} needs more than the {int(self.num_free_pages())} free pages of "
                f"{self.num_pages} (page_size={self.page_size})"
            ),
        )
        cache = self.replace(pages=pool.copy_pages(self.pages, src, dst), block_tables=tables, refcounts=refcounts)
        return cache.replace(errors=cache.errors | jnp.where(got, 0, ERR_POOL_EXHAUSTED)), got

    def _logical_pages(self, slot: Array, positions: Array) -> Array:
        return pool.logical_pages(self.block_tables, slot, positions, self.page_size, self.num_pages)

    # ------------------------------------------------------------------ step
    def begin(self, counts) -> PagedKVCache:
        """Declare the step and reserve its pages, once for every layer's write. A sequence past capacity or
        without enough free pages gets count 0 and an error bit; nothing of it is touched."""
        counts, ok, bits = self._declare(counts)
        cache = self
        if self.ring is not None:  # pages out of the ring's reach go back first; a bounded ring refuses long steps
            long = self.ring.bounded & (counts > self.ring.slack)
            checks.host_all(~long, lambda: f"begin(counts={np.asarray(counts)}) exceeds the ring's {self.ring}")
            counts, ok, bits = jnp.where(long, 0, counts), ok & ~long, jnp.where(long, ERR_WINDOW, bits)
            # A sequence the pool refuses keeps the pages behind its ring too (its rollbacks still reach them).
            reach = self.first_page(self.lengths, counts)[:, None]
            behind = (jnp.arange(self.max_pages)[None, :] < reach) & ok[:, None]
            target = jnp.where(ok, self.lengths + counts, self.lengths)
            served = pool.servable(self.block_tables, self.refcounts, self.lengths, target, behind, self.page_size)
            where = lambda: f"begin(counts={np.asarray(counts)}) at lengths={np.asarray(self.lengths)}"
            checks.host_all(served, lambda: f"page pool exhausted: {where()} (pool of {self.num_pages} pages)")
            ok, counts, bits = ok & served, jnp.where(served, counts, 0), jnp.where(served, bits, ERR_POOL_EXHAUSTED)
            cache = self._release(behind & served[:, None])
        cache, got = cache._reserve(jnp.where(ok, self.lengths + counts, self.lengths))
        return cache.replace(counts=jnp.where(got, counts, 0), errors=cache.errors | bits)

    def write(self, layer, k: Array, v: Array) -> PagedKVCache:
        layer, slot, positions, errors = self.write_plan(layer, k, v)
        new, range_errors = self.encode_new(k, v, slot, positions)
        pages = self._logical_pages(slot, positions)
        # Belt and braces: a live position without a page of its own (begin not called) is dropped and flagged.
        own = self.refcounts[jnp.clip(pages, 0, self.num_pages - 1)] == 1
        live = positions < self.max_len
        orphan = live & ((pages >= self.num_pages) | ~own)
        pages = jnp.where(live & ~orphan, pages, self.num_pages)  # P drops the write
        offsets = positions % self.page_size

        def put(buf, x):  # buf[layer, pages, :, offsets, :] is (N, K, X), as x
            return buf.at[layer, pages, :, offsets, :].set(x.astype(buf.dtype), mode="drop")

        orphaned = tokens.any_per_slot(orphan, slot, self.batch)
        errors = errors | range_errors | jnp.where(orphaned, ERR_POOL_EXHAUSTED, 0)
        return self.replace(
            pages=tuple(put(buf, x) for buf, x in zip(self.pages, new, strict=True)), errors=self.errors | errors
        )

    def rollback(self, lengths) -> PagedKVCache:
        """Shrink lengths and give back every page past each resulting length (a refused sequence, flagged, keeps
        its length but gives back the pages of the step it had begun)."""
        lengths, errors = self._rolled(lengths)
        if self.ring is not None:  # a ring refuses a rollback below what it holds
            held = self.ring.can_roll_back(lengths, self.block_tables, self.page_size)
            message = lambda: f"rollback to {np.asarray(lengths)} reads positions the ring {self.ring} let go"
            checks.host_all(held, message)
            lengths, errors = jnp.where(held, lengths, self.lengths), errors | jnp.where(held, 0, ERR_WINDOW)
        cache = self.replace(lengths=lengths, counts=jnp.zeros_like(self.counts), errors=errors)
        keep = pool.cdiv(lengths, self.page_size)
        return cache._release(jnp.arange(self.max_pages)[None, :] >= keep[:, None])

    # ------------------------------------------------------------------ slots
    def reset(self) -> PagedKVCache:
        """Empty every sequence and free every page, pinned ones included (pool contents are left as they are)."""
        zeros = lambda: jnp.zeros_like(self.lengths)  # distinct buffers: each is donated once
        return self.replace(
            block_tables=jnp.full_like(self.block_tables, NO_PAGE),
            refcounts=jnp.zeros_like(self.refcounts),
            pins=jnp.zeros_like(self.pins),
            lengths=zeros(),
            counts=zeros(),
            errors=zeros(),
        )

    def reset_slot(self, slot) -> PagedKVCache:
        """Empty (retire) sequence ``slot``: its length and error bits to zero, its page references given back."""
        slot, ok = checks.index_in_range("slot", slot, self.batch)
        hit = (jnp.arange(self.batch) == slot) & ok
        return self._release_rows(hit).replace(
            lengths=jnp.where(hit, 0, self.lengths),
            counts=jnp.where(hit, 0, self.counts),
            errors=jnp.where(hit, 0, self.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def fork(self, src, dst) -> PagedKVCache:
        """Make sequence ``dst`` a copy of ``src`` that shares its pages (nothing is copied; the next write into a
        shared page copies it first). ``src == dst`` changes nothing; a slot out of range under ``jit`` changes
        nothing and flags ``ERR_BAD_SLOT``."""
        src, src_ok = checks.index_in_range("src", src, self.batch)
        dst, dst_ok = checks.index_in_range("dst", dst, self.batch)
        ok = src_ok & dst_ok
        act = ok & (src != dst)
        src_c = jnp.where(ok, src, 0)
        tables, refcounts, length = pool.fork(
            self.block_tables, self.refcounts, self.lengths, src_c, dst, act, self.page_size
        )
        hit = (jnp.arange(self.batch) == dst) & act
        return self.replace(
            block_tables=tables,
            refcounts=refcounts,
            lengths=jnp.where(hit, length, self.lengths),
            counts=jnp.where(hit, 0, self.counts),
            errors=jnp.where(hit, self.errors[src_c], self.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def pin(self, slot, length) -> tuple[PagedKVCache, Array]:
        """Hold the pages covering the first ``length`` positions of ``slot`` outside the block tables.

        Returns the cache and ``pages int32[max_pages]`` (``NO_PAGE`` after the covered ones). They stay, with
        their contents, until ``unpin(pages)``; ``insert_into_slot(..., prefix=(pages, n))`` shares them. Under
        ``jit`` a bad slot or length pins nothing and flags ``ERR_BAD_SLOT``."""
        slot, ok = checks.index_in_range("slot", slot, self.batch)
        s = jnp.where(ok, slot, 0)
        bound = lambda: f"lengths[{int(slot)}]={int(self.lengths[s])}"
        length, fits = checks.length_within("pin", length, self.lengths[s], bound)
        valid = ok & fits
        covered = valid & (jnp.arange(self.max_pages) < pool.cdiv(length, self.page_size))
        refcounts, pins, pages = pool.pin(self.refcounts, self.pins, self.block_tables[s], covered)
        bad = jnp.where(ok, (jnp.arange(self.batch) == s) & ~valid, True)
        return self.replace(refcounts=refcounts, pins=pins, errors=self.errors | jnp.where(bad, ERR_BAD_SLOT, 0)), pages

    def unpin(self, pages) -> PagedKVCache:
        """Give back the references ``pin`` returned (``NO_PAGE`` entries skipped); host calls refuse to unpin a
        page more often than it is pinned, under ``jit`` the excess is ignored."""
        pages = checks.page_ids("unpin of pages", pages, self.num_pages)
        drop, asked = pool.unpin_counts(self.pins, pages)
        checks.host_all(
            asked <= self.pins,
            lambda: f"unpin of pages {np.flatnonzero(np.asarray(asked > self.pins)).tolist()} that are not pinned",
        )
        return self.replace(refcounts=self.refcounts - drop, pins=self.pins - drop)

    def read_pinned(self, pages, length) -> KVCache:
        """Positions ``[0, length)`` of pinned ``pages [m]`` as a one-sequence contiguous cache of ``max_len =
        m * page_size`` in this cache's format (what a prefill continues from). Entries without a page read 0.
        A page that is not pinned (or not in the pool), or a length outside ``[0, m * page_size]``, raises on the
        host; under ``jit`` it gives an empty cache flagged ``ERR_BAD_SLOT`` (never another page's contents)."""
        pages = checks.page_ids("read_pinned of pages", pages, self.num_pages)
        held = (pages >= 0) & (pages < self.num_pages) & (self.pins[jnp.clip(pages, 0, self.num_pages - 1)] > 0)
        pinned, n = (pages == NO_PAGE) | held, pages.shape[0] * self.page_size
        bad = lambda: np.asarray(pages)[~np.asarray(pinned)].tolist()
        checks.host_all(pinned, lambda: f"read_pinned of pages {bad()} that are not pinned")
        length, fits = checks.length_within("read_pinned", length, n, lambda: str(n))
        ok = jnp.all(pinned) & fits
        errors = jnp.where(ok, 0, ERR_BAD_SLOT)[None]
        return self._contiguous(jnp.where(ok, pages, NO_PAGE)[None, :], jnp.where(ok, length, 0)[None], errors, n)

    def insert_into_slot(self, slot, single: KVCache, prefix=None) -> PagedKVCache:
        """Admit a one-sequence contiguous cache (any format: re-stored in this one) into ``slot`` on fresh pages;
        the slot's old pages go back first. ``prefix=(pages, n)``: the slot's first ``n`` positions are the pinned
        ``pages`` (shared, not copied) and only ``[n, single.lengths[0])`` is written from ``single``. A pool
        that cannot hold the sequence leaves the slot empty with ``ERR_POOL_EXHAUSTED``; bad prefix pages or
        ``n`` with ``ERR_BAD_SLOT`` (host calls raise)."""
        from jkv.caches.admit import admit  # the admission paths, kept apart to keep this module short

        arrays = slot_arrays("single", single, self.spec, self.format)
        slot, ok = checks.index_in_range("slot", slot, self.batch)
        return admit(self, slot, ok, single, arrays, prefix)

    def extract_slot(self, slot, max_len: int | None = None) -> KVCache:
        """The one-sequence contiguous cache of ``slot`` (first ``max_len`` positions), in this format; positions
        without a page are zero; a slot out of range under ``jit`` gives an empty cache flagged ``ERR_BAD_SLOT``."""
        max_len = self.max_len if max_len is None else checks.positive_int("max_len", max_len)
        if max_len > self.max_len:
            raise ValueError(f"{max_len=} exceeds this cache's max_len={self.max_len}")
        slot, ok = checks.index_in_range("slot", slot, self.batch)
        at = jnp.where(ok, slot, 0)
        m = pool.cdiv(max_len, self.page_size)
        row = jnp.where(ok, lax.dynamic_slice(self.block_tables, (at, 0), (1, self.max_pages))[:, :m], NO_PAGE)
        length = jnp.where(ok, jnp.minimum(lax.dynamic_slice(self.lengths, (at,), (1,)), max_len), 0)
        errors = jnp.where(ok, lax.dynamic_slice(self.errors, (at,), (1,)), ERR_BAD_SLOT)
        return self._contiguous(row, length, errors, max_len)

    def to_contiguous(self) -> KVCache:
        """The logical contents as a contiguous cache of this format (positions without a page are zero)."""
        return self._contiguous(self.block_tables, self.lengths, self.errors, self.max_len)

    @jit(static_argnames="max_len")  # the cache a pytree argument: an eager read compiles once, not per primitive
    def _contiguous(self, tables: Array, lengths: Array, errors: Array, max_len: int) -> KVCache:
        """The pages of ``tables [B', m]`` as contiguous arrays ``[L, B', K, max_len, X]``."""
        held = (tables >= 0)[None, :, :, None, None, None]
        idx = jnp.clip(tables, 0, self.num_pages - 1)

        def take(buf):
            x = jnp.where(held, buf[:, idx], jnp.zeros((), buf.dtype))  # (L, B', m, K, page_size, X)
            nl, b, m, kh, ps, d = x.shape
            return x.swapaxes(2, 3).reshape(nl, b, kh, m * ps, d)[:, :, :, :max_len]

        spec = self.spec.replace(max_len=max_len)
        counts = jnp.zeros_like(lengths)
        return KVCache(tuple(map(take, self.pages)), lengths, counts, errors, spec=spec, format=self.format)

    @classmethod
    def from_contiguous(
        cls, cache: KVCache, *, page_size: int, num_pages: int | None = None, ring: Ring | None = None
    ) -> PagedKVCache:
        """Page a contiguous cache (its format kept): each sequence gets ``cdiv(length, page_size)`` fresh pages
        (a ``ring``: those it keeps). ``max_len`` is rounded up to a multiple of ``page_size``; a pool too small
        raises on the host (under ``jit`` the sequences that do not fit are left empty with
        ``ERR_POOL_EXHAUSTED``)."""
        from jkv.caches.admit import paged_from_contiguous

        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a jkv.KVCache, got {type(cache).__name__}")
        m = pool.cdiv(cache.spec.max_len, page_size)
        spec = cache.spec.replace(max_len=m * page_size)
        paged = cls.init(spec, cache.batch, page_size=page_size, num_pages=num_pages, format=cache.format, ring=ring)
        return paged_from_contiguous(paged, cache, all_arrays("cache", cache, cache.spec, paged.format))

    # ------------------------------------------------------------------ reading
    def layer(self, layer, dtype=None, *, stored: bool = False) -> tuple[Array, Array]:
        """K and V of ``layer`` gathered to ``[B, K, max_len, D]`` (reads every page; see ``KVCache.layer``)."""
        layer, ok = checks.index_in_range("layer", layer, self.spec.num_layers)
        dtype = self.spec.dtype if dtype is None else jnp.dtype(dtype)
        tables = jnp.clip(self.block_tables, 0, self.num_pages - 1)  # entries without a page read page 0: masked

        def take(buf):
            x = buf[checks.clamped(layer, ok)][tables]  # (B, M, K, page_size, X)
            b, m, kh, ps, d = x.shape
            return x.swapaxes(1, 2).reshape(b, kh, m * ps, d)

        return self.format.read(tuple(map(take, self.pages)), dtype, stored=stored, ok=ok)

    def for_layer(self, layer):
        return self, layer

    def storage(self) -> tuple[Array, ...]:
        return (*self.pages, self.block_tables)

    def partition_specs(self) -> PagedKVCache:
        per_seq = P(DP)
        return self.replace(
            pages=tuple(P(None, None, TP, None, None) for _ in self.pages),
            block_tables=P(DP, None),
            refcounts=P(),
            pins=P(),
            lengths=per_seq,
            counts=per_seq,
            errors=per_seq,
        )

    # ------------------------------------------------------------------ host round trip
    def snapshot(self, trim: bool = True):
        """The logical contents on the host (a ``Snapshot``; page sharing is not kept)."""
        return self.to_contiguous().snapshot(trim=trim)

    @classmethod
    def restore(cls, snap, *, page_size: int, num_pages: int | None = None, ring: Ring | None = None) -> PagedKVCache:
        """Rebuild a paged cache from a ``Snapshot`` (of either layout); bit-exact on valid positions."""
        return cls.from_contiguous(KVCache.restore(snap), page_size=page_size, num_pages=num_pages, ring=ring)
