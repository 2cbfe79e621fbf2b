"""Admission of a prefilled one-sequence cache into a slot of a paged cache (``PagedKVCache.insert_into_slot``):
on fresh pages, or after a shared prefix of pinned pages; and a whole contiguous cache paged
(``PagedKVCache.from_contiguous``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jkv.caches import checks, pool
from jkv.caches.base import ERR_BAD_SLOT, ERR_POOL_EXHAUSTED


def admit(cache, slot, ok, single, arrays, prefix):
    """``cache`` with ``single`` (arrays ``[L, 1, K, S', X]`` in the cache's format) in ``slot`` (see
    ``PagedKVCache.insert_into_slot``)."""
    hit = (jnp.arange(cache.batch) == slot) & ok
    if prefix is not None:
        return _admit_shared(cache, ok, hit, single, arrays, prefix)
    out, got, n, free = _admit_fresh(cache, slot, ok, single, tuple(arrays))
    checks.host_all(
        got,
        lambda: (
            f"page pool exhausted: admitting a sequence of length {int(single.lengths[0])} needs {int(n)} pages "
            f"of {cache.page_size}, only {int(free)} of {cache.num_pages} are free"
        ),
    )
    return out


@jax.jit  # an eager admission compiles once, not each primitive
def _admit_fresh(cache, slot, ok, single, arrays):
    """The admission on fresh pages, ``got [B]``, the pages it needs and the free pages it found."""
    hit = (jnp.arange(cache.batch) == slot) & ok
    cache = cache._release_rows(hit)
    n = pool.cdiv(single.lengths[0], cache.page_size)
    j = jnp.arange(cache.max_pages)[None, :]
    need = hit[:, None] & (j < n) & (j >= cache.first_page(single.lengths[0]))  # a ring: only what it keeps
    tables, refcounts, got, fresh = pool.allocate(cache.block_tables, cache.refcounts, need)
    ps, m = cache.page_size, pool.cdiv(single.max_len, cache.page_size)
    dst = fresh[jnp.where(ok, slot, 0), :m]  # [m], P where no page (dropped)

    def put(buf, x):  # x [L, 1, K, S', X] -> [L, m, K, page_size, X]
        x = jnp.pad(x[:, 0], ((0, 0), (0, 0), (0, m * ps - single.max_len), (0, 0)))
        pages = x.reshape(x.shape[0], x.shape[1], m, ps, x.shape[3]).swapaxes(1, 2)
        return buf.at[:, dst].set(pages.astype(buf.dtype), mode="drop")

    served = hit & got
    out = cache.replace(
        pages=tuple(put(buf, x) for buf, x in zip(cache.pages, arrays, strict=True)),
        block_tables=tables,
        refcounts=refcounts,
        lengths=jnp.where(served, single.lengths[0], jnp.where(hit, 0, cache.lengths)),
        counts=jnp.where(hit, 0, cache.counts),
        errors=jnp.where(hit, jnp.where(got, single.errors[0], ERR_POOL_EXHAUSTED), cache.errors)
        | jnp.where(ok, 0, ERR_BAD_SLOT),
    )
    return out, got, n, cache.num_free_pages()


def _admit_shared(cache, ok, hit, single, arrays, prefix):
    pages, n = prefix
    pages, n = jnp.asarray(pages), checks.int32_value("prefix length", n)
    if not jnp.issubdtype(pages.dtype, jnp.integer) or pages.ndim != 1:
        raise TypeError(f"prefix pages must be an integer vector, got {pages!r}")
    if n.ndim:
        raise TypeError(f"prefix length must be an integer scalar, got shape {n.shape}")
    before = cache
    first = 0 if cache.ring is None else cache.ring.read_page(n, cache.page_size)  # a ring needs its window only
    tables, refcounts, valid = pool.attach(
        cache.block_tables, cache.refcounts, cache.pins, hit, pages, n, cache.page_size, cache.max_len, first
    )
    valid = valid & (n <= single.lengths[0])
    checks.host_all(
        valid,
        lambda: (
            f"prefix of n={int(n)} positions must be covered by pinned pages (got {np.asarray(pages).tolist()}, "
            f"pins {np.asarray(before.pins)[np.clip(np.asarray(pages), 0, before.num_pages - 1)].tolist()}) "
            f"and not exceed single's length {int(single.lengths[0])}"
        ),
    )
    hit_v = hit & valid
    cache = cache.replace(
        block_tables=tables,
        refcounts=refcounts,
        lengths=jnp.where(hit_v, n, jnp.where(hit, 0, cache.lengths)),
        counts=jnp.where(hit, 0, cache.counts),
    )
    cache, got = _extend_from(cache, hit_v, single, arrays)
    checks.host_all(
        got,
        lambda: (
            f"page pool exhausted: admitting a sequence of length {int(single.lengths[0])} after a shared prefix "
            f"of {int(n)} needs more than the {int(before.num_free_pages())} free pages of {before.num_pages}"
        ),
    )
    failed = hit & ~(valid & got)  # the slot ends empty: give back what it was given
    cache = cache._release_rows(failed)
    flag = jnp.where(valid, jnp.where(got, 0, ERR_POOL_EXHAUSTED), ERR_BAD_SLOT)
    return cache.replace(
        lengths=jnp.where(failed, 0, cache.lengths),
        errors=jnp.where(hit, jnp.where(failed, flag, single.errors[0]), cache.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
    )


def _extend_from(cache, hit, single, arrays):
    """Write positions ``[lengths[b], single.lengths[0])`` of ``single`` into the sequence where ``hit`` holds
    (its earlier positions equal ``single``'s), reserving pages (copy-on-write of a shared one)."""
    target = jnp.where(hit, jnp.maximum(single.lengths[0], cache.lengths), cache.lengths)
    start = cache.lengths
    cache, got = cache._reserve(target)
    s = jnp.argmax(hit)
    positions = jnp.arange(single.max_len, dtype=jnp.int32)
    write = hit[s] & got[s] & (positions >= start[s]) & (positions < single.lengths[0])
    pages = jnp.where(write, cache._logical_pages(s, positions), cache.num_pages)
    offsets = positions % cache.page_size

    def put(buf, x):  # buf[:, pages, :, offsets, :] is (S', L, K, X)
        return buf.at[:, pages, :, offsets, :].set(x[:, 0].transpose(2, 0, 1, 3).astype(buf.dtype), mode="drop")

    new = tuple(put(buf, x) for buf, x in zip(cache.pages, arrays, strict=True))
    return cache.replace(pages=new, lengths=jnp.where(hit & got, target, cache.lengths)), got


def paged_from_contiguous(paged, cache, arrays):
    """The empty ``paged`` cache holding ``cache``'s sequences (``arrays``: its data in ``paged``'s format)."""
    out, got, need = _page_all(paged, cache.lengths, cache.errors, tuple(arrays), cache.spec.max_len)
    checks.host_all(
        got,
        lambda: (
            f"page pool exhausted: lengths={np.asarray(cache.lengths)} need {int(need)} pages of "
            f"{paged.page_size}, the pool has {paged.num_pages}"
        ),
    )
    return out


@functools.partial(jax.jit, static_argnames="max_len")  # an eager call compiles once, not each primitive
def _page_all(paged, lengths, errors, arrays, max_len: int):
    """``paged`` holding sequences of ``lengths`` stored as ``arrays``, ``got [B]`` and the pages they need."""
    page_size = paged.page_size
    m = pool.cdiv(max_len, page_size)
    j = jnp.arange(m)[None, :]
    need = (j < pool.cdiv(lengths, page_size)[:, None]) & (j >= paged.first_page(lengths)[:, None])
    tables, refcounts, got, fresh = pool.allocate(paged.block_tables, paged.refcounts, need)

    def put(buf, x):  # x [L, B, K, S, X] -> pages [L, B, m, K, page_size, X]
        x = jnp.pad(x, ((0, 0),) * 3 + ((0, m * page_size - max_len), (0, 0)))
        nl, b, kh, _, d = x.shape
        return buf.at[:, fresh].set(x.reshape(nl, b, kh, m, page_size, d).swapaxes(2, 3).astype(buf.dtype), mode="drop")

    out = paged.replace(
        pages=tuple(put(buf, x) for buf, x in zip(paged.pages, arrays, strict=True)),
        block_tables=tables,
        refcounts=refcounts,
        lengths=jnp.where(got, lengths, 0),
        errors=errors | jnp.where(got, 0, ERR_POOL_EXHAUSTED),
    )
    return out, got, jnp.sum(need)
