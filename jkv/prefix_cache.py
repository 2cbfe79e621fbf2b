"""Prefix cache: reuse the KV entries of a prompt's longest cached prefix instead of recomputing them.

Entries are whatever the caller stores for a prefilled prompt (the engine keeps a trimmed one-sequence cache on
the device; ``KVCache.snapshot`` gives a host-side copy instead), keyed by the token ids they hold. The cache is
bounded by a byte budget and evicts the least recently used entries first.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any


class PrefixCache:
    """LRU map from token prefixes to snapshots, bounded by ``max_bytes`` of snapshot data."""

    def __init__(self, max_bytes: int, min_tokens: int = 1):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        if not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens must be a positive int, got {min_tokens!r}")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
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
        """The longest cached prefix of ``tokens``: ``(its length, its snapshot)``, or ``(0, None)``."""
        tokens = tuple(tokens)
        best, best_key = 0, None
        for key in self._entries:
            n = len(key)
            if best < n <= len(tokens) and tokens[:n] == key:
                best, best_key = n, key
        if best_key is None:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        return best, self._entries[best_key][0]

    def insert(self, tokens: Sequence[int], snapshot: Any, nbytes: int) -> bool:
        """Store ``snapshot`` (of ``nbytes``) for ``tokens``; evict LRU entries to fit. False if it cannot fit."""
        tokens = tuple(tokens)
        if len(tokens) < self.min_tokens or nbytes > self.max_bytes:
            return False
        if tokens in self._entries:
            self._entries.move_to_end(tokens)
            return True
        while self.bytes + nbytes > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1
        self._entries[tokens] = (snapshot, nbytes)
        self.bytes += nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
