"""Shared by the per-layer cache plan tests (tests/caches/test_plan*.py): a small plan NaN-poisoned at the start,
a float64 NumPy model of every position ever written, padded and flat steps checked against it, and a plan whose
rings have all wrapped (built once per layout per process)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import rel_err
from reference import attention_f64

import jkv
from jkv.caches import PlannedCache, Ring

WINDOWS = (4, None, 6)  # two ring groups and a full one, the full layer in the middle
SLACK, PAGE, MAX_LEN, B, T = 5, 4, 64, 3, 5
SPEC = jkv.CacheSpec(3, 2, 16, MAX_LEN)
N = 4  # query heads (GQA 2)


@jax.jit  # one program, not one fill per stored array
def poisoned(cache):
    """Every stored value NaN: only positions written since may be read."""
    fill = lambda x: jnp.full_like(x, jnp.nan)
    groups = []
    for group in cache.groups:
        if hasattr(group, "pages"):
            groups.append(group.replace(pages=tuple(map(fill, group.pages))))
        else:
            groups.append(group.replace(data=tuple(map(fill, group.data))))
    return cache.replace(groups=tuple(groups))


def new_cache(layout, batch=B):
    return poisoned(PlannedCache.init(SPEC, batch, windows=WINDOWS, slack=SLACK, layout=layout, page_size=PAGE))


class Model:
    """Every K/V ever written, in float64, and the lengths: the ring's reference."""

    def __init__(self, batch=B):
        self.k = np.full((SPEC.num_layers, batch, 2, MAX_LEN, 16), np.nan)
        self.v = np.full_like(self.k, np.nan)
        self.lengths = np.zeros(batch, np.int64)

    def copy(self):
        other = Model.__new__(Model)
        other.k, other.v, other.lengths = self.k.copy(), self.v.copy(), self.lengths.copy()
        return other

    def fork(self, src, dst):
        """Sequence ``dst`` becomes a copy of ``src`` (what ``fork``, ``insert_into_slot`` or a prefix hit do)."""
        self.k[:, dst], self.v[:, dst], self.lengths[dst] = self.k[:, src], self.v[:, src], self.lengths[src]

    def attend(self, q, layer, counts):
        positions = np.where(
            np.arange(q.shape[1])[None, :] < counts[:, None], self.lengths[:, None] + np.arange(q.shape[1]), -1
        )
        k, v = np.nan_to_num(self.k[layer]), np.nan_to_num(self.v[layer])  # unwritten: never in a window
        return attention_f64(q, k, v, positions, window=WINDOWS[layer])


@functools.partial(jax.jit, static_argnames="impl")
def run_step(cache, counts, q, k, v, impl="xla"):
    """A padded step of every layer: begin, write + attend, commit."""
    cache = cache.begin(counts)
    outs = []
    for layer in range(SPEC.num_layers):
        out, cache = jkv.attend_write(q, k[layer], v[layer], cache, layer, impl=impl, window=WINDOWS[layer])
        outs.append(out)
    return jnp.stack(outs), cache.commit()


run_rollback = jax.jit(lambda c, n: c.rollback(n))


def step_inputs(rng, batch):
    q = rng.standard_normal((batch, T, N, 16)).astype(np.float32)
    k = rng.standard_normal((SPEC.num_layers, batch, 2, T, 16)).astype(np.float32)
    return q, k, rng.standard_normal(k.shape).astype(np.float32)


def step(cache, model, rng, counts, impl="xla"):
    """A padded step of fresh random tokens, every layer's attention compared with the model's."""
    counts = np.asarray(counts)
    batch = counts.shape[0]
    q, k, v = step_inputs(rng, batch)
    outs, cache = run_step(cache, jnp.asarray(counts, jnp.int32), q, k, v, impl=impl)
    for b in range(batch):
        at = slice(model.lengths[b], model.lengths[b] + counts[b])
        model.k[:, b, :, at] = k[:, b, :, : counts[b]]
        model.v[:, b, :, at] = v[:, b, :, : counts[b]]
    for layer in range(SPEC.num_layers):
        want = model.attend(q, layer, counts)
        assert rel_err(outs[layer], want) < 1e-5, layer
    model.lengths += counts
    return cache


def rollback(cache, model, lengths):
    model.lengths[:] = lengths
    return run_rollback(cache, jnp.asarray(model.lengths, jnp.int32))


def ring_pages_held(cache):
    return [np.asarray(g.pages_held()).max() for g in cache.groups[1:]]


@functools.cache
def wrapped(layout):
    """``(cache, model)`` after 14 ragged steps with speculative-style rollbacks: every ring has wrapped (the model
    is shared: copy it before changing it)."""
    rng = np.random.default_rng(7)
    cache, model = new_cache(layout), Model()
    for i in range(14):
        counts = rng.integers(0, SLACK + 1, B) if i else np.array([5, 3, 0])
        cache = step(cache, model, rng, counts)
        if i % 3 == 1:  # reject up to 2 of the step's tokens
            cache = rollback(cache, model, model.lengths - np.minimum(rng.integers(0, 3, B), counts))
        assert np.asarray(cache.errors).max() == 0
        pages = [Ring(w, SLACK, layout == "contiguous").pages_per_sequence(PAGE) for w in (4, 6)]
        assert all(h <= p for h, p in zip(ring_pages_held(cache), pages, strict=True))
    assert (model.lengths > 6 - 1 + SLACK + PAGE).all(), model.lengths  # past every ring's pages
    return cache, model
