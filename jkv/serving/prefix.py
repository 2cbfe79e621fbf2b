"""Prefix cache: reuse the KV entries of a prompt's longest cached prefix instead of recomputing them.

Entries are whatever the caller stores for a prefilled prompt (the engine keeps a trimmed one-sequence cache on
the device, or, for a paged cache, the prompt's pinned pages; ``KVCache.snapshot`` gives a host-side copy
instead), keyed by the token ids they hold. A lookup matches the longest *common* prefix with any entry, not only
entries that are whole prefixes of the new prompt: keys and values at a position depend only on the tokens up to
it, so an entry for ``system + question A`` serves ``system + question B`` for the ``system`` part. The cache is
bounded by a byte budget and evicts the least recently used entries first, telling ``on_evict``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """LRU map from token sequences to snapshots, bounded by ``max_bytes`` of snapshot data.

    ``min_tokens``: the shortest match a lookup reports (shorter common prefixes are misses). ``on_evict(snapshot)``
    is called for every entry that leaves the cache (eviction or ``clear``), e.g. to free the pages it holds.
    """

    def __init__(self, max_bytes: int, min_tokens: int = 1, on_evict: Callable[[Any], None] | None = None):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        if not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens must be a positive int, got {min_tokens!r}")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.on_evict = on_evict
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[Any, int]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries

    def lookup(self, tokens: Sequence[int]) -> tuple[int, Any]:
        """The entry sharing the longest common prefix with ``tokens``: ``(that length, its snapshot)``, or
        ``(0, None)`` when no entry shares ``min_tokens`` or more. Ties go to the most recently used entry."""
        tokens = tuple(tokens)
        best, best_key = 0, None
        for key in reversed(self._entries):  # most recent first: a tie keeps the first found
            n = common_prefix_length(key, tokens)
            if n > best:
                best, best_key = n, key
        if best_key is None or best < self.min_tokens:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        return best, self._entries[best_key][0]

    def insert(self, tokens: Sequence[int], snapshot: Any, nbytes: int) -> bool:
        """Store ``snapshot`` (of ``nbytes``) for ``tokens``, evicting LRU entries to fit; True if stored.

        False, with ``snapshot`` not kept (the caller still owns it), when it is larger than the whole budget,
        shorter than ``min_tokens``, or ``tokens`` already has an entry (which is kept and becomes most recent).
        """
        tokens = tuple(tokens)
        if tokens in self._entries:
            self._entries.move_to_end(tokens)
            return False
        if len(tokens) < self.min_tokens or nbytes > self.max_bytes:
            return False
        while self.bytes + nbytes > self.max_bytes:
            self.evict_lru()
        self._entries[tokens] = (snapshot, nbytes)
        self.bytes += nbytes
        return True

    def evict_lru(self) -> bool:
        """Drop the least recently used entry (through ``on_evict``); False when there is none."""
        if not self._entries:
            return False
        _, (old, freed) = self._entries.popitem(last=False)
        self.bytes -= freed
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(old)
        return True

    def clear(self) -> None:
        """Drop every entry (each goes through ``on_evict``)."""
        entries = list(self._entries.values())
        self._entries.clear()
        self.bytes = 0
        if self.on_evict is not None:
            for snapshot, _ in entries:
                self.on_evict(snapshot)
