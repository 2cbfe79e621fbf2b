"""Shared by the serving tests: one small random Llama config (head_dim 32, so every cache kind runs), engines of
one shape (4 slots, one 16-token step bucket: a handful of compiles serve every test), random prompts, and the
one-at-a-time reference."""

import jax
import jax.numpy as jnp
import numpy as np

from jkv.models import llama
from jkv.serving import Engine, SamplingParams

CONFIG = llama.LlamaConfig(96, 64, 128, 2, 4, 2, 32)
MAX_LEN = 64
SLOTS = 4
BUCKETS = (16,)


def make_params(seed: int = 3):
    # A larger init scale gives peaked next-token distributions: greedy ties are then far from rounding.
    return llama.init_params(CONFIG, jax.random.key(seed), jnp.float32, scale=0.2)


def engine(params, cache="f32", **knobs):
    """An engine of the shared shape (a paged pool of 24 pages of 16); ``knobs`` are further ``EngineOptions``
    fields."""
    knobs = {"num_slots": SLOTS, "max_len": MAX_LEN, "buckets": BUCKETS, "max_batch_tokens": 16, **knobs}
    if cache_kinds_paged(cache):
        knobs.setdefault("num_pages", 24)
    return Engine(params, CONFIG, cache=cache, verbose=False, **knobs)


def cache_kinds_paged(kind: str) -> bool:
    return kind.endswith("paged")


def random_prompts(rng, count, lo=2, hi=12):
    return [rng.integers(0, CONFIG.vocab_size, size=rng.integers(lo, hi)).tolist() for _ in range(count)]


def one_at_a_time(params, prompts, cache="f32", sampling=None, **knobs):
    """Each request alone in the engine (submitted after the previous one finished): nothing shares its steps."""
    sampling = SamplingParams(max_new_tokens=7) if sampling is None else sampling
    eng = engine(params, cache, **knobs)
    out = []
    for p in prompts:
        eng.submit(p, sampling)
        (alone,) = eng.run(show_progress=False)
        out.append(alone.tokens)
    return out


def assert_nothing_held(eng, *, entries_allowed: bool = True):
    """No slot, length, error bit or page is held but by prefix-cache entries; the scheduler's page count agrees
    with the device's."""
    cache = eng.cache
    assert eng.num_active == 0 and eng.num_pending == 0 and not eng.has_work()
    assert not np.asarray(cache.lengths).any() and not np.asarray(cache.errors).any()
    assert all(s is None for s in eng.scheduler.slots) and eng.scheduler.reserved == 0
    if cache.layout != "paged":
        return
    refcounts, pins = np.asarray(cache.refcounts), np.asarray(cache.pins)
    np.testing.assert_array_equal(refcounts, pins)  # only entries hold pages
    assert eng.scheduler.pages.in_use == int((refcounts > 0).sum())
    if not entries_allowed or eng.prefix_cache is not None:
        if eng.prefix_cache is not None:
            eng.prefix_cache.clear()
        assert int(eng.cache.num_free_pages()) == eng.cache.num_pages and not np.asarray(eng.cache.pins).any()
        assert eng.scheduler.pages.in_use == 0 and not eng.scheduler.pages.refcounts
