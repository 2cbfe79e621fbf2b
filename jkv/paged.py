"""Paged KV cache: a shared page pool, per-sequence block tables and a refcounted allocator that runs inside ``jit``.

Layout, stated once: K and V pools are ``[L, P, K, page_size, D]`` (layers, pages, kv heads, positions in a page,
head_dim). Logical position ``s`` of sequence ``b`` lives in page ``block_tables[b, s // page_size]`` at offset
``s % page_size``, in every layer at once (one page index covers all ``L`` layers, as in vLLM). Each
``(layer, page, kv_head)`` slab is one contiguous run of ``page_size * D`` values, so a kernel reads a page
coalesced. ``block_tables[b, j] == -1`` means "no page".

Allocator. ``refcounts[p]`` counts the references to page ``p``: the block-table entries (over all sequences) that
name it plus ``pins[p]``, the references held outside the tables (``pin`` / ``unpin``: how a prefix cache keeps a
prompt's pages alive after its sequence retires); a page is free exactly when its count is 0. The free list is
*derived* from the counts (``refcounts == 0``, taken in ascending page order by a prefix sum) rather than kept as a
second array that could disagree with them; a page can therefore never be handed out while a table still names it, nor
freed twice. Allocation is all-or-nothing per sequence and serves sequences in batch order: the first sequence whose
pages do not fit, and every later one that needs pages, gets nothing and the ``ERR_POOL_EXHAUSTED`` bit (host-side
calls raise instead). A live page is never overwritten.

Protocol, unchanged from ``KVCache``: for every layer ``write`` the new keys/values at ``lengths[b]``, attend,
and after the last layer ``advance(T)``. ``write`` first *reserves* the pages that positions
``[lengths[b], lengths[b] + T)`` need; reserving is idempotent, so only the first layer's write allocates (and the
engine may call ``reserve(T)`` itself before the layers). A page shared with another sequence (after ``fork``)
that is about to be written is copied first (copy-on-write, all layers at once); only the page holding position
``lengths[b]`` can be in that state, because a sequence shares only the pages covering its own valid prefix.
Pages reserved but not yet covered by ``lengths`` (a write not advanced) stay with their sequence and are reused
by its next write; ``rollback`` and ``reset_slot`` give back every page past the new length.

Invariants (tested by tests/test_paged_allocator.py): ``refcounts`` equals the histogram of the non-negative table
entries plus ``pins``; every entry below ``cdiv(lengths[b], page_size)`` names a page; only entries below that bound
are shared, and among those only the last can be partially filled.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Int

from jkv import _checks
from jkv.cache import (
    ERR_ADVANCE_OVERFLOW,
    ERR_BAD_SLOT,
    ERR_POOL_EXHAUSTED,
    ERR_WRITE_OVERFLOW,
    CacheSpec,
    KVCache,
    KVSnapshot,
    LengthsMixin,
)

NO_PAGE = -1  # block-table entry of a logical page that has no physical page


def _cdiv(a, b):
    return (a + b - 1) // b


@struct.dataclass
class PagedKVCache(LengthsMixin):
    """Paged KV cache for ``L`` layers and ``B`` sequences; see the module docstring for layout and protocol."""

    k_pages: Array  # [L, P, K, page_size, D]
    v_pages: Array  # [L, P, K, page_size, D]
    # Tables, counts, lengths and error bits are arrays (not static fields): changing them never recompiles a step.
    block_tables: Int[Array, "B M"]  # physical page of each logical page, NO_PAGE where none
    refcounts: Int[Array, " P"]  # references to each page (table entries + pins); 0 = free
    pins: Int[Array, " P"]  # references held outside the block tables (pin / unpin)
    lengths: Int[Array, " B"]
    errors: Int[Array, " B"]

    # ------------------------------------------------------------------ construction and shape
    @classmethod
    def init(
        cls, spec: CacheSpec, batch: int, *, page_size: int, num_pages: int | None = None, **storage
    ) -> PagedKVCache:
        """``batch`` empty sequences over a pool of ``num_pages`` pages of ``page_size`` positions.

        Each sequence may hold up to ``spec.max_len`` positions (a multiple of ``page_size``), i.e.
        ``spec.max_len // page_size`` pages. ``num_pages`` defaults to enough for every sequence to be full; a
        smaller pool oversubscribes memory, which is the point of paging. ``storage``: options of the pool format
        (``scale_dtype`` for Q8 pages; none here).
        """
        if not isinstance(spec, CacheSpec):
            raise TypeError(f"spec must be a jkv.CacheSpec, got {type(spec).__name__}")
        _checks.positive_int("batch", batch)
        _checks.positive_int("page_size", page_size)
        if spec.max_len % page_size:
            raise ValueError(f"spec.max_len={spec.max_len} must be a multiple of {page_size=}")
        max_pages = spec.max_len // page_size
        num_pages = batch * max_pages if num_pages is None else num_pages
        _checks.positive_int("num_pages", num_pages)
        shape = (spec.num_layers, num_pages, spec.num_kv_heads, page_size, spec.head_dim)
        return cls(
            **cls._empty_pools(spec, shape, **storage),
            block_tables=jnp.full((batch, max_pages), NO_PAGE, jnp.int32),
            refcounts=jnp.zeros((num_pages,), jnp.int32),
            pins=jnp.zeros((num_pages,), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            errors=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def spec(self) -> CacheSpec:
        num_layers, _, num_kv_heads, _, head_dim = self.k_pages.shape
        return CacheSpec(num_layers, num_kv_heads, head_dim, self.max_len, self.k_pages.dtype)

    @property
    def batch(self) -> int:
        return self.block_tables.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[1]

    @property
    def max_pages(self) -> int:
        """Block-table width: pages one sequence can hold."""
        return self.block_tables.shape[1]

    @property
    def max_len(self) -> int:
        return self.max_pages * self.page_size

    @property
    def nbytes(self) -> int:
        """Device bytes held by the cache (pools, tables, counts, pins, lengths and error bits)."""
        arrays = (*self._pools(), self.block_tables, self.refcounts, self.pins, self.lengths, self.errors)
        return sum(int(x.size) * x.dtype.itemsize for x in arrays)

    # ------------------------------------------------------------------ pool storage (Q8 pages override these)
    # Every pool is [L, P, K, page_size, X]: the allocator and every operation below move and copy pages of all
    # pools alike. Only these hooks know what the pools hold (here K and V values; jkv.paged_q8: codes and scales)
    # and which contiguous cache holds the same arrays as [L, B, K, S, X] (here KVCache).
    @classmethod
    def _empty_pools(cls, spec: CacheSpec, shape: tuple[int, ...]) -> dict[str, Array]:
        return {"k_pages": jnp.zeros(shape, spec.dtype), "v_pages": jnp.zeros(shape, spec.dtype)}

    def _pools(self) -> tuple[Array, ...]:
        return self.k_pages, self.v_pages

    def _with_pools(self, pools) -> PagedKVCache:
        k_pages, v_pages = pools
        return self.replace(k_pages=k_pages, v_pages=v_pages)

    def _encode(self, k: Array, v: Array) -> tuple[Array, ...]:
        """New keys and values ``[..., D]`` as pool values ``[..., X]``, in ``_pools()`` order."""
        return k, v

    def _decode(self, arrays, dtype=None) -> tuple[Array, Array]:
        """Keys and values from pool values ``[..., X]`` in ``_pools()`` order (``dtype``: None keeps the pools')."""
        k, v = arrays
        return (k, v) if dtype is None else (k.astype(dtype), v.astype(dtype))

    @classmethod
    def _storage_of(cls, cache) -> dict:
        """``init``'s storage options that match the contiguous ``cache`` (whose type is checked here)."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        return {}

    @classmethod
    def _restore_contiguous(cls, snap):
        """The contiguous cache of this storage back from its host snapshot."""
        return KVCache.restore(snap)

    def _contiguous_arrays(self, name: str, cache) -> tuple[Array, ...]:
        """The arrays ``[L, B, K, S, X]`` of a contiguous cache of this storage, in ``_pools()`` order, after
        checking its type and layout (all but ``max_len``) against this cache."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"{name} must be a KVCache, got {type(cache).__name__}")
        _checks.same_layout(name, cache.spec, self.spec)
        return cache.k, cache.v

    def _contiguous(self, arrays, lengths: Array, errors: Array) -> KVCache:
        """A contiguous cache of this storage from arrays ``[L, B, K, S, X]`` in ``_pools()`` order."""
        k, v = arrays
        return KVCache(k=k, v=v, lengths=lengths, errors=errors)

    def num_free_pages(self) -> Int[Array, ""]:
        return jnp.sum(self.refcounts == 0, dtype=jnp.int32)

    def pages_held(self) -> Int[Array, " B"]:
        """Pages each sequence's table names (shared pages count for every sharer)."""
        return jnp.sum(self.block_tables >= 0, axis=1, dtype=jnp.int32)

    # ------------------------------------------------------------------ allocator (all jit-able)
    def _release(self, drop: Array) -> PagedKVCache:
        """Drop the table entries where ``drop [B, M]`` holds, giving one reference back per entry."""
        pages = jnp.where(drop & (self.block_tables >= 0), self.block_tables, self.num_pages)  # P: no page
        return self.replace(
            block_tables=jnp.where(drop, NO_PAGE, self.block_tables),
            refcounts=self.refcounts.at[pages.ravel()].add(-1, mode="drop"),
        )

    def _allocate(self, need: Array) -> tuple[PagedKVCache, Array, Array]:
        """Give every entry where ``need [B, M]`` holds a fresh page, all-or-nothing per sequence.

        Returns the cache (tables and counts updated), ``got [B]`` (True where the sequence's request was met or
        empty) and ``fresh [B, M]`` (the new page of each served entry, ``P`` elsewhere). The entry's old page, if
        any, is *not* released: the caller decides (copy-on-write copies from it first).
        """
        p = self.num_pages
        count = jnp.sum(need, axis=1, dtype=jnp.int32)
        free = self.refcounts == 0
        got = (jnp.cumsum(count) <= jnp.sum(free, dtype=jnp.int32)) | (count == 0)
        need = need & got[:, None]
        free_list = jnp.nonzero(free, size=p, fill_value=p)[0]  # ascending free pages, padded with P
        rank = jnp.cumsum(need.ravel()).reshape(need.shape) - 1
        fresh = jnp.where(need, free_list[jnp.clip(rank, 0, p - 1)], p)
        cache = self.replace(
            block_tables=jnp.where(need, fresh, self.block_tables),
            refcounts=self.refcounts.at[fresh.ravel()].add(1, mode="drop"),
        )
        return cache, got, fresh

    def reserve(self, n=1) -> PagedKVCache:
        """Make positions ``[lengths[b], lengths[b] + n[b])`` writable: allocate missing pages, copy a shared one.

        Idempotent (a second call with the same ``n`` changes nothing), so ``write`` calls it for every layer and
        only the first allocates. A sequence whose request does not fit ``max_len`` or the pool is left as it was;
        the pool case sets ``ERR_POOL_EXHAUSTED`` (host calls raise).
        """
        n = _checks.per_sequence_ints("n", n, self.batch)
        return self._reserve(self.lengths + n)[0]

    def _reserve(self, target: Array) -> tuple[PagedKVCache, Array]:
        """``reserve`` up to ``target [B]`` positions; returns the cache and ``got [B]``."""
        ps, p, m = self.page_size, self.num_pages, self.max_pages
        rows = jnp.arange(self.batch)
        grow = (target > self.lengths) & (target <= self.max_len)
        first = self.lengths // ps  # the page holding position lengths[b]
        at = jnp.minimum(first, m - 1)
        j = jnp.arange(m)[None, :]
        in_range = grow[:, None] & (j >= first[:, None]) & (j < _cdiv(target, ps)[:, None])
        tables = self.block_tables

        # Only the page at `first` can be shared (module docstring). When every sequence naming it writes into
        # it in this same call (forked samples decoding together), the first of them keeps it: one copy fewer.
        page = tables[rows, at]
        refs = self.refcounts[jnp.clip(page, 0, p - 1)]
        shared = in_range[rows, at] & (page >= 0) & (refs > 1)
        page = jnp.where(shared, page, p)  # [B], P where not shared
        pc = jnp.clip(page, 0, p - 1)
        writers = jnp.zeros(p, jnp.int32).at[page].add(1, mode="drop")
        lead = jnp.full(p, self.batch, jnp.int32).at[page].min(rows, mode="drop")
        keeps = shared & (writers[pc] == refs) & (lead[pc] == rows)
        cow = shared & ~keeps
        need = in_range & ((tables < 0) | (cow[:, None] & (j == first[:, None])))
        cache, got, fresh = self._allocate(need)
        # A keeper writes only once every other sharer has moved off its page; else it waits, flagged, and gives
        # back what it was just given (all or nothing).
        stuck = jnp.zeros(p, jnp.int32).at[jnp.where(cow & ~got, page, p)].add(1, mode="drop")
        stuck = keeps & (stuck[pc] > 0)
        cache = cache._release(need & stuck[:, None])
        got = got & ~stuck
        _checks.host_all(
            got,
            lambda: (
                f"page pool exhausted: reserving up to {np.asarray(target)} positions at lengths="
                f"{np.asarray(self.lengths)} needs more than the {int(self.num_free_pages())} free pages of "
                f"{p} (page_size={ps})"
            ),
        )

        # Copy-on-write: copy each shared page being written (all layers) to its fresh page, then let go of it.
        cow = cow & got
        src = jnp.where(cow, page, p)  # [B]
        dst = jnp.where(cow, fresh[rows, at], p)  # [B]

        def copy(pools):
            return tuple(x.at[:, dst].set(x[:, pc], mode="drop") for x in pools)

        # A cond, not a masked copy: the copy gathers B pages of every layer, far more than a decode step's write.
        pools = lax.cond(jnp.any(cow), copy, lambda pools: pools, cache._pools())
        return cache._with_pools(pools).replace(
            refcounts=cache.refcounts.at[src].add(-1, mode="drop"),
            errors=cache.errors | jnp.where(got, 0, ERR_POOL_EXHAUSTED),
        ), got

    def _owns_pages(self, positions: Array) -> Array:
        """``[B]``: every position of ``positions [B, T]`` (each below ``max_len``) has a page that no other
        sequence shares, i.e. a write there needs no allocation and no copy. Positions past ``max_len`` count as
        owned (the write or advance refuses them on its own)."""
        pages = self._logical_pages(positions)
        past = positions >= self.max_len
        own = (pages < self.num_pages) & (self.refcounts[jnp.clip(pages, 0, self.num_pages - 1)] == 1)
        return jnp.all(own | past, axis=1)

    def _logical_pages(self, positions: Array) -> Array:
        """Physical page of each position ``[B, T]``, ``P`` where the position has no page (or is past max_len)."""
        j = positions // self.page_size
        pages = jnp.take_along_axis(self.block_tables, jnp.clip(j, 0, self.max_pages - 1), axis=1)
        return jnp.where((j < self.max_pages) & (pages >= 0), pages, self.num_pages)

    # ------------------------------------------------------------------ updates
    def write(self, layer, k_new: Array, v_new: Array, *, reserved: bool = False) -> PagedKVCache:
        """Write ``k_new``/``v_new`` ``[B, K, T, D]`` of ``layer`` at positions ``lengths[b] .. lengths[b]+T``.

        Reserves the pages first (see ``reserve``). Lengths do not move: call ``advance(T)`` once every layer has
        written. A sequence whose write would pass ``max_len`` (``ERR_WRITE_OVERFLOW``) or find no free page
        (``ERR_POOL_EXHAUSTED``) is left untouched; host calls raise instead.

        ``reserved=True``: the caller ran ``reserve(T)`` on this cache (as a model step does once for all its
        layers), so the allocator is skipped. It stays safe if that is not so: a sequence whose positions lack
        a page of their own (none, or one still shared with another sequence) is left untouched and flagged
        ``ERR_POOL_EXHAUSTED``; nothing is written into a shared page.
        """
        fits = self._check_write(layer, k_new, v_new)
        t = k_new.shape[2]
        positions = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)  # (B, T)
        if reserved:
            cache, got = self, self._owns_pages(positions)
            cache = cache.replace(errors=cache.errors | jnp.where(fits & ~got, ERR_POOL_EXHAUSTED, 0))
        else:
            cache, got = self._reserve(jnp.where(fits, self.lengths + t, self.lengths))
        ok = fits & got

        pages = jnp.where(ok[:, None], cache._logical_pages(positions), self.num_pages)  # P drops the write
        offsets = positions % self.page_size

        def put(pool, new):  # pool[layer, pages, :, offsets, :] is (B, T, K, X)
            return pool.at[layer, pages, :, offsets, :].set(jnp.swapaxes(new, 1, 2).astype(pool.dtype), mode="drop")

        # Only the T new positions are encoded (quantized, for Q8 pages).
        new = self._encode(k_new, v_new)
        return cache._with_pools(tuple(put(p, x) for p, x in zip(cache._pools(), new, strict=True))).replace(
            errors=cache.errors | jnp.where(fits, 0, ERR_WRITE_OVERFLOW)
        )

    def advance(self, n=1, *, reserved: bool = False) -> PagedKVCache:
        """Move every length forward by ``n`` (int or ``int32[B]``), reserving pages the new lengths cover.

        After ``write`` the pages are already there and nothing is allocated. Without a write the positions hold
        whatever their pages held, as in ``KVCache``. ``reserved=True`` (after ``reserve(n)``, see ``write``)
        skips the allocator; a sequence whose new positions have no page stays where it was, flagged
        ``ERR_POOL_EXHAUSTED``.
        """
        n = _checks.per_sequence_ints("n", n, self.batch)
        new = self.lengths + n
        fits = (new <= self.max_len) & (n >= 0)
        _checks.host_all(
            fits,
            lambda: (
                f"advance by n={np.asarray(n)} from lengths={np.asarray(self.lengths)} "
                f"must stay within [current, max_len={self.max_len}]"
            ),
        )
        if reserved:
            # What reserve(n) establishes: the page at lengths[b] (the only one that can be shared) is the
            # sequence's own, and the page of the last new position exists (tables are prefixes, so all do).
            last = jnp.where(n > 0, new - 1, self.lengths)[:, None]
            has_last = self._logical_pages(last)[:, 0] < self.num_pages
            got = (n <= 0) | (self._owns_pages(self.lengths[:, None]) & has_last)
            cache = self.replace(errors=self.errors | jnp.where(fits & ~got, ERR_POOL_EXHAUSTED, 0))
        else:
            cache, got = self._reserve(jnp.where(fits, new, self.lengths))
        ok = fits & got
        return cache.replace(
            lengths=jnp.where(ok, new, self.lengths),
            errors=cache.errors | jnp.where(fits, 0, ERR_ADVANCE_OVERFLOW),
        )

    def rollback(self, lengths) -> PagedKVCache:
        """Shrink lengths (see ``KVCache.rollback``) and give back every page past each resulting length.

        Pages reserved by a write that was never advanced go back too, also for a sequence whose rollback was
        refused (its length stays, flagged).
        """
        cache = LengthsMixin.rollback(self, lengths)
        keep = _cdiv(cache.lengths, self.page_size)
        return cache._release(jnp.arange(self.max_pages)[None, :] >= keep[:, None])

    def reset(self) -> PagedKVCache:
        """Empty every sequence and free every page, pinned ones included (pool contents are left as they are)."""
        return self.replace(
            block_tables=jnp.full_like(self.block_tables, NO_PAGE),
            refcounts=jnp.zeros_like(self.refcounts),
            pins=jnp.zeros_like(self.pins),
            lengths=jnp.zeros_like(self.lengths),
            errors=jnp.zeros_like(self.errors),
        )

    def reset_slot(self, slot) -> PagedKVCache:
        """Empty (retire) sequence ``slot``: its length and error bits to zero, its page references given back."""
        ok = self._slot_ok(slot)
        hit = (jnp.arange(self.batch) == slot) & ok
        cache = self._release(jnp.broadcast_to(hit[:, None], self.block_tables.shape))
        return cache.replace(
            lengths=jnp.where(hit, 0, self.lengths),
            errors=jnp.where(hit, 0, self.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def fork(self, src, dst) -> PagedKVCache:
        """Make sequence ``dst`` a copy of ``src`` that shares its pages (prefix sharing; nothing is copied).

        ``dst``'s previous pages are given back; every page covering ``src``'s valid prefix gains one reference.
        Either sequence's next write into a shared page copies that page first (copy-on-write). ``src == dst``
        changes nothing; a slot out of range under ``jit`` changes nothing and flags ``ERR_BAD_SLOT``.
        """
        ok = self._slot_ok(src) & self._slot_ok(dst)
        act = ok & (src != dst)
        rows = jnp.arange(self.batch)
        hit = (rows == dst) & act
        cache = self._release(jnp.broadcast_to(hit[:, None], self.block_tables.shape))
        src_c = jnp.clip(src, 0, self.batch - 1)
        length = self.lengths[src_c]
        covered = jnp.arange(self.max_pages) < _cdiv(length, self.page_size)
        shared = jnp.where(covered, cache.block_tables[src_c], NO_PAGE)  # [M]
        added = jnp.where(act & (shared >= 0), shared, self.num_pages)
        return cache.replace(
            block_tables=jnp.where(hit[:, None], shared[None, :], cache.block_tables),
            refcounts=cache.refcounts.at[added].add(1, mode="drop"),
            lengths=jnp.where(hit, length, cache.lengths),
            errors=jnp.where(hit, self.errors[src_c], cache.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    # ------------------------------------------------------------------ pinned pages (prefix caching)
    def pin(self, slot, length) -> tuple[PagedKVCache, Array]:
        """Hold the pages covering the first ``length`` positions of ``slot`` outside the block tables.

        Returns the cache (those pages' ``pins`` and ``refcounts`` + 1) and ``pages int32[max_pages]``: the slot's
        first ``cdiv(length, page_size)`` table entries, ``NO_PAGE`` after. Nothing is copied. The pages stay
        allocated, with their contents (any sequence writing into a pinned page copies it first), until
        ``unpin(pages)``; ``insert_into_slot(..., prefix=(pages, n))`` gives them to a new sequence. ``length``
        must lie in ``[0, lengths[slot]]``; under ``jit`` a bad slot or length pins nothing and flags
        ``ERR_BAD_SLOT`` (on every sequence for a bad slot, on ``slot`` for a bad length).
        """
        ok = self._slot_ok(slot)
        length = jnp.asarray(length)
        if not jnp.issubdtype(length.dtype, jnp.integer) or length.ndim:
            raise TypeError(f"length must be an integer scalar, got {length!r}")
        s = jnp.clip(slot, 0, self.batch - 1)
        _checks.host_all(
            (length >= 0) & (length <= self.lengths[s]),
            lambda: f"pin length={int(length)} must lie in [0, lengths[{int(slot)}]={int(self.lengths[s])}]",
        )
        valid = ok & (length >= 0) & (length <= self.lengths[s])
        covered = valid & (jnp.arange(self.max_pages) < _cdiv(length, self.page_size))
        pages = jnp.where(covered, self.block_tables[s], NO_PAGE)
        held = jnp.where(pages >= 0, pages, self.num_pages)
        bad_length = ok & ~valid & (jnp.arange(self.batch) == s)
        return self.replace(
            refcounts=self.refcounts.at[held].add(1, mode="drop"),
            pins=self.pins.at[held].add(1, mode="drop"),
            errors=self.errors | jnp.where(bad_length | ~ok, ERR_BAD_SLOT, 0),
        ), pages

    def unpin(self, pages) -> PagedKVCache:
        """Give back the references ``pin`` returned (``pages``: any int32 vector; ``NO_PAGE`` entries are skipped).

        A page whose last reference this was becomes free. Host calls refuse to unpin a page more often than it
        is pinned; under ``jit`` such excess is ignored (a count never goes below the table references).
        """
        pages = jnp.asarray(pages)
        if not jnp.issubdtype(pages.dtype, jnp.integer) or pages.ndim != 1:
            raise TypeError(f"pages must be an integer vector, got {pages!r}")
        held = jnp.where((pages >= 0) & (pages < self.num_pages), pages, self.num_pages)
        drop = jnp.zeros_like(self.pins).at[held].add(1, mode="drop")
        _checks.host_all(
            drop <= self.pins,
            lambda: f"unpin of pages {np.flatnonzero(np.asarray(drop > self.pins)).tolist()} that are not pinned",
        )
        drop = jnp.minimum(drop, self.pins)
        return self.replace(refcounts=self.refcounts - drop, pins=self.pins - drop)

    def read_pinned(self, pages, length) -> KVCache:
        """The positions ``[0, length)`` held by pinned ``pages [m]`` as a one-sequence contiguous cache of
        ``max_len = m * page_size`` (what a prefill continues from; a ``Q8KVCache`` for Q8 pages). Entries without a
        page read as zeros."""
        pages = jnp.asarray(pages)
        m = pages.shape[0]
        held = (pages >= 0)[None, :, None, None, None]
        idx = jnp.clip(pages, 0, self.num_pages - 1)

        def take(pool):
            x = jnp.where(held, pool[:, idx], 0)  # (L, m, K, page_size, X)
            nl, _, kh, ps, d = x.shape
            return x.swapaxes(1, 2).reshape(nl, 1, kh, m * ps, d)

        length = jnp.clip(jnp.asarray(length, jnp.int32), 0, m * self.page_size)
        return self._contiguous(tuple(map(take, self._pools())), length[None], jnp.zeros(1, jnp.int32))

    def _attach(self, hit: Array, pages: Array, length: Array) -> tuple[PagedKVCache, Array]:
        """Give the sequence where ``hit [B]`` holds the pinned ``pages`` as its first ``length`` positions.

        Returns the cache and ``valid`` (length in range and every covered page pinned). The sequence's old
        references are given back first; an invalid request leaves it empty."""
        m = pages.shape[0]
        idx = jnp.clip(pages, 0, self.num_pages - 1)
        covered = jnp.arange(m) < _cdiv(length, self.page_size)
        pinned = (pages >= 0) & (pages < self.num_pages) & (self.pins[idx] > 0)
        valid = (length >= 0) & (length <= min(m * self.page_size, self.max_len)) & jnp.all(pinned | ~covered)
        row = (
            jnp.full((self.max_pages,), NO_PAGE, jnp.int32)
            .at[: min(m, self.max_pages)]
            .set(jnp.where(covered & valid, pages, NO_PAGE)[: self.max_pages])
        )
        cache = self._release(jnp.broadcast_to(hit[:, None], self.block_tables.shape))
        row_b = jnp.where(hit[:, None], row[None, :], cache.block_tables)
        added = jnp.where(hit[:, None] & (row[None, :] >= 0), row[None, :], self.num_pages)
        return cache.replace(
            block_tables=row_b,
            refcounts=cache.refcounts.at[added.ravel()].add(1, mode="drop"),
            lengths=jnp.where(hit, jnp.where(valid, length, 0), cache.lengths),
        ), valid

    def _extend_from(self, hit: Array, single: KVCache, arrays) -> tuple[PagedKVCache, Array]:
        """Write positions ``[lengths[b], single.lengths[0])`` of ``single`` into the sequence where ``hit`` holds
        (its earlier positions are taken to equal ``single``'s), reserving pages (copy-on-write of a shared one)."""
        target = jnp.where(hit, jnp.maximum(single.lengths[0], self.lengths), self.lengths)
        cache, got = self._reserve(target)
        s = jnp.argmax(hit)
        positions = jnp.arange(single.max_len, dtype=jnp.int32)
        write = hit[s] & got[s] & (positions >= self.lengths[s]) & (positions < single.lengths[0])
        pages = jnp.where(write, cache._logical_pages(positions[None, :])[s], self.num_pages)
        offsets = positions % self.page_size

        def put(pool, new):  # pool[:, pages, :, offsets, :] is (S', L, K, X)
            return pool.at[:, pages, :, offsets, :].set(new[:, 0].transpose(2, 0, 1, 3).astype(pool.dtype), mode="drop")

        pools = tuple(put(p, x) for p, x in zip(cache._pools(), arrays, strict=True))
        return cache._with_pools(pools).replace(lengths=jnp.where(hit & got, target, cache.lengths)), got

    def insert_into_slot(self, slot, single: KVCache, prefix=None) -> PagedKVCache:
        """Admit a prefilled one-sequence contiguous cache into batch slot ``slot``, on freshly allocated pages.

        ``single`` must match layers, kv heads, head_dim and dtype, hold one sequence and ``max_len`` no larger
        than this cache's (Q8 pages take a ``Q8KVCache``, or a ``KVCache`` that they quantize). The slot's old
        pages are given back first. If the pool cannot hold the sequence the slot is left empty with
        ``ERR_POOL_EXHAUSTED`` (host calls raise).

        ``prefix=(pages, n)`` (prefix sharing): the slot's first ``n`` positions are the pinned ``pages`` (from
        ``pin``; shared, not copied; a partly filled last page is copied when the slot first writes into it) and
        only positions ``[n, single.lengths[0])`` are written from ``single``, whose first ``n`` positions must
        hold the same keys and values (e.g. a prefill that continued from ``read_pinned(pages, n)``). Pages that
        are not pinned, or ``n`` beyond them or beyond ``single``'s length, leave the slot empty and flag
        ``ERR_BAD_SLOT`` (host calls raise).
        """
        arrays = self._contiguous_arrays("single", single)
        if single.batch != 1:
            raise ValueError(f"single must hold one sequence, got batch={single.batch}")
        if single.max_len > self.max_len:
            raise ValueError(f"single.max_len={single.max_len} exceeds this cache's max_len={self.max_len}")
        ok = self._slot_ok(slot)
        rows = jnp.arange(self.batch)
        hit = (rows == slot) & ok
        if prefix is not None:
            return self._insert_shared(ok, hit, single, arrays, prefix)
        cache = self._release(jnp.broadcast_to(hit[:, None], self.block_tables.shape))
        n = _cdiv(single.lengths[0], self.page_size)
        need = hit[:, None] & (jnp.arange(self.max_pages)[None, :] < n)
        cache, got, fresh = cache._allocate(need)
        _checks.host_all(
            got,
            lambda: (
                f"page pool exhausted: admitting a sequence of length {int(single.lengths[0])} needs {int(n)} "
                f"pages of {self.page_size}, only {int(cache.num_free_pages())} of {self.num_pages} are free"
            ),
        )
        m = _cdiv(single.max_len, self.page_size)
        dst = fresh[jnp.clip(slot, 0, self.batch - 1), :m]  # [m], P where no page (dropped)

        def put(pool, new):  # new [L, 1, K, S', X] -> [L, m, K, page_size, X]
            new = jnp.pad(new[:, 0], ((0, 0), (0, 0), (0, m * self.page_size - single.max_len), (0, 0)))
            pages = new.reshape(new.shape[0], new.shape[1], m, self.page_size, new.shape[3]).swapaxes(1, 2)
            return pool.at[:, dst].set(pages.astype(pool.dtype), mode="drop")

        served = hit & got
        pools = tuple(put(p, x) for p, x in zip(cache._pools(), arrays, strict=True))
        return cache._with_pools(pools).replace(
            lengths=jnp.where(served, single.lengths[0], jnp.where(hit, 0, cache.lengths)),
            errors=jnp.where(hit, jnp.where(got, single.errors[0], ERR_POOL_EXHAUSTED), cache.errors)
            | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def _insert_shared(self, ok, hit, single: KVCache, arrays, prefix) -> PagedKVCache:
        pages, n = prefix
        pages, n = jnp.asarray(pages), jnp.asarray(n)
        if not jnp.issubdtype(pages.dtype, jnp.integer) or pages.ndim != 1:
            raise TypeError(f"prefix pages must be an integer vector, got {pages!r}")
        if not jnp.issubdtype(n.dtype, jnp.integer) or n.ndim:
            raise TypeError(f"prefix length must be an integer scalar, got {n!r}")
        n = n.astype(jnp.int32)
        cache, valid = self._attach(hit, pages, n)
        valid = valid & (n <= single.lengths[0])
        _checks.host_all(
            valid,
            lambda: (
                f"prefix of n={int(n)} positions must be covered by pinned pages (got {np.asarray(pages).tolist()}, "
                f"pins {np.asarray(self.pins)[np.clip(np.asarray(pages), 0, self.num_pages - 1)].tolist()}) "
                f"and not exceed single's length {int(single.lengths[0])}"
            ),
        )
        hit_v = hit & valid
        cache = cache.replace(lengths=jnp.where(hit_v, n, jnp.where(hit, 0, cache.lengths)))
        cache, got = cache._extend_from(hit_v, single, arrays)
        _checks.host_all(
            got,
            lambda: (
                f"page pool exhausted: admitting a sequence of length {int(single.lengths[0])} after a shared prefix "
                f"of {int(n)} needs more than the {int(self.num_free_pages())} free pages of {self.num_pages}"
            ),
        )
        failed = hit & ~(valid & got)  # the slot ends empty: give back what it was given
        cache = cache._release(jnp.broadcast_to(failed[:, None], cache.block_tables.shape))
        flag = jnp.where(valid, jnp.where(got, 0, ERR_POOL_EXHAUSTED), ERR_BAD_SLOT)
        return cache.replace(
            lengths=jnp.where(failed, 0, cache.lengths),
            errors=jnp.where(hit, jnp.where(failed, flag, single.errors[0]), cache.errors)
            | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    # ------------------------------------------------------------------ contiguous views
    def gather_layer(self, layer, dtype=None) -> tuple[Array, Array]:
        """K and V of ``layer`` as contiguous ``[B, K, max_len, D]`` (the reference path; reads every page), in
        ``dtype`` (default: the pools' own; Q8 pages dequantize, by default to ``spec.dtype``)."""
        _checks.layer_index(layer, self.spec.num_layers)
        pages = jnp.clip(self.block_tables, 0, self.num_pages - 1)  # entries without a page read page 0: masked

        def take(pool):
            x = pool[layer][pages]  # (B, M, K, page_size, X)
            b, m, kh, ps, d = x.shape
            return x.swapaxes(1, 2).reshape(b, kh, m * ps, d)

        return self._decode(tuple(map(take, self._pools())), dtype)

    def extract_slot(self, slot, max_len: int | None = None) -> KVCache:
        """The one-sequence contiguous cache of ``slot`` (first ``max_len`` positions; default all), e.g. to
        snapshot one sequence into a prefix cache (a ``Q8KVCache`` for Q8 pages). Positions without a page are
        zero."""
        max_len = self._check_extract(slot, max_len)
        m = _cdiv(max_len, self.page_size)
        row = lax.dynamic_slice(self.block_tables, (slot, 0), (1, self.max_pages))[0, :m]  # [m]
        pages, held = jnp.clip(row, 0, self.num_pages - 1), (row >= 0)[None, :, None, None, None]

        def take(pool):
            x = jnp.where(held, pool[:, pages], 0)  # (L, m, K, page_size, X)
            nl, _, kh, ps, d = x.shape
            return x.swapaxes(1, 2).reshape(nl, 1, kh, m * ps, d)[:, :, :, :max_len]

        length = lax.dynamic_slice(self.lengths, (slot,), (1,))
        errors = lax.dynamic_slice(self.errors, (slot,), (1,))
        return self._contiguous(tuple(map(take, self._pools())), jnp.minimum(length, max_len), errors)

    def to_contiguous(self) -> KVCache:
        """The logical contents as a ``KVCache`` (a ``Q8KVCache`` for Q8 pages; same lengths and errors; positions
        without a page are zero)."""
        pages = jnp.clip(self.block_tables, 0, self.num_pages - 1)
        held = (self.block_tables >= 0)[None, :, :, None, None, None]

        def take(pool):
            x = jnp.where(held, pool[:, pages], 0)  # (L, B, M, K, page_size, X)
            nl, b, m, kh, ps, d = x.shape
            return x.swapaxes(2, 3).reshape(nl, b, kh, m * ps, d)

        return self._contiguous(tuple(map(take, self._pools())), self.lengths, self.errors)

    @classmethod
    def from_contiguous(cls, cache: KVCache, *, page_size: int, num_pages: int | None = None) -> PagedKVCache:
        """Page a contiguous cache (a ``Q8KVCache`` for Q8 pages): each sequence gets ``cdiv(length, page_size)``
        fresh pages.

        ``max_len`` is rounded up to a multiple of ``page_size``. A pool too small for every sequence raises on
        the host (under ``jit`` the sequences that do not fit are left empty with ``ERR_POOL_EXHAUSTED``).
        """
        storage = cls._storage_of(cache)  # checks the type first
        spec = cache.spec
        m = _cdiv(spec.max_len, page_size)
        paged = cls.init(
            spec.replace(max_len=m * page_size), cache.batch, page_size=page_size, num_pages=num_pages, **storage
        )
        arrays = paged._contiguous_arrays("cache", cache)
        need = jnp.arange(m)[None, :] < _cdiv(cache.lengths, page_size)[:, None]
        paged, got, fresh = paged._allocate(need)
        _checks.host_all(
            got,
            lambda: (
                f"page pool exhausted: lengths={np.asarray(cache.lengths)} need {int(need.sum())} pages of "
                f"{page_size}, the pool has {paged.num_pages}"
            ),
        )

        def put(pool, x):  # x [L, B, K, S, X] -> pages [L, B, m, K, page_size, X]
            x = jnp.pad(x, ((0, 0),) * 3 + ((0, m * page_size - spec.max_len), (0, 0)))
            nl, b, kh, _, d = x.shape
            pages = x.reshape(nl, b, kh, m, page_size, d).swapaxes(2, 3)
            return pool.at[:, fresh].set(pages.astype(pool.dtype), mode="drop")

        pools = tuple(put(p, x) for p, x in zip(paged._pools(), arrays, strict=True))
        return paged._with_pools(pools).replace(
            lengths=jnp.where(got, cache.lengths, 0),
            errors=cache.errors | jnp.where(got, 0, ERR_POOL_EXHAUSTED),
        )

    # ------------------------------------------------------------------ host round trip
    def snapshot(self, trim: bool = True) -> KVSnapshot:
        """Copy the logical contents to host NumPy (a ``KVSnapshot``; page sharing is not kept)."""
        return self.to_contiguous().snapshot(trim=trim)

    @classmethod
    def restore(cls, snap: KVSnapshot, *, page_size: int, num_pages: int | None = None) -> PagedKVCache:
        """Rebuild a paged cache from ``snapshot()`` (or a ``KVCache`` snapshot); bit-exact on valid positions."""
        return cls.from_contiguous(cls._restore_contiguous(snap), page_size=page_size, num_pages=num_pages)
