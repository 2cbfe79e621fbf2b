"""No sequence reads a position it did not write or share (issue 19, deliverable 3).

A hypothesis state machine drives a small cache through admit / step / fork / rollback / retire / reuse (and, paged,
pin / unpin / prefix-shared admission) through the public API. After every rule every position no sequence owns
(a free page; a position past a sequence's length, or past a pinned prefix's) is overwritten with NaN, and the
machine goes on WITH that poisoned cache, so later steps must never read it. Then one probe step of count 1
(``begin(1)``, every layer written, ``jkv.attend`` of a random query per layer; not committed) must give, for every
sequence it served, a finite output equal to a float64 NumPy attention over that sequence's own tokens as the model
tracks them. A freed page still named by a stale table entry, a page handed to two sequences, or a masked
position leaking into a softmax shows up as NaN or as a foreign token.
"""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import REL_TOL, rel_err
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import jkv

PAGE = 4
SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, max_len=16, dtype=jnp.float32)
HEADS = 4  # query heads: two per kv head (GQA)
BATCH = 3
PAGES = 9  # fewer than BATCH * 4: admissions and steps run out of pages
SINGLE_LEN = 8  # max_len of the prefill caches that admit sequences
SETTINGS = settings(
    max_examples=30,
    stateful_step_count=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
KV_SHAPE = (SPEC.num_layers, SPEC.num_kv_heads, SPEC.head_dim)  # one position of one sequence


def _write_layers(cache, k, v):
    for layer in range(SPEC.num_layers):
        cache = cache.write(layer, k[layer], v[layer])
    return cache


def _probe(cache, k, v, q, impl):
    """One uncommitted step of count 1: ``(outputs [L, B, N, D], counts [B])``."""
    cache = _write_layers(cache.begin(1), k, v)
    outs = [jkv.attend(q[layer], cache, layer, impl=impl)[:, 0] for layer in range(SPEC.num_layers)]
    return jnp.stack(outs), cache.counts


_probes = {impl: jax.jit(lambda c, k, v, q, impl=impl: _probe(c, k, v, q, impl)) for impl in ("xla", "pallas")}
_step = jax.jit(lambda c, k, v, n: _write_layers(c.begin(n), k, v).commit())
_rollback = jax.jit(lambda c, n: c.rollback(n))
_reset_slot = jax.jit(lambda c, i: c.reset_slot(i))
_insert = jax.jit(lambda c, i, s: c.insert_into_slot(i, s))
_extract = jax.jit(lambda c, i: c.extract_slot(i))
_fork = jax.jit(lambda c, s, d: c.fork(s, d))
_pin = jax.jit(lambda c, i, n: c.pin(i, n))
_unpin = jax.jit(lambda c, pages: c.unpin(pages))
_insert_shared = jax.jit(lambda c, i, s, pages, n: c.insert_into_slot(i, s, prefix=(pages, n)))
_clear = jax.jit(lambda c: c.clear_errors())


@jax.jit
def _poison_paged(cache, owned):  # owned [P, page_size]
    keep = owned[None, :, None, :, None]
    return cache.replace(pages=tuple(jnp.where(keep, x, jnp.nan) for x in cache.pages))


@jax.jit
def _poison_contiguous(cache):
    keep = jnp.arange(cache.max_len)[None, :] < cache.lengths[:, None]  # [B, S]
    return cache.replace(data=tuple(jnp.where(keep[None, :, None, :, None], x, jnp.nan) for x in cache.data))


def _single(k, v, length):
    """A one-sequence contiguous float32 cache of ``k``, ``v`` ``[S, L, K, D]`` and length ``length``."""
    to_cache = lambda x: jnp.asarray(np.transpose(x, (1, 2, 0, 3))[:, None], jnp.float32)  # [L, 1, K, S, D]
    zeros = jnp.zeros(1, jnp.int32)
    spec = SPEC.replace(max_len=k.shape[0])
    return jkv.KVCache(
        (to_cache(k), to_cache(v)), jnp.asarray([length], jnp.int32), zeros, zeros, spec=spec, format=jkv.Plain()
    )


def reference(q, k, v):
    """Float64 causal attention of one query ``q [L, N, D]`` over ``k``, ``v`` ``[S, L, K, D]`` (all positions)."""
    group = HEADS // SPEC.num_kv_heads
    k = np.repeat(k.astype(np.float64), group, axis=2)  # [S, L, N, D]
    v = np.repeat(v.astype(np.float64), group, axis=2)
    scores = np.einsum("lnd,slnd->lns", q.astype(np.float64), k) * SPEC.head_dim**-0.5
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.einsum("lns,slnd->lnd", p / p.sum(axis=-1, keepdims=True), v)


class NoForeignReads(RuleBasedStateMachine):
    """The rules and checks both layouts share; the model is each sequence's own tokens ``[S, L, K, D]``."""

    impls = ("xla",)

    @initialize()
    def start(self):
        self.cache = self.new_cache()
        self.lengths = [0] * BATCH
        self.k = np.full((BATCH, SPEC.max_len, *KV_SHAPE), np.nan, np.float32)  # NaN: never written
        self.v = np.full_like(self.k, np.nan)
        self.rng = np.random.default_rng(0)

    def _randn(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def _accept(self, expected):
        """Take the cache's lengths, which must each be the model's or the one ``expected`` (a refused step or
        admission leaves an error bit; cleared here)."""
        got = np.asarray(self.cache.lengths).tolist()
        for b in range(BATCH):
            assert got[b] in (self.lengths[b], expected[b]), (b, got, self.lengths, expected)
        self.cache = _clear(self.cache)
        return got

    # ------------------------------------------------------------------ operations
    @rule(t=st.sampled_from([1, 3, 6]), advance=st.lists(st.booleans(), min_size=BATCH, max_size=BATCH))
    def grow(self, t, advance):
        k = self._randn(SPEC.num_layers, BATCH, SPEC.num_kv_heads, t, SPEC.head_dim)
        v = self._randn(*k.shape)
        n = np.where(advance, t, 0).astype(np.int32)
        self.cache = _step(self.cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(n))
        got = self._accept([self.lengths[b] + int(n[b]) for b in range(BATCH)])
        for b in range(BATCH):
            if got[b] > self.lengths[b]:
                start = self.lengths[b]
                self.k[b, start : start + t] = k[:, b].transpose(2, 0, 1, 3)  # (T, L, K, D)
                self.v[b, start : start + t] = v[:, b].transpose(2, 0, 1, 3)
        self.lengths = got

    @rule(data=st.data())
    def rollback(self, data):
        self.lengths = [data.draw(st.integers(0, n)) for n in self.lengths]
        self.cache = _rollback(self.cache, jnp.asarray(self.lengths, jnp.int32))

    @rule(slot=st.integers(0, BATCH - 1))
    def retire(self, slot):
        self.cache = _reset_slot(self.cache, slot)
        self.lengths[slot] = 0

    @rule(slot=st.integers(0, BATCH - 1), n=st.integers(0, SINGLE_LEN))
    def admit(self, slot, n):
        k, v = self._randn(SINGLE_LEN, *KV_SHAPE), self._randn(SINGLE_LEN, *KV_SHAPE)
        k[n:] = v[n:] = np.nan  # past its length the prefill cache holds garbage: never to be read
        self.cache = _insert(self.cache, slot, _single(k, v, n))
        expected = list(self.lengths)
        expected[slot] = n
        self.lengths[slot] = 0  # a refused admission leaves the slot empty
        self.lengths = self._accept(expected)
        if self.lengths[slot] == n:
            self.k[slot, :SINGLE_LEN], self.v[slot, :SINGLE_LEN] = k, v

    def _copy_model(self, src, dst):
        self.lengths[dst] = self.lengths[src]
        self.k[dst], self.v[dst] = self.k[src], self.v[src]

    # ------------------------------------------------------------------ checks after every rule
    def owned(self):
        """``[P, page_size]`` (paged) positions some sequence or pin owns; None for a contiguous cache."""
        return None

    @invariant()
    def poisoned_cache_reads_only_own_tokens(self):
        if not hasattr(self, "cache"):
            return
        assert np.asarray(self.cache.lengths).tolist() == self.lengths
        owned = self.owned()
        self.cache = _poison_contiguous(self.cache) if owned is None else _poison_paged(self.cache, owned)
        k = self._randn(SPEC.num_layers, BATCH, SPEC.num_kv_heads, 1, SPEC.head_dim)
        v = self._randn(*k.shape)
        q = self._randn(SPEC.num_layers, BATCH, 1, HEADS, SPEC.head_dim)
        for impl in self.impls:
            out, counts = _probes[impl](self.cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(q))
            out, counts = np.asarray(out), np.asarray(counts)
            for b, n in enumerate(self.lengths):
                if not counts[b]:
                    assert n == SPEC.max_len or owned is not None, (impl, b, n, counts)  # only full, or no page
                    continue
                keys = np.concatenate([self.k[b, :n], k[:, b, :, 0][None]])  # (n + 1, L, K, D)
                values = np.concatenate([self.v[b, :n], v[:, b, :, 0][None]])
                want = reference(q[:, b, 0], keys, values)
                assert np.isfinite(want).all(), (b, n)  # the model itself holds only written tokens
                err = rel_err(out[:, b], want)  # asserts the output is finite
                assert err < REL_TOL["float32"], (impl, b, n, err)


class Contiguous(NoForeignReads):
    def new_cache(self):
        return jkv.KVCache.init(SPEC, BATCH)

    @rule(src=st.integers(0, BATCH - 1), dst=st.integers(0, BATCH - 1))
    def fork(self, src, dst):
        """A contiguous cache forks by copy: extract ``src``, insert into ``dst``."""
        self.cache = _insert(self.cache, dst, _extract(self.cache, src))
        self._copy_model(src, dst)


class Paged(NoForeignReads):
    impls = ("xla", "pallas")

    def new_cache(self):
        self.pinned = []  # prefix-cache entries: (device pages, length, k, v [n, L, K, D])
        return jkv.PagedKVCache.init(SPEC, BATCH, page_size=PAGE, num_pages=PAGES)

    @rule(src=st.integers(0, BATCH - 1), dst=st.integers(0, BATCH - 1))
    def fork(self, src, dst):
        self.cache = _fork(self.cache, src, dst)
        self._copy_model(src, dst)

    @rule(slot=st.integers(0, BATCH - 1), frac=st.floats(0, 1))
    def pin(self, slot, frac):
        """A prefix cache keeps the first n positions of a sequence (at most 2 entries: the pool stays usable)."""
        if len(self.pinned) >= 2:
            self.cache = _unpin(self.cache, self.pinned.pop(0)[0])
        n = int(frac * self.lengths[slot])
        self.cache, pages = _pin(self.cache, slot, n)
        self.pinned.append((pages, n, self.k[slot, :n].copy(), self.v[slot, :n].copy()))

    @rule(data=st.data())
    def unpin(self, data):
        if self.pinned:
            self.cache = _unpin(self.cache, self.pinned.pop(data.draw(st.integers(0, len(self.pinned) - 1)))[0])

    @rule(slot=st.integers(0, BATCH - 1), data=st.data(), t=st.integers(0, 6))
    def admit_shared(self, slot, data, t):
        """Admit a prompt whose first n positions are a pinned entry's pages, then t more from a prefill."""
        if not self.pinned:
            return
        pages, n_pin, pk, pv = self.pinned[data.draw(st.integers(0, len(self.pinned) - 1))]
        n = data.draw(st.integers(0, n_pin))
        t = min(t, SPEC.max_len - n)
        k, v = self._randn(SPEC.max_len, *KV_SHAPE), self._randn(SPEC.max_len, *KV_SHAPE)
        k[:n] = v[:n] = np.nan  # the shared positions must come from the pages, never from the prefill cache
        k[n + t :] = v[n + t :] = np.nan
        self.cache = _insert_shared(self.cache, slot, _single(k, v, n + t), pages, n)
        expected = list(self.lengths)
        expected[slot] = n + t
        self.lengths[slot] = 0
        self.lengths = self._accept(expected)
        if self.lengths[slot] == n + t:
            self.k[slot, :n], self.v[slot, :n] = pk[:n], pv[:n]
            self.k[slot, n : n + t], self.v[slot, n : n + t] = k[n : n + t], v[n : n + t]

    def owned(self):
        tables = np.asarray(self.cache.block_tables)
        owned = np.zeros((PAGES, PAGE), bool)
        rows = [(tables[b], n) for b, n in enumerate(self.lengths)] + [(np.asarray(p), n) for p, n, *_ in self.pinned]
        for row, n in rows:
            for s in range(n):
                assert row[s // PAGE] >= 0, (row, n)
                owned[row[s // PAGE], s % PAGE] = True
        owned[np.asarray(self.cache.refcounts) == 0] = False  # a free page is never read, whatever names it
        return jnp.asarray(owned)


def test_contiguous_never_reads_foreign_positions():
    run_state_machine_as_test(Contiguous, settings=SETTINGS)


def test_paged_never_reads_foreign_positions():
    run_state_machine_as_test(Paged, settings=SETTINGS)
