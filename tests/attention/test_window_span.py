"""A window at least as long as a plain cache masks nothing: ``attend`` and ``attend_write`` trace the unwindowed
program (on the GPU the decode steps then take the kernels that have no window option), and a shorter window stays
(a ring's window always does: its storage wraps at it). The engine's plan makes such a layer full
(``EngineOptions.windows``)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkv
from jkv.serving import EngineOptions

SPEC = jkv.CacheSpec(num_layers=1, num_kv_heads=2, head_dim=64, max_len=32, dtype=jnp.float32)


def step(q, k, v, cache, counts, *, impl, window):
    out, cache = jkv.attend_write(q, k, v, cache.begin(counts), 0, impl=impl, window=window)
    return out, jkv.attend(q, cache, 0, impl=impl, window=window)


def traced(kind, impl, window, t, seed=0):
    rng = np.random.default_rng(seed)
    rand = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    cache = jkv.make_cache(kind, SPEC, 2, **({"page_size": 8} if jkv.caches.kind(kind).paged else {}))
    cache = cache.begin(jnp.asarray([20, 7], jnp.int32)).write(0, rand(2, 2, 20, 64), rand(2, 2, 20, 64)).commit()
    args = (rand(2, t, 8, 64), rand(2, 2, t, 64), rand(2, 2, t, 64), cache, jnp.asarray([t, t], jnp.int32))
    fn = jax.jit(lambda *a: step(*a, impl=impl, window=window))
    return str(fn.trace(*args).jaxpr), fn(*args)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize(("kind", "impl"), [("f32", "pallas"), ("paged", "pallas"), ("f32", "xla")])
def test_a_window_as_long_as_the_cache_is_no_window(kind, impl, t):
    plain, (out, again) = traced(kind, impl, None, t)
    for window in (SPEC.max_len, SPEC.max_len + 9):
        jaxpr, (w_out, w_again) = traced(kind, impl, window, t)
        assert jaxpr == plain, window
        np.testing.assert_array_equal(w_out, out)
        np.testing.assert_array_equal(w_again, again)
    shorter, _ = traced(kind, impl, SPEC.max_len - 1, t)  # masks position 0 of a query at 31: it stays
    assert shorter != plain


@pytest.mark.parametrize(
    ("windows", "max_len", "want"),
    [
        ((16, 4096), 64, (16, None)),  # Gemma-style alternation at a short context: only the short window stays
        ((64, None), 64, None),  # every window covers max_len: a uniform cache
        ((63, 63), 64, (63, 63)),
        ((4096, 4096), 1264, None),  # Mistral-7B after bench/bench_families.py's prompt
        ((None, None), 64, None),
    ],
)
def test_engine_plan_makes_windows_of_max_len_full(windows, max_len, want):
    config = types.SimpleNamespace(windows=windows)
    assert EngineOptions(max_len=max_len).windows(config) == want
    assert EngineOptions(max_len=max_len, windowed=False).windows(config) is None
