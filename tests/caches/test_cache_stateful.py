"""Random sequences of cache operations, checked against a plain NumPy model after every step."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import jkv

SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, max_len=12, dtype=jnp.float32)
BATCH = 3

# Jitted once per shape, as a decode loop would be; the eager API is exercised by test_cache.py.
_write = jax.jit(lambda c, layer, k, v: c.write(layer, k, v))
_advance = jax.jit(lambda c, n: c.advance(n))
_rollback = jax.jit(lambda c, n: c.rollback(n))
_reset_slot = jax.jit(lambda c, i: c.reset_slot(i))
_insert = jax.jit(lambda c, i, s: c.insert_into_slot(i, s))


class CacheModel(RuleBasedStateMachine):
    """NumPy model: k/v arrays of shape [L, B, K, S, D] and lengths; only positions < length are compared."""

    @initialize()
    def start(self):
        self.cache = jkv.KVCache.init(SPEC, BATCH)
        self.k = np.zeros(self.cache.k.shape, np.float32)
        self.v = np.zeros(self.cache.v.shape, np.float32)
        self.lengths = np.zeros(BATCH, np.int64)
        self.pending = 0  # positions written at lengths by every layer but not yet advanced
        self.written_layers = set()
        self.rng = np.random.default_rng(0)

    def _new(self, b, t):
        return self.rng.standard_normal((b, SPEC.num_kv_heads, t, SPEC.head_dim)).astype(np.float32)

    @precondition(lambda self: self.pending == 0)
    @rule(t=st.integers(1, 4))
    def write_all_layers_and_advance(self, t):
        fits = self.lengths + t <= SPEC.max_len
        for layer in range(SPEC.num_layers):
            k, v = self._new(BATCH, t), self._new(BATCH, t)
            self.cache = _write(self.cache, layer, jnp.asarray(k), jnp.asarray(v))
            for b in np.flatnonzero(fits):
                n = self.lengths[b]
                self.k[layer, b, :, n : n + t] = k[b]
                self.v[layer, b, :, n : n + t] = v[b]
        n = np.where(fits, t, 0)
        self.cache = _advance(self.cache, jnp.asarray(n, jnp.int32))
        self.lengths += n
        # A refused write is flagged; clear the bits so the next step starts clean.
        assert (np.asarray(self.cache.errors) != 0).tolist() == (~fits).tolist()
        self.cache = self.cache.clear_errors()

    @rule(data=st.data())
    def rollback(self, data):
        new = np.array([data.draw(st.integers(0, int(n))) for n in self.lengths])
        self.cache = _rollback(self.cache, jnp.asarray(new, jnp.int32))
        self.lengths = new

    @rule(slot=st.integers(0, BATCH - 1))
    def reset_slot(self, slot):
        self.cache = _reset_slot(self.cache, slot)
        self.lengths[slot] = 0

    @rule(slot=st.integers(0, BATCH - 1), n=st.integers(0, 6))
    def insert_prefilled(self, slot, n):
        single = jkv.KVCache.init(SPEC.replace(max_len=6), 1)
        k, v = self._new(1, 6), self._new(1, 6)
        for layer in range(SPEC.num_layers):
            single = single.write(layer, jnp.asarray(k), jnp.asarray(v))
        single = single.advance(n)
        self.cache = _insert(self.cache, slot, single)
        self.k[:, slot, :, :6] = k[0]
        self.v[:, slot, :, :6] = v[0]
        self.lengths[slot] = n

    @rule()
    def snapshot_roundtrip(self):
        self.cache = jkv.KVCache.restore(self.cache.snapshot(trim=True))

    @invariant()
    def matches_model(self):
        lengths = np.asarray(self.cache.lengths)
        np.testing.assert_array_equal(lengths, self.lengths)
        assert not np.asarray(self.cache.errors).any()
        k, v = np.asarray(self.cache.k), np.asarray(self.cache.v)
        for b, n in enumerate(self.lengths):
            np.testing.assert_array_equal(k[:, b, :, :n], self.k[:, b, :, :n])
            np.testing.assert_array_equal(v[:, b, :, :n], self.v[:, b, :, :n])


CacheModel.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestCacheModel = CacheModel.TestCase
