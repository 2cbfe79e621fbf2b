"""Random sequences of cache operations on every registered kind, checked against a plain NumPy model after every
step: ragged steps (begin / write every layer / commit, some past capacity), rollback, reset_slot, admission of a
prefilled sequence and snapshot round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import bound
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import jkv
from jkv.caches import ERR_WRITE_OVERFLOW

SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, max_len=16, dtype=jnp.float32)
BATCH = 3
T = 5  # every step writes [B, K, T, D] (counts up to T): one compiled step per kind


def _write_layers(cache, k, v):
    for layer in range(SPEC.num_layers):
        cache = cache.write(layer, k[layer], v[layer])
    return cache


# Jitted once per kind and shape, as a decode loop would be; the eager API is exercised by test_kinds.py.
_step = jax.jit(lambda c, n, k, v: _write_layers(c.begin(n), k, v).commit())
_rollback = jax.jit(lambda c, n: c.rollback(n))
_reset_slot = jax.jit(lambda c, i: c.reset_slot(i))
_insert = jax.jit(lambda c, i, s: c.insert_into_slot(i, s))
_layers = jax.jit(lambda c: [c.layer(layer, jnp.float32) for layer in range(SPEC.num_layers)])


def machine(kind: str):
    paged = jkv.caches.kind(kind).paged
    options = {"page_size": 4} if paged else {}
    layout = jkv.caches.registry.LAYOUTS[jkv.caches.kind(kind).layout]

    class CacheModel(RuleBasedStateMachine):
        """NumPy model: K/V ``[L, B, K, S, D]`` as written and lengths; positions below the lengths compared."""

        @initialize()
        def start(self):
            self.cache = jkv.make_cache(kind, SPEC, BATCH, **options)
            self.k = np.zeros((2, BATCH, 2, 16, 32))
            self.v = np.zeros((2, BATCH, 2, 16, 32))
            self.lengths = np.zeros(BATCH, np.int64)
            self.rng = np.random.default_rng(0)

        def _new(self, b, t):
            return self.rng.standard_normal((2, b, SPEC.num_kv_heads, t, SPEC.head_dim)).astype(np.float32)

        @rule(counts=st.lists(st.integers(0, 5), min_size=BATCH, max_size=BATCH))
        def ragged_step(self, counts):
            counts = np.asarray(counts)
            k, v = self._new(BATCH, T), self._new(BATCH, T)
            self.cache = _step(self.cache, counts.astype(np.int32), k, v)  # NumPy in: no eager conversions
            fits = self.lengths + counts <= SPEC.max_len
            for b in np.flatnonzero(fits):
                n, c = self.lengths[b], counts[b]
                self.k[:, b, :, n : n + c] = k[:, b, :, :c]
                self.v[:, b, :, n : n + c] = v[:, b, :, :c]
            self.lengths += np.where(fits, counts, 0)
            want = np.where(fits, 0, ERR_WRITE_OVERFLOW)
            np.testing.assert_array_equal(self.cache.errors, want)  # a refused step is flagged, nothing else
            self.cache = self.cache.clear_errors()

        @rule(data=st.data())
        def rollback(self, data):
            new = np.array([data.draw(st.integers(0, int(n))) for n in self.lengths])
            self.cache = _rollback(self.cache, new.astype(np.int32))
            self.lengths = new

        @rule(slot=st.integers(0, BATCH - 1))
        def reset_slot(self, slot):
            self.cache = _reset_slot(self.cache, slot)
            self.lengths[slot] = 0

        @rule(slot=st.integers(0, BATCH - 1), n=st.integers(0, 8))
        def insert_prefilled(self, slot, n):
            single = jkv.caches.kind(kind).single(SPEC.replace(max_len=8))
            k, v = self._new(1, 8), self._new(1, 8)
            single = _step(single, np.int32(n), k, v)
            self.cache = _insert(self.cache, slot, single)
            self.k[:, slot, :, :n] = k[:, 0, :, :n]
            self.v[:, slot, :, :n] = v[:, 0, :, :n]
            self.lengths[slot] = n

        @rule()
        def snapshot_roundtrip(self):
            self.cache = layout.restore(self.cache.snapshot(trim=True), **options)

        @invariant()
        def matches_model(self):
            np.testing.assert_array_equal(self.cache.lengths, self.lengths)
            assert not np.asarray(self.cache.errors).any()
            for layer, kv in enumerate(_layers(self.cache)):
                got = [np.asarray(x, np.float64) for x in kv]
                for b, n in enumerate(self.lengths):
                    for g, w in zip(got, (self.k, self.v), strict=True):
                        want = w[layer, b, :, :n]
                        assert (np.abs(g[b, :, :n] - want) <= bound(kind, want)).all(), (kind, layer, b)

    return CacheModel


@pytest.mark.parametrize("kind", jkv.kinds())
def test_random_operations_match_the_model(kind):
    model = machine(kind)
    # The float32 kind at the full count (500 operations); the others (same code paths, other formats) at a few
    # examples each.
    examples, steps = (20, 25) if kind == "f32" else (5, 20)
    model.TestCase.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None)
    model.TestCase("runTest").runTest()
