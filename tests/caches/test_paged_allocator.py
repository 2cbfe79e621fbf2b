"""10,000 random admit / step / fork / rollback / retire / pin / evict / shared-admit operations on a PagedKVCache,
each checked against a model.

The model is plain Python: each sequence holds a list of *abstract* page ids (a fork shares ids, a fresh page gets
a new id, copy-on-write swaps one id for a new one) and its logical contents as a NumPy array. After every step
the cache must agree with it:

* structure: the table names a physical page exactly where the model holds an id, and two entries name the same
  physical page exactly when the model gives them the same id (no live page shared without the model sharing it);
* counts: ``refcounts`` is the histogram of the table entries plus the pins (no page leaked, none freed twice),
  and the free pages are exactly ``P`` minus the model's live ids;
* flags: the exhausted-pool and overflow bits are set on exactly the sequences the model predicts;
* contents: every valid position of every sequence equals the model's (a contiguous reference).

Count: ``test_ten_thousand_operations`` runs ``run_state_machine_as_test`` with ``stateful_step_count=100`` and
``max_examples=102`` (99 operations an example after ``initialize``), and tops up with further rounds when
hypothesis has cut examples short, until the rules have run 10,000 operations. Every operation runs jitted
(compiled once per shape), as an engine runs them; the eager API and its errors are covered by
tests/caches/test_paged.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import jkv
from jkv.caches import ERR_POOL_EXHAUSTED, ERR_WRITE_OVERFLOW

PAGE = 4
SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=1, head_dim=2, max_len=16, dtype=jnp.float32)  # 4 pages a sequence
BATCH = 4
PAGES = 10  # fewer than BATCH * 4: the pool runs out often
SINGLE_LEN = 8  # max_len of the prefill caches that admit sequences
OPERATIONS, STEPS = 10_000, 100  # STEPS per hypothesis example, initialize included

# The step protocol: begin(n) (pages reserved once), every layer writes, commit. Writes are padded to T_MAX positions
# (a sequence writes its first n): one compiled step for every step size.
_step = jax.jit(lambda c, k, v, n: _with_errors(_write_layers(c.begin(n), k, v).commit()))
_rollback = jax.jit(lambda c, n: c.rollback(n))
_reset_slot = jax.jit(lambda c, i: c.reset_slot(i))
_fork = jax.jit(lambda c, s, d: c.fork(s, d))
_insert = jax.jit(lambda c, i, s: _with_errors(c.insert_into_slot(i, s)))
_pin = jax.jit(lambda c, i, n: c.pin(i, n))
_unpin = jax.jit(lambda c, pages: c.unpin(pages))
_insert_shared = jax.jit(lambda c, i, s, pages, n: _with_errors(c.insert_into_slot(i, s, prefix=(pages, n))))
T_MAX = 6
PINNED = 2  # prefix-cache entries held at most


def _with_errors(cache):
    """The cache with its error bits cleared, and the bits (checked against the model's, then forgotten)."""
    return cache.clear_errors(), cache.errors


def _observed(c, pinned_pages, pinned_lengths):
    """Everything the invariant reads: the allocator's arrays, the logical contents of layer arrays ``k``, and the
    contents of the ``PINNED`` pinned entries (``pinned_pages [PINNED, M]``, unused rows ``NO_PAGE``, length 0)."""
    pinned = [c.read_pinned(pages, n).data[0] for pages, n in zip(pinned_pages, pinned_lengths, strict=True)]
    return {
        "tables": c.block_tables,
        "refcounts": c.refcounts,
        "pins": c.pins,
        "lengths": c.lengths,
        "errors": c.errors,
        "free": c.num_free_pages(),
        "k": c.to_contiguous().data[0],
        "pinned": jnp.stack(pinned),
    }


# One program and one transfer: the observed arrays raveled into a float32 vector (integers here are < 2**24).
_observe = jax.jit(
    lambda *a: jnp.concatenate([x.ravel().astype(jnp.float32) for _, x in sorted(_observed(*a).items())])
)


@functools.cache
def _observed_shapes():
    cache = jkv.PagedKVCache.init(SPEC, BATCH, page_size=PAGE, num_pages=PAGES)
    pages = np.full((PINNED, cache.max_pages), -1, np.int32)
    return jax.eval_shape(_observed, cache, pages, np.zeros(PINNED, np.int32))


def _unravel(flat):
    """The dict of ``_observed`` from ``_observe``'s vector."""
    out, at = {}, 0
    for name, x in sorted(_observed_shapes().items()):
        out[name] = flat[at : at + x.size].reshape(x.shape).astype(x.dtype)
        at += x.size
    return out


def _write_layers(cache, k, v):
    for layer in range(SPEC.num_layers):
        cache = cache.write(layer, k[layer], v[layer])
    return cache


def _single(k, v, length):
    """A one-sequence contiguous float32 cache holding ``k``, ``v`` ``[L, 1, K, S, D]``, of length ``length``."""
    spec = SPEC.replace(max_len=k.shape[3])
    zeros = np.zeros(1, np.int32)  # NumPy leaves: the jitted operation takes them as they are
    lengths = np.asarray([length], np.int32)
    return jkv.KVCache((k, v), lengths, zeros, zeros, spec=spec, format=jkv.Plain(jnp.float32))


def cdiv(a, b):
    return -(-a // b)


class PagedModel(RuleBasedStateMachine):
    steps = 0  # operations run over the whole test, across examples (initialize not counted)

    @initialize()
    def start(self):
        self.cache = jkv.PagedKVCache.init(SPEC, BATCH, page_size=PAGE, num_pages=PAGES)
        self.rows = [[] for _ in range(BATCH)]  # abstract page ids held by each sequence, logical order
        self.lengths = [0] * BATCH
        self.values = np.full((BATCH, SPEC.max_len, SPEC.num_layers, SPEC.head_dim), np.nan)  # NaN: unknown
        self.errors = [0] * BATCH
        self.next_id = 0
        self.rng = np.random.default_rng(0)
        self.pinned = []  # prefix-cache entries: (abstract ids, length, values [n, L, D], device pages)

    # ------------------------------------------------------------------ model helpers
    def _fresh(self):
        self.next_id += 1
        return self.next_id

    def _live(self):
        return {i for row in self.rows for i in row} | {i for ids, *_ in self.pinned for i in ids}

    def _refs(self, page_id):
        return sum(row.count(page_id) for row in self.rows) + sum(ids.count(page_id) for ids, *_ in self.pinned)

    def _reserve(self, targets):
        """The allocator's contract: returns which sequences got their pages (see jkv/paged.py)."""
        first = [n // PAGE for n in self.lengths]  # the page holding position lengths[b]
        grow = [targets[b] > self.lengths[b] for b in range(BATCH)]
        shared = [grow[b] and first[b] < len(self.rows[b]) and self._refs(self.rows[b][first[b]]) > 1
                  for b in range(BATCH)]  # fmt: skip
        writers = {}  # shared page id -> the sequences writing into it now, in batch order
        for b in range(BATCH):
            if shared[b]:
                writers.setdefault(self.rows[b][first[b]], []).append(b)
        keeps = [False] * BATCH  # all sharers write at once: the first keeps the page, the others copy it
        for page_id, bs in writers.items():
            keeps[bs[0]] = len(bs) == self._refs(page_id)
        cow = [shared[b] and not keeps[b] for b in range(BATCH)]
        need = [0] * BATCH
        for b in range(BATCH):
            if grow[b]:
                need[b] = max(0, cdiv(targets[b], PAGE) - len(self.rows[b])) + int(cow[b])
        free = PAGES - len(self._live())
        got = [sum(need[: b + 1]) <= free or need[b] == 0 for b in range(BATCH)]  # batch order, all or nothing
        stuck = {self.rows[b][first[b]] for b in range(BATCH) if cow[b] and not got[b]}
        for b in range(BATCH):
            if keeps[b] and self.rows[b][first[b]] in stuck:
                got[b] = False  # a keeper waits until every other sharer has its copy
        for b in range(BATCH):
            if not got[b]:
                self.errors[b] |= ERR_POOL_EXHAUSTED
                continue
            if cow[b]:
                self.rows[b][first[b]] = self._fresh()
            while grow[b] and len(self.rows[b]) < cdiv(targets[b], PAGE):
                self.rows[b].append(self._fresh())
        return got

    # ------------------------------------------------------------------ operations
    @rule(t=st.sampled_from([1, 3, 6]), advance=st.lists(st.booleans(), min_size=BATCH, max_size=BATCH))
    def grow(self, t, advance):
        """A step: the sequences marked advance declare T new tokens (the others 0), every layer writes T
        positions (padded to T_MAX), commit. A sequence whose step passes max_len or finds no pages gets count 0
        and a flag."""
        type(self).steps += 1
        k = self.rng.standard_normal((SPEC.num_layers, BATCH, 1, T_MAX, SPEC.head_dim)).astype(np.float32)
        k[:, :, :, t:] = np.nan  # padding past the step's T: never stored
        n = np.where(advance, t, 0).astype(np.int32)
        self.cache, errors = _step(self.cache, k, -k, n)

        fits = [self.lengths[b] + int(n[b]) <= SPEC.max_len for b in range(BATCH)]
        got = self._reserve([self.lengths[b] + int(n[b]) * fits[b] for b in range(BATCH)])  # begin
        for b in range(BATCH):
            if not fits[b]:
                self.errors[b] |= ERR_WRITE_OVERFLOW
            elif n[b] and got[b]:
                start = self.lengths[b]
                self.values[b, start : start + t] = k[:, b, 0, :t].transpose(1, 0, 2)  # (T, L, D)
                self.lengths[b] += t
        self._check_errors(errors)

    @rule(data=st.data())
    def rollback(self, data):
        type(self).steps += 1
        new = [data.draw(st.integers(0, n)) for n in self.lengths]
        self.cache = _rollback(self.cache, np.asarray(new, np.int32))
        for b in range(BATCH):
            self.lengths[b] = new[b]
            del self.rows[b][cdiv(new[b], PAGE) :]

    @rule(slot=st.integers(0, BATCH - 1))
    def retire(self, slot):
        type(self).steps += 1
        self.cache = _reset_slot(self.cache, slot)
        self.rows[slot], self.lengths[slot], self.errors[slot] = [], 0, 0

    @rule(src=st.integers(0, BATCH - 1), dst=st.integers(0, BATCH - 1))
    def fork(self, src, dst):
        type(self).steps += 1
        self.cache = _fork(self.cache, src, dst)
        if src != dst:
            self.rows[dst] = list(self.rows[src][: cdiv(self.lengths[src], PAGE)])
            self.lengths[dst] = self.lengths[src]
            self.values[dst] = self.values[src]
            self.errors[dst] = self.errors[src]

    @rule(slot=st.integers(0, BATCH - 1), n=st.integers(0, SINGLE_LEN))
    def admit(self, slot, n):
        type(self).steps += 1
        k = self.rng.standard_normal((SPEC.num_layers, 1, 1, SINGLE_LEN, SPEC.head_dim)).astype(np.float32)
        single = _single(k, -k, n)
        self.cache, errors = _insert(self.cache, slot, single)
        self.rows[slot] = []
        if cdiv(n, PAGE) <= PAGES - len(self._live()):
            self.rows[slot] = [self._fresh() for _ in range(cdiv(n, PAGE))]
            self.lengths[slot], self.errors[slot] = n, 0
            self.values[slot, :SINGLE_LEN] = k[:, 0, 0].transpose(1, 0, 2)
        else:
            self.lengths[slot], self.errors[slot] = 0, ERR_POOL_EXHAUSTED
        self._check_errors(errors)

    @rule(slot=st.integers(0, BATCH - 1), frac=st.floats(0, 1))
    def pin(self, slot, frac):
        """A prefix cache keeps the first n positions of a sequence (at most 2 entries, so the pool stays usable)."""
        type(self).steps += 1
        if len(self.pinned) >= PINNED:
            self.unpin(0)
        n = int(frac * self.lengths[slot])
        self.cache, pages = _pin(self.cache, slot, n)
        pages = np.asarray(pages)
        ids = list(self.rows[slot][: cdiv(n, PAGE)])
        self.pinned.append((ids, n, self.values[slot, :n].copy(), pages))

    def unpin(self, i):
        pages = self.pinned.pop(i)[3]
        self.cache = _unpin(self.cache, pages)

    @rule(data=st.data())
    def evict(self, data):
        type(self).steps += 1
        if self.pinned:
            self.unpin(data.draw(st.integers(0, len(self.pinned) - 1)))

    @rule(slot=st.integers(0, BATCH - 1), data=st.data(), t=st.integers(0, 6))
    def admit_shared(self, slot, data, t):
        """Admit a prompt whose first n positions come from a pinned entry, then t more from a prefill."""
        type(self).steps += 1
        if not self.pinned:
            return
        ids, n_pin, values, pages = self.pinned[data.draw(st.integers(0, len(self.pinned) - 1))]
        n = data.draw(st.integers(0, n_pin))
        t = min(t, SPEC.max_len - n)
        k = self.rng.standard_normal((SPEC.num_layers, 1, 1, SPEC.max_len, SPEC.head_dim)).astype(np.float32)
        k[:, 0, 0, :n] = np.nan  # the shared positions must come from the pages, never from the prefill cache
        single = _single(k, -k, n + t)
        self.cache, errors = _insert_shared(self.cache, slot, single, pages, n)
        self.rows[slot] = list(ids[: cdiv(n, PAGE)])  # old pages given back, the prefix's attached
        self.lengths[slot], self.errors[slot] = n, 0
        got = self._reserve([n + t if b == slot else self.lengths[b] for b in range(BATCH)])[slot]
        if got:
            self.lengths[slot] = n + t
            self.values[slot, :n] = values[:n]
            self.values[slot, n : n + t] = k[:, 0, 0, n : n + t].transpose(1, 0, 2)
        else:
            self.rows[slot], self.lengths[slot] = [], 0
        self._check_errors(errors)

    def _check_errors(self, errors):
        """The operation's error bits (the cache has them cleared already) are the model's; both start over."""
        assert np.asarray(errors).tolist() == self.errors, (np.asarray(errors), self.errors)
        self.errors = [0] * BATCH

    # ------------------------------------------------------------------ checks after every step
    @invariant()
    def agrees_with_model(self):
        if not hasattr(self, "cache"):
            return
        pinned_pages = np.full((PINNED, self.cache.max_pages), -1, np.int32)
        pinned_lengths = np.zeros(PINNED, np.int32)
        for i, (_, n, _, pages) in enumerate(self.pinned):
            pinned_pages[i], pinned_lengths[i] = np.asarray(pages), n
        seen = _unravel(np.asarray(_observe(self.cache, pinned_pages, pinned_lengths)))
        tables, refcounts = seen["tables"], seen["refcounts"]
        assert seen["lengths"].tolist() == self.lengths
        assert seen["errors"].tolist() == self.errors  # every operation's bits were checked and cleared
        # Structure: physical pages where the model holds ids, shared exactly as the model shares ids.
        phys_of = {}
        for b, row in enumerate(self.rows):
            assert (tables[b] >= 0).tolist() == [j < len(row) for j in range(tables.shape[1])], (b, tables, row)
            for j, page_id in enumerate(row):
                assert phys_of.setdefault(page_id, tables[b, j]) == tables[b, j], "one id, two pages"
        assert len(set(phys_of.values())) == len(phys_of), "two ids, one page: a live page shared without a fork"
        # Counts: refcounts are the histogram of table entries; free pages are those no table names.
        for i, (ids, n, values, _) in enumerate(self.pinned):  # pinned pages: the model's ids, alive, contents kept
            pages = pinned_pages[i]
            assert (pages >= 0).tolist() == [j < len(ids) for j in range(len(pages))], (pages, ids)
            for j, page_id in enumerate(ids):
                assert phys_of.setdefault(page_id, pages[j]) == pages[j], "one id, two pages (pinned)"
            got = seen["pinned"][i][:, 0, 0, :n]  # (L, n, D)
            want = values.transpose(1, 0, 2)
            known = ~np.isnan(want)
            assert np.array_equal(got[known], want[known]), (i, got, want)
        assert len(set(phys_of.values())) == len(phys_of), "two ids, one page"
        hist = np.bincount(tables[tables >= 0], minlength=PAGES)
        pins = np.bincount([phys_of[i] for ids, *_ in self.pinned for i in ids], minlength=PAGES)
        assert np.array_equal(seen["pins"], pins), (seen["pins"], pins)
        assert np.array_equal(refcounts, hist + pins), (refcounts, hist, pins)
        assert int(seen["free"]) == PAGES - len(self._live())
        # Contents of every valid, known position, in every layer.
        k = seen["k"][:, :, 0]  # (L, B, S, D)
        for b, n in enumerate(self.lengths):
            want = self.values[b, :n].transpose(1, 0, 2)  # (L, n, D)
            known = ~np.isnan(want)
            assert np.array_equal(k[:, b, :n][known], want[known]), (b, k[:, b, :n], want)


def test_ten_thousand_operations():
    """Runs the machine until it has made 10,000 operations: rounds of ``ceil(left / 99)`` examples of 100 steps
    (the first step initializes; hypothesis cuts some examples short, so later rounds top up)."""
    PagedModel.steps = 0
    rounds = 0
    while PagedModel.steps < OPERATIONS:
        rounds += 1
        assert rounds <= 6, f"hypothesis ran only {PagedModel.steps} operations in 5 rounds"
        examples = -(-(OPERATIONS - PagedModel.steps) // (STEPS - 1))
        run_state_machine_as_test(
            PagedModel,
            settings=settings(
                max_examples=examples,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    assert PagedModel.steps >= OPERATIONS
