"""The page allocator of paged caches, as pure functions on ``block_tables [B, M]``, ``refcounts [P]`` and
``pins [P]`` (all jit-able; nothing here knows what a page holds).

``refcounts[p]`` counts the references to page ``p``: the block-table entries naming it (over all sequences) plus
``pins[p]``, the references held outside the tables (how a prefix cache keeps a prompt's pages after its sequence
retires). A page is free exactly when its count is 0: the free list is *derived* from the counts (ascending page
order, by a prefix sum), never kept as a second structure that could disagree, so a page can never be handed out
while a table names it, nor freed twice. Allocation is all-or-nothing per sequence, in batch order. A page shared
by several sequences (``fork``, a pinned prefix) is copied before it is written (copy-on-write); only the page
holding position ``lengths[b]`` can be in that state, because a sequence shares only pages of its valid prefix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array

NO_PAGE = -1  # block-table entry of a logical page that has no physical page

# Each function is jitted: a cache operation called eagerly then compiles it once, not each of its primitives.
_static = lambda *names: functools.partial(jax.jit, static_argnames=names)


def cdiv(a, b):
    return (a + b - 1) // b


@jax.jit
def release(tables: Array, refcounts: Array, drop: Array) -> tuple[Array, Array]:
    """Drop the table entries where ``drop [B, M]`` holds, giving one reference back per entry."""
    p = refcounts.shape[0]
    pages = jnp.where(drop & (tables >= 0), tables, p)  # P: no page
    return jnp.where(drop, NO_PAGE, tables), refcounts.at[pages.ravel()].add(-1, mode="drop")


@jax.jit
def allocate(tables: Array, refcounts: Array, need: Array) -> tuple[Array, Array, Array, Array]:
    """Give every entry where ``need [B, M]`` holds a fresh page, all-or-nothing per sequence.

    Returns tables, refcounts, ``got [B]`` (request met or empty) and ``fresh [B, M]`` (the new page of each
    served entry, ``P`` elsewhere). An entry's old page is *not* released (copy-on-write copies from it first).
    """
    p = refcounts.shape[0]
    count = jnp.sum(need, axis=1, dtype=jnp.int32)
    free = refcounts == 0
    got = (jnp.cumsum(count) <= jnp.sum(free, dtype=jnp.int32)) | (count == 0)
    need = need & got[:, None]
    free_list = jnp.nonzero(free, size=p, fill_value=p)[0]  # ascending free pages, padded with P
    rank = jnp.cumsum(need.ravel()).reshape(need.shape) - 1
    fresh = jnp.where(need, free_list[jnp.clip(rank, 0, p - 1)], p)
    return jnp.where(need, fresh, tables), refcounts.at[fresh.ravel()].add(1, mode="drop"), got, fresh


@_static("page_size")
def reserve(tables, refcounts, lengths, target, page_size: int):
    """Pages for positions ``[lengths[b], target[b])`` (``target <= M * page_size``): allocate the missing ones and
    a fresh copy of a shared one. Returns tables, refcounts, ``got [B]`` and the copies to make ``(src, dst)``
    ``[B]`` (``P`` where none; the source's reference is already given back). Idempotent."""
    p, (b, m) = refcounts.shape[0], tables.shape
    rows = jnp.arange(b)
    grow = target > lengths
    first = lengths // page_size  # the page holding position lengths[b]
    at = jnp.minimum(first, m - 1)
    j = jnp.arange(m)[None, :]
    in_range = grow[:, None] & (j >= first[:, None]) & (j < cdiv(target, page_size)[:, None])

    # Only the page at `first` can be shared. When every sequence naming it writes into it in this same call
    # (forked samples decoding together), the first of them keeps it: one copy fewer.
    page = tables[rows, at]
    refs = refcounts[jnp.clip(page, 0, p - 1)]
    shared = in_range[rows, at] & (page >= 0) & (refs > 1)
    page = jnp.where(shared, page, p)  # [B], P where not shared
    pc = jnp.clip(page, 0, p - 1)
    writers = jnp.zeros(p, jnp.int32).at[page].add(1, mode="drop")
    lead = jnp.full(p, b, jnp.int32).at[page].min(rows, mode="drop")
    keeps = shared & (writers[pc] == refs) & (lead[pc] == rows)
    cow = shared & ~keeps
    need = in_range & ((tables < 0) | (cow[:, None] & (j == first[:, None])))
    tables, refcounts, got, fresh = allocate(tables, refcounts, need)
    # A keeper writes only once every other sharer has moved off its page; else it waits (flagged by the caller)
    # and gives back what it was just given (all or nothing).
    stuck = jnp.zeros(p, jnp.int32).at[jnp.where(cow & ~got, page, p)].add(1, mode="drop")
    stuck = keeps & (stuck[pc] > 0)
    tables, refcounts = release(tables, refcounts, need & stuck[:, None])
    got = got & ~stuck
    cow = cow & got
    src = jnp.where(cow, page, p)
    dst = jnp.where(cow, fresh[rows, at], p)
    return tables, refcounts.at[src].add(-1, mode="drop"), got, src, dst


@_static("page_size")
def servable(tables, refcounts, lengths, target, behind, page_size: int):
    """``[B]``: the sequences whose ``reserve`` up to ``target`` is served when only served sequences give back
    their entries where ``behind [B, M]`` (a ring's pages out of reach): a refused one keeps them. Counted
    conservatively (a shared page is copied, a released one frees only if this entry was its sole reference), so
    ``reserve`` after those releases serves every one of them; growing sequences are served in batch order up to
    the last one whose running balance of pages taken less pages given back fits the free pages."""
    p, (b, m) = refcounts.shape[0], tables.shape
    rows, j = jnp.arange(b), jnp.arange(m)[None, :]
    first = lengths // page_size
    in_range = (target > lengths)[:, None] & (j >= first[:, None]) & (j < cdiv(target, page_size)[:, None])
    page = tables[rows, jnp.minimum(first, m - 1)]
    shared = in_range[rows, jnp.minimum(first, m - 1)] & (page >= 0) & (refcounts[jnp.clip(page, 0, p - 1)] > 1)
    need = jnp.sum(in_range & (tables < 0), axis=1, dtype=jnp.int32) + shared
    sole = (tables >= 0) & (refcounts[jnp.clip(tables, 0, p - 1)] == 1)
    gives = jnp.sum(behind & sole, axis=1, dtype=jnp.int32)
    grows = need > 0
    free = jnp.sum(refcounts == 0, dtype=jnp.int32) + jnp.sum(jnp.where(grows, 0, gives))
    balance = jnp.cumsum(jnp.where(grows, need - gives, 0))
    last = jnp.max(jnp.where(grows & (balance <= free), rows, -1))
    return ~grows | (rows <= last)


def copy_pages(pools: tuple[Array, ...], src: Array, dst: Array) -> tuple[Array, ...]:
    """Copy-on-write of ``reserve``: page ``src[i]`` into page ``dst[i]`` of every pool ``[L, P, ...]`` (entries
    with ``src >= P`` copy nothing)."""
    num_pages = pools[0].shape[1]
    # No lax.cond around it: XLA gave a cond's result a buffer of its own (a second pool in the compiled step, as
    # tests/serving/test_step_memory.py found on a GPU); a dropped entry reads page P - 1 and writes nothing.
    return tuple(x.at[:, dst].set(x[:, jnp.clip(src, 0, num_pages - 1)], mode="drop") for x in pools)


@_static("page_size", "num_pages")
def logical_pages(tables: Array, slot: Array, positions: Array, page_size: int, num_pages: int) -> Array:
    """Physical page of position ``positions[i]`` of sequence ``slot[i]`` (any matching shapes); ``num_pages``
    where there is none (or past the table)."""
    m = tables.shape[1]
    j = positions // page_size
    pages = tables[slot, jnp.clip(j, 0, m - 1)]
    return jnp.where((j >= 0) & (j < m) & (pages >= 0), pages, num_pages)


@_static("page_size")
def fork(tables, refcounts, lengths, src, dst, act, page_size: int):
    """Sequence ``dst`` shares ``src``'s pages (where ``act``): its old references go back, each page of ``src``'s
    valid prefix gains one. Returns tables, refcounts and ``src``'s length."""
    b, m = tables.shape
    p = refcounts.shape[0]
    hit = (jnp.arange(b) == dst) & act
    tables, refcounts = release(tables, refcounts, jnp.broadcast_to(hit[:, None], tables.shape))
    length = lengths[src]
    shared = jnp.where(jnp.arange(m) < cdiv(length, page_size), tables[src], NO_PAGE)  # [M]
    added = jnp.where(act & (shared >= 0), shared, p)
    tables = jnp.where(hit[:, None], shared[None, :], tables)
    return tables, refcounts.at[added].add(1, mode="drop"), length


@jax.jit
def pin(refcounts, pins, row, covered):
    """One more reference (and pin) on each page of ``row [M]`` where ``covered``; returns them and the pages."""
    p = refcounts.shape[0]
    pages = jnp.where(covered, row, NO_PAGE)
    held = jnp.where(pages >= 0, pages, p)
    return refcounts.at[held].add(1, mode="drop"), pins.at[held].add(1, mode="drop"), pages


@jax.jit
def unpin_counts(pins: Array, pages: Array) -> tuple[Array, Array]:
    """``(drop [P], asked [P])``: references of ``pages`` to give back (at most what is pinned) and asked for."""
    p = pins.shape[0]
    held = jnp.where((pages >= 0) & (pages < p), pages, p)
    asked = jnp.zeros_like(pins).at[held].add(1, mode="drop")
    return jnp.minimum(asked, pins), asked


@_static("page_size", "max_len")
def attach(tables, refcounts, pins, hit, pages, length, page_size: int, max_len: int, first=0):
    """Give the sequence where ``hit [B]`` the pinned ``pages`` as its first ``length`` positions (its old
    references go back first; entries before page ``first`` are left out: a ring's). Returns tables, refcounts
    and ``valid`` (length in range, every page attached pinned)."""
    m, p = pages.shape[0], refcounts.shape[0]
    width = tables.shape[1]
    idx = jnp.clip(pages, 0, p - 1)
    covered = (jnp.arange(m) < cdiv(length, page_size)) & (jnp.arange(m) >= first)
    pinned = (pages >= 0) & (pages < p) & (pins[idx] > 0)
    valid = (length >= 0) & (length <= min(m * page_size, max_len)) & jnp.all(pinned | ~covered)
    row = (
        jnp.full((width,), NO_PAGE, jnp.int32)
        .at[: min(m, width)]
        .set(jnp.where(covered & valid, pages, NO_PAGE)[:width])
    )
    tables, refcounts = release(tables, refcounts, jnp.broadcast_to(hit[:, None], tables.shape))
    added = jnp.where(hit[:, None] & (row[None, :] >= 0), row[None, :], p)
    tables = jnp.where(hit[:, None], row[None, :], tables)
    return tables, refcounts.at[added.ravel()].add(1, mode="drop"), valid
