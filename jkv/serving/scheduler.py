"""The host side of the serving step: which tokens enter each step, under a token budget.

Every step carries at most ``max_batch_tokens`` tokens, taken in this order:

1. the next token (or ``k + 1`` speculative tokens) of every running sequence whose prompt is done, least recently
   served first (a verification cut by the budget keeps fewer drafts; a sequence left out goes first next time);
2. the next chunk of every prompt still being prefilled, longest-waiting first;
3. new requests, in arrival order, into free slots: each starts at its prefix-cache hit (``admit`` says how many
   positions it attached) and takes a chunk of what is left of the budget.

A prompt longer than the budget is split over steps. The step's token count is rounded up to one of a few static
buckets (``token_buckets``: powers of two up to the budget), so a handful of compiled steps serve every mix.

Pages. For a paged cache, ``HostPages`` mirrors the device allocator's reference counts with page ids of its own
(the device picks other ids; only the counts must agree), so the scheduler knows without a device read how many
pages are free. No deadlock, without preemption: a request is admitted only when the pages it could ever need (its
``max_positions``) fit in the free pages minus what the running sequences may still claim. A running sequence can
therefore always take its next step, runs to its end and gives its pages back; admission is first come, first
served (a request that does not fit waits, and the ones behind it wait too, so none starves). Before giving up,
admission asks ``make_room`` to evict prefix-cache entries.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def token_buckets(max_batch_tokens: int, num_slots: int) -> tuple[int, ...]:
    """Static tokens-per-step shapes: powers of two from ``num_slots`` (rounded up; a decode step of every slot)
    up to ``max_batch_tokens``, which is always the last."""
    if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
    low = min(1 << (num_slots - 1).bit_length(), max_batch_tokens)
    out = []
    while low < max_batch_tokens:
        out.append(low)
        low *= 2
    return (*out, max_batch_tokens)


class HostPages:
    """Reference counts of a page pool of ``num_pages`` pages, on the host (see the module docstring)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.refcounts: dict[int, int] = {}  # page id -> references; absent: free
        self._next = 0

    @property
    def in_use(self) -> int:
        return len(self.refcounts)

    @property
    def free(self) -> int:
        return self.num_pages - len(self.refcounts)

    def allocate(self, n: int) -> list[int]:
        if n > self.free:
            raise RuntimeError(f"HostPages: {n} pages asked, {self.free} free of {self.num_pages} (scheduler bug)")
        ids = list(range(self._next, self._next + n))
        self._next += n
        self.refcounts.update(dict.fromkeys(ids, 1))
        return ids

    def ref(self, ids) -> None:
        for p in ids:
            self.refcounts[p] += 1

    def unref(self, ids) -> None:
        for p in ids:
            left = self.refcounts[p] - 1
            if left:
                self.refcounts[p] = left
            else:
                del self.refcounts[p]


@dataclasses.dataclass(eq=False)
class Sequence:
    """The scheduler's view of one request: its prompt length, the cache positions it holds once the planned
    steps have run (``computed``), its slot and, for a paged cache, its pages."""

    id: int
    prompt_len: int
    max_positions: int  # cache positions it can ever hold: its page reservation
    slot: int = -1
    computed: int = 0
    cached: int = 0  # leading prompt positions attached from the prefix cache (never run)
    pages: list[int] = dataclasses.field(default_factory=list)  # host page ids of its block table
    shared: int = 0  # leading pages of ``pages`` attached from the prefix cache
    reserve: int = 0  # pages it may still allocate
    last_step: int = -1

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len


class Entry:
    """One sequence's part of a step: ``count`` tokens at positions ``start ..``; ``samples`` when the step's last
    token of it is a real next-token position (its prompt is done by the step)."""

    __slots__ = ("count", "samples", "seq", "start")

    def __init__(self, seq: Sequence, start: int, count: int):
        self.seq, self.start, self.count = seq, start, count
        self.samples = start + count >= seq.prompt_len

    def __repr__(self) -> str:
        return f"Entry(id={self.seq.id}, slot={self.seq.slot}, start={self.start}, count={self.count})"


@dataclasses.dataclass
class StepPlan:
    """What one step runs: ``entries`` in slot order, the per-slot ``counts``, the static ``bucket`` (tokens of
    the compiled step) and the sequences admitted for it."""

    index: int
    bucket: int
    entries: list[Entry]
    counts: np.ndarray  # int32[B]
    admitted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def prefill_tokens(self) -> int:
        return sum(min(e.count, max(e.seq.prompt_len - e.start, 0)) for e in self.entries)


class Scheduler:
    """Decides each step's tokens (``schedule``) and keeps slots and pages; see the module docstring.

    ``page_size`` / ``num_pages``: the paged cache's pool (``None``: a contiguous cache, every slot holds
    ``max_len`` positions and only slots limit admission). ``buckets``: the tokens-per-step shapes (default
    ``token_buckets``); a step runs in the smallest that holds its tokens. ``max_count``: most tokens of one
    sequence in a step (a contiguous cache plan's ring slack; prompts then take more chunks).
    """

    def __init__(
        self,
        num_slots: int,
        max_batch_tokens: int,
        max_len: int,
        *,
        page_size=None,
        num_pages=None,
        buckets=None,
        max_count: int | None = None,
    ):
        self.num_slots, self.max_len = num_slots, max_len
        self.max_count = max_batch_tokens if max_count is None else max_count  # tokens of one sequence per step
        self.max_batch_tokens = max_batch_tokens
        self.buckets = token_buckets(max_batch_tokens, num_slots) if buckets is None else tuple(sorted(buckets))
        if self.buckets[-1] < max_batch_tokens:
            raise ValueError(f"the largest of buckets={self.buckets} must hold max_batch_tokens={max_batch_tokens}")
        self.page_size = page_size
        self.pages = None if page_size is None else HostPages(num_pages)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.slots: list[Sequence | None] = [None] * num_slots
        self.steps = 0

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` (arrival order). Raises ``ValueError`` when it could never run."""
        if not 1 <= seq.prompt_len <= seq.max_positions <= self.max_len:
            raise ValueError(
                f"request {seq.id}: need 1 <= prompt_len={seq.prompt_len} <= max_positions={seq.max_positions} "
                f"<= max_len={self.max_len}"
            )
        if self.pages is not None and cdiv(seq.max_positions, self.page_size) > self.pages.num_pages:
            raise ValueError(
                f"request {seq.id}: {seq.max_positions} positions need {cdiv(seq.max_positions, self.page_size)} "
                f"pages, the pool has {self.pages.num_pages}"
            )
        self.waiting.append(seq)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def finish(self, seq: Sequence) -> None:
        """``seq`` is done or cancelled: its slot and pages go back (or it leaves the queue)."""
        if seq.slot < 0:
            self.waiting.remove(seq)
            return
        if self.slots[seq.slot] is not seq:
            raise ValueError(f"request {seq.id} does not hold slot {seq.slot}")
        self.slots[seq.slot] = None
        if self.pages is not None:
            self.pages.unref(seq.pages)
        seq.pages, seq.reserve, seq.slot = [], 0, -1

    def rollback(self, seq: Sequence, length: int) -> None:
        """``seq`` keeps only its first ``length`` positions (rejected drafts); pages past them go back."""
        if not seq.cached <= length <= seq.computed:
            raise ValueError(f"request {seq.id}: rollback to {length} outside [{seq.cached}, {seq.computed}]")
        seq.computed = length
        if self.pages is not None:
            keep = max(cdiv(length, self.page_size), seq.shared)
            dropped = seq.pages[keep:]
            self.pages.unref(dropped)
            seq.pages = seq.pages[:keep]
            seq.reserve += len(dropped)

    def pin(self, seq: Sequence, n_pages: int) -> list[int]:
        """One more reference on ``seq``'s first ``n_pages`` pages (a prefix-cache entry): their host ids."""
        ids = seq.pages[:n_pages]
        if len(ids) != n_pages:
            raise ValueError(f"request {seq.id} holds {len(seq.pages)} pages, fewer than {n_pages}")
        self.pages.ref(ids)
        return ids

    def unpin(self, ids) -> None:
        self.pages.unref(ids)

    @property
    def reserved(self) -> int:
        """Pages the running sequences may still allocate."""
        return sum(s.reserve for s in self.running)

    # ------------------------------------------------------------------ one step
    def schedule(
        self,
        want: Callable[[Sequence], int],
        admit: Callable[[Sequence], tuple[int, list[int]]] | None = None,
        make_room: Callable[[], bool] | None = None,
    ) -> StepPlan | None:
        """Plan the next step, or ``None`` when nothing can run.

        ``want(seq)``: tokens a running sequence whose prompt is done asks for (0: none this step, 1: decode,
        ``k + 1``: a verification); it may get fewer. ``admit(seq)``: called once ``seq`` holds a slot; returns
        ``(cached positions, their host page ids)`` from the prefix cache (``(0, [])`` on a miss).
        ``make_room()``: evict one prefix-cache entry; False when there is none.
        """
        budget = self.max_batch_tokens
        counts = np.zeros(self.num_slots, np.int32)
        entries: list[Entry] = []

        def take(seq: Sequence, n: int) -> None:
            nonlocal budget
            n = min(n, self.max_count)
            entries.append(Entry(seq, seq.computed, n))
            counts[seq.slot] = n
            budget -= n
            seq.computed += n
            seq.last_step = self.steps
            if self.pages is not None:
                new = cdiv(seq.computed, self.page_size) - len(seq.pages)
                if new > 0:
                    seq.pages += self.pages.allocate(new)
                    seq.reserve -= new
                    assert seq.reserve >= 0, f"request {seq.id} outgrew its page reservation"

        running = self.running
        decoding = sorted((s for s in running if not s.prefilling), key=lambda s: (s.last_step, s.id))
        for seq in decoding:
            n = min(want(seq), budget, seq.max_positions - seq.computed)
            if n > 0:
                take(seq, n)
        for seq in sorted((s for s in running if s.prefilling), key=lambda s: s.id):
            if budget > 0:
                take(seq, min(seq.prompt_len - seq.computed, budget))
        admitted = []
        while budget > 0 and self.waiting and None in self.slots and self._fits(self.waiting[0], make_room):
            seq = self.waiting.popleft()
            self._place(seq, admit)
            admitted.append(seq)
            take(seq, min(seq.prompt_len - seq.computed, budget))
        if not entries:
            return None
        self.steps += 1
        entries.sort(key=lambda e: e.seq.slot)
        total = int(counts.sum())
        bucket = next(b for b in self.buckets if b >= total)
        return StepPlan(self.steps - 1, bucket, entries, counts, admitted)

    def _fits(self, seq: Sequence, make_room) -> bool:
        if self.pages is None:
            return True
        need = cdiv(seq.max_positions, self.page_size)  # before any prefix hit: the hit only lowers it
        while self.pages.free - self.reserved < need:
            if make_room is None or not make_room():
                return False
        return True

    def _place(self, seq: Sequence, admit) -> None:
        seq.slot = self.slots.index(None)
        self.slots[seq.slot] = seq
        cached, ids = (0, []) if admit is None else admit(seq)
        if not 0 <= cached < seq.prompt_len:
            raise ValueError(f"request {seq.id}: a prefix hit of {cached} positions must leave a prompt token to run")
        seq.cached = seq.computed = cached
        if self.pages is not None:
            if len(ids) != cdiv(cached, self.page_size) or cached % self.page_size:
                raise ValueError(f"request {seq.id}: a prefix hit of {cached} positions must be whole pages {ids}")
            self.pages.ref(ids)
            seq.pages, seq.shared = list(ids), len(ids)
            seq.reserve = cdiv(seq.max_positions, self.page_size) - len(ids)
