"""The engine's prefix cache: a ``PrefixCache`` of prompt prefixes whose entries live on the device.

A paged cache keeps an entry as the pinned pages of a prompt's whole pages (pinned right after the step that
completes the prompt; a hit attaches them to the new slot, shared, and the prompt runs from the first position
past them). Whole pages only: a hit never writes into a shared page, so no copy-on-write and the scheduler's page
count stays exact. A contiguous cache keeps a device copy of the prompt's positions (its length a power of two,
so few copy shapes compile); a hit copies it into the slot.

A cache plan's rings keep only ``window - 1 + slack`` positions behind a prompt's end: an entry of a prompt of
``P`` tokens then serves hits of at least ``P - slack`` positions (repeated prompts), shorter ones are misses.
"""

from __future__ import annotations

import weakref

from jkv.caches import KVCache
from jkv.serving import steps
from jkv.serving.prefix import PrefixCache


class Prefixes:
    """Prefix-cache entries of ``engine`` (its cache, steps and scheduler); ``per_token``: bytes of a position."""

    def __init__(self, engine, per_token: int):
        # Weak references both ways: an engine dropped by its user frees its device memory (cache pool, entries)
        # at once, not only when Python's cycle collector next runs.
        self.engine = weakref.proxy(engine)
        self.paged = steps.is_paged(engine.cache_kind)
        self.page_size = steps.PAGE_SIZE
        self.page_bytes = per_token * self.page_size
        evicted = weakref.WeakMethod(self._evicted)
        self.cache = PrefixCache(engine.options.prefix_cache_bytes, on_evict=lambda entry: evicted()(entry))
        if self.paged:  # what an attach hands the cache as the slot's sequence: nothing of it is written
            spec = engine.cache.spec.replace(max_len=self.page_size)
            self._empty = KVCache.init(spec, 1, format=engine.cache.format)

    def attach(self, prompt: list[int], slot: int) -> tuple[int, list[int]]:
        """Start slot ``slot`` from ``prompt``'s longest cached prefix: ``(positions, host page ids)``."""
        n, entry = self.cache.lookup(prompt)
        n = min(n, len(prompt) - 1)  # at least one prompt token runs, for the next-token logits
        if self.paged:
            n -= n % self.page_size
        if entry is None or n <= 0:
            return 0, []
        entry, length = entry
        slack = self.engine.window_slack
        if slack is not None and n < length - slack:  # the rings let go of what this shorter prefix reads
            return 0, []
        e = self.engine
        if self.paged:
            pages, ids = entry
            e.cache = e.steps.attach(e.cache, slot, pages, n, self._empty)
            return n, ids[: n // self.page_size]
        e.cache = e.steps.restore(e.cache, slot, entry, n)
        return n, []

    def remember(self, request) -> None:
        """Make ``request``'s prompt (now in its slot) an entry, unless one holds it already."""
        e, prompt, seq = self.engine, request.prompt, request.seq
        if self.paged:
            n = len(prompt) - len(prompt) % self.page_size
            key = prompt[:n]
            if n == 0 or key in self.cache:
                return
            e.cache, pages = e.steps.pin(e.cache, seq.slot, n)
            entry, nbytes = (pages, e.scheduler.pin(seq, n // self.page_size)), n // self.page_size * self.page_bytes
        else:
            key = prompt
            if key in self.cache:
                return
            entry = e.steps.extract(e.cache, seq.slot, steps.pow2_bucket(len(prompt), e.spec.max_len))
            nbytes = entry.nbytes
        if not self.cache.insert(key, (entry, len(prompt)), nbytes):
            self._evicted((entry, len(prompt)))

    def evict_one(self) -> bool:
        """Drop the least recently used entry (its pages go back); False when there is none."""
        return self.cache.evict_lru()

    def _evicted(self, entry) -> None:
        entry, _ = entry
        if self.paged:
            pages, ids = entry
            self.engine.cache = self.engine.steps.unpin(self.engine.cache, pages)
            self.engine.scheduler.unpin(ids)
