"""Random multi-token steps for the multi-token kernel tests: flat query rows with gaps, caches with NaN wherever no
query reads, and paged pools with permuted, partly stale block tables."""

from typing import NamedTuple

import numpy as np


class Step(NamedTuple):
    """One step: sequence b's counts[b] queries sit in rows q_starts[b].. of a [T, ...] batch, at positions
    lengths[b]..; its queries read positions [first[b], lengths[b] + counts[b])."""

    tokens: int
    q_starts: np.ndarray
    lengths: np.ndarray
    counts: np.ndarray
    first: np.ndarray

    @property
    def ends(self):
        return self.lengths + self.counts

    def owned_rows(self) -> np.ndarray:
        owned = np.zeros(self.tokens, bool)
        for start, count in zip(self.q_starts, self.counts, strict=True):
            owned[start : start + count] = True
        return owned


def make_step(rng, counts, lengths, window=None, tokens=None) -> Step:
    """Rows of the sequences in a random order, with random gaps (padding rows) between and after them; ``tokens``
    fixes T (at least the rows used)."""
    counts, lengths = np.asarray(counts, np.int32), np.asarray(lengths, np.int32)
    q_starts = np.zeros_like(counts)
    row = int(rng.integers(0, 3))
    for b in rng.permutation(len(counts)):
        q_starts[b] = row
        row += int(counts[b]) + int(rng.integers(0, 3))
    first = np.zeros_like(lengths) if window is None else np.maximum(lengths - window + 1, 0)
    first = np.where(counts > 0, first, lengths)  # a sequence without queries reads nothing
    assert tokens is None or tokens >= row, (tokens, row)
    return Step(row if tokens is None else tokens, q_starts, lengths, counts, first)


def random_counts(rng, batch: int, tokens: int, most: int, max_len: int):
    """Counts in [0, most] (0 and 1 likely) that fit ``tokens`` rows with gaps, and lengths that fit ``max_len``."""
    counts = rng.choice([0, 1, 2, most // 2, most], size=batch)
    while counts.sum() + 2 * (batch + 1) > tokens:
        counts[rng.integers(batch)] //= 2
    lengths = rng.integers(0, max_len - counts + 1)
    return counts, lengths


def poisoned(x, step: Step) -> np.ndarray:
    """``x [B, K, S, X]`` (float64) with NaN at every position no query of its sequence reads."""
    x = np.array(x, np.float64)
    for b in range(x.shape[0]):
        x[b, :, : step.first[b]] = np.nan
        x[b, :, step.ends[b] :] = np.nan
    return x


def whole_cache(x, layers):
    """``x`` as layer ``layers[1]`` of an ``[L, ...]`` cache whose other layers are NaN (``layers`` None: ``x``)."""
    if layers is None:
        return x
    num_layers, layer = layers
    cache = np.full((num_layers, *x.shape), np.nan, x.dtype if x.dtype.kind == "f" else np.float64)
    cache[layer] = x
    return cache


def page_table(rng, step: Step, page_size: int, max_pages: int, spare: int = 3, num_pages: int | None = None):
    """A permuted table over ``num_pages`` pages (default: those read plus ``spare``): each page some query reads
    gets its own page; other entries are -1 or name one of the pages nobody owns (stale). Returns
    ``(tables, owned, num_pages)``, ``owned`` true at the entries whose page holds the sequence's positions."""
    batch = len(step.counts)
    read = [[j for j in range(max_pages) if j * page_size < step.ends[b] and (j + 1) * page_size > step.first[b]]
            for b in range(batch)]  # fmt: skip
    total = sum(len(r) for r in read)
    num_pages = total + spare if num_pages is None else num_pages
    assert num_pages > total, (num_pages, total)
    order = rng.permutation(num_pages)
    tables = np.where(rng.random((batch, max_pages)) < 0.5, -1, rng.choice(order[total:], (batch, max_pages)))
    owned = np.zeros((batch, max_pages), bool)
    used = 0
    for b, pages in enumerate(read):
        for j in pages:
            tables[b, j], owned[b, j] = order[used], True
            used += 1
    return tables.astype(np.int32), owned, num_pages


def paginate(x, tables, owned, num_pages: int, page_size: int):
    """Contiguous ``x [B, K, M * page_size, X]`` into NaN-filled pools ``[num_pages, K, page_size, X]`` (pages the
    table names copied in; spare pages stay NaN, so a read through a stale entry shows)."""
    _, kv_heads, _, width = x.shape
    pool = np.full((num_pages, kv_heads, page_size, width), np.nan)
    for b, j in zip(*np.nonzero(owned), strict=True):
        pool[tables[b, j]] = x[b, :, j * page_size : (j + 1) * page_size]
    return pool
