"""The serving scheduler on the host alone: token budget, chunking order, buckets, pages (prefix sharing, no leak,
no deadlock when the pool is short)."""

import numpy as np
import pytest

from jkv.serving.scheduler import HostPages, Scheduler, Sequence, token_buckets


@pytest.mark.parametrize(
    "budget, slots, want",
    [
        (2048, 64, (64, 128, 256, 512, 1024, 2048)),
        (256, 8, (8, 16, 32, 64, 128, 256)),
        (100, 3, (4, 8, 16, 32, 64, 100)),
        (8, 16, (8,)),
        (1, 1, (1,)),
    ],
)
def test_token_buckets(budget, slots, want):
    assert token_buckets(budget, slots) == want
    assert len(want) <= 8


def seq(i, prompt_len, new=4, max_len=64):
    return Sequence(i, prompt_len, min(prompt_len + new - 1, max_len))


def test_decodes_first_then_prefills_longest_waiting_first_and_chunks():
    s = Scheduler(num_slots=4, max_batch_tokens=8, max_len=64)
    for i, n in enumerate((11, 3, 6)):
        s.add(seq(i, n))
    plan = s.schedule(lambda q: 1)
    # Request 0 alone fills the budget (8 of its 11 prompt tokens); the others wait for a later step.
    assert [(e.seq.id, e.start, e.count, e.samples) for e in plan.entries] == [(0, 0, 8, False)]
    assert plan.counts.tolist() == [8, 0, 0, 0] and plan.bucket == 8 and [q.id for q in plan.admitted] == [0]
    plan = s.schedule(lambda q: 1)
    assert [(e.seq.id, e.start, e.count, e.samples) for e in plan.entries] == [
        (0, 8, 3, True),
        (1, 0, 3, True),
        (2, 0, 2, False),
    ]
    assert plan.counts.tolist() == [3, 3, 2, 0] and plan.num_tokens == 8 and plan.prefill_tokens == 8
    plan = s.schedule(lambda q: 1)  # the two finished prompts decode first, then request 2's prompt goes on
    assert [(e.seq.id, e.start, e.count) for e in plan.entries] == [(0, 11, 1), (1, 3, 1), (2, 2, 4)]
    assert plan.bucket == 8 and plan.prefill_tokens == 4


def test_budget_shorter_than_the_decoders_serves_the_least_recently_served_first():
    s = Scheduler(num_slots=4, max_batch_tokens=2, max_len=64)
    for i in range(4):
        s.add(seq(i, 1, new=4))  # at most 4 positions each
    served = []
    for _ in range(8):
        plan = s.schedule(lambda q: 3)  # each asks for a verification of 3; the budget cuts it
        assert plan.num_tokens <= 2
        served.append([(e.seq.id, e.count) for e in plan.entries])
    assert served == [
        [(0, 1), (1, 1)],  # prompts of one token, two per step
        [(0, 2)],  # decoders before new prompts, drafts cut to the budget
        [(1, 2)],  # the one left out goes first
        [(0, 1), (1, 1)],  # both reach their last position
        [(2, 1), (3, 1)],  # nothing decodes any more: the waiting requests come in
        [(2, 2)],
        [(3, 2)],
        [(2, 1), (3, 1)],
    ]


def test_prefix_hits_attach_whole_pages_and_skip_those_tokens():
    s = Scheduler(num_slots=2, max_batch_tokens=64, max_len=64, page_size=4, num_pages=16)
    s.add(seq(0, 10))
    plan = s.schedule(lambda q: 1)
    first = plan.entries[0].seq
    assert len(first.pages) == 3 and s.pages.in_use == 3
    pinned = s.pin(first, 2)  # a prefix-cache entry holds the first two pages
    s.add(seq(1, 12))
    plan = s.schedule(lambda q: 1, admit=lambda q: (8, pinned))
    second = plan.admitted[0]
    assert [(e.seq.id, e.start, e.count) for e in plan.entries] == [(0, 10, 1), (1, 8, 4)]
    assert second.pages[:2] == pinned and second.cached == 8 and s.pages.in_use == 3 + 1
    assert s.pages.refcounts[pinned[0]] == 3  # first's table, the pin, second's table
    s.finish(first)
    s.finish(second)
    assert s.pages.in_use == 2 and s.reserved == 0
    s.unpin(pinned)
    assert s.pages.in_use == 0 and not s.pages.refcounts
    with pytest.raises(ValueError, match="must be whole pages"):
        s.add(seq(2, 12))
        s.schedule(lambda q: 1, admit=lambda q: (6, pinned))


def test_requests_that_cannot_fit_wait_in_order_and_errors():
    s = Scheduler(num_slots=4, max_batch_tokens=64, max_len=64, page_size=4, num_pages=6)
    s.add(seq(0, 10, new=7))  # 16 positions: 4 pages reserved
    s.add(seq(1, 5, new=4))  # 8 positions: 2 pages, fits beside it
    s.add(seq(2, 1, new=1))  # 1 page: must wait (the pool is fully reserved), and so must what follows
    s.add(seq(3, 1, new=1))
    plan = s.schedule(lambda q: 1)
    assert [q.id for q in plan.admitted] == [0, 1] and s.reserved + s.pages.in_use == 6
    s.finish(plan.admitted[1])
    plan = s.schedule(lambda q: 1)
    assert [q.id for q in plan.admitted] == [2, 3]
    with pytest.raises(ValueError, match="need 7 pages, the pool has 6"):
        s.add(seq(9, 25))
    with pytest.raises(ValueError, match="prompt_len=0"):
        s.add(Sequence(9, 0, 4))
    with pytest.raises(RuntimeError, match="3 pages asked, 2 free"):
        HostPages(2).allocate(3)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_random_traffic_finishes_every_request_and_leaks_nothing(paged):
    """1,000 requests, random lengths, speculation, prefix pins and cancellations through a small pool: every
    request ends, and slots, pages and pins all come back."""
    rng = np.random.default_rng(0)
    ps = 4
    s = Scheduler(3, 16, 48, page_size=ps if paged else None, num_pages=20 if paged else None)
    new, entries, done, pending = {}, [], 0, 0

    def make_room():
        if not entries:
            return False
        s.unpin(entries.pop(0)[1])
        return True

    def admit(q):
        if not paged or not entries or rng.random() < 0.5:
            return 0, []
        n_pages, ids = entries[-1]
        n = min(n_pages, (q.prompt_len - 1) // ps)
        return n * ps, ids[:n]

    while done < 1000:
        while pending < 1000 and len(s.waiting) < 4:
            prompt = int(rng.integers(1, 30))
            q = Sequence(pending, prompt, min(prompt + int(rng.integers(1, 8)) - 1, 48))
            new[q.id] = 0
            s.add(q)
            pending += 1
        if rng.random() < 0.05 and s.waiting:  # cancel a waiting request
            s.finish(s.waiting[-1])
            done += 1
        plan = s.schedule(lambda q: int(rng.integers(1, 4)), admit, make_room)
        assert plan is not None, "nothing could run: deadlock"
        assert plan.num_tokens <= 16 and plan.bucket in s.buckets and plan.bucket >= plan.num_tokens
        if paged:
            assert s.pages.free >= s.reserved
        for e in plan.entries:
            q = e.seq
            assert q.computed <= q.max_positions and plan.counts[q.slot] == e.count
            if e.samples and e.start >= q.prompt_len and e.count > 1:  # a verification: keep a random part
                s.rollback(q, e.start + int(rng.integers(1, e.count + 1)))
            if e.samples:
                new[q.id] += 1
            if paged and e.samples and e.start < q.prompt_len and q.prompt_len >= ps and rng.random() < 0.3:
                n_pages = q.prompt_len // ps
                entries.append((n_pages, s.pin(q, n_pages)))
            if q.computed >= q.max_positions or rng.random() < 0.03:  # finished, or cancelled mid-way
                s.finish(q)
                done += 1
        while len(entries) > 3:
            make_room()
    assert not s.running and not s.waiting and s.reserved == 0
    if paged:
        while make_room():
            pass
        assert s.pages.in_use == 0 and not s.pages.refcounts
