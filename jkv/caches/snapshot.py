"""A cache copied to host memory (NumPy), of any format and layout: the stored arrays as ``[L, B, K, S', X]``
(``S'`` may be trimmed to the longest length), lengths, error bits, the capacity to restore into and the format.
A paged cache snapshots its logical contents (page sharing is not kept) and restores into fresh pages."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np


class Snapshot(NamedTuple):
    data: tuple[np.ndarray, ...]  # the format's arrays, [L, B, K, S', X] each
    lengths: np.ndarray  # int32[B]
    errors: np.ndarray  # int32[B]
    max_len: int
    format: Any  # a jkv.caches.formats.Format (bound to the spec's dtype)
    dtype: str  # the cache's spec.dtype


def take(data, lengths, errors, max_len: int, format, dtype, trim: bool) -> Snapshot:
    """A snapshot of contiguous arrays ``[L, B, K, S, X]``; with ``trim`` only the first ``max(lengths)``
    positions are kept."""
    lengths = np.asarray(lengths).copy()
    keep = max(int(lengths.max(initial=0)), 1) if trim else max_len
    host = tuple(np.asarray(x) for x in _first(tuple(data), keep))
    return Snapshot(host, lengths, np.asarray(errors).copy(), max_len, format, np.dtype(dtype).name)


@jax.jit(static_argnums=1)  # one program per kept length for all the arrays, not one eager slice per array
def _first(data, keep: int):
    return tuple(x[:, :, :, :keep] for x in data)


def padded(snap: Snapshot, max_len: int | None) -> tuple[tuple[np.ndarray, ...], int]:
    """The snapshot's arrays padded back to ``max_len`` (default its own), and that capacity."""
    if not isinstance(snap, Snapshot):
        raise TypeError(f"snap must be a jkv.caches.Snapshot, got {type(snap).__name__}")
    max_len = snap.max_len if max_len is None else max_len
    kept = snap.data[0].shape[3]
    if kept > max_len or int(snap.lengths.max(initial=0)) > max_len:
        raise ValueError(f"snapshot holds {kept} positions (lengths {snap.lengths}), above {max_len=}")
    pad = [(0, 0)] * 3 + [(0, max_len - kept), (0, 0)]
    return tuple(np.pad(x, pad) for x in snap.data), max_len
