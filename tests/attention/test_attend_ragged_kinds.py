"""``jkv.attend_write`` on the XLA path over every layout (contiguous, paged, pooled and bounded rings after
wrap-around, per-layer plans) against float64 NumPy over the K/V the test itself wrote: ragged steps with rows of
no new token, a window shorter than the step, a soft cap, grouped query heads. Every position no query of the final
step may read was written as NaN (a row of count 0 reads nothing at all)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from reference import attention_f64

import jkv
from jkv.caches import CacheSpec, PagedKVCache, Ring

SPEC = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, max_len=32)
B, N, T = 3, 4, 3  # 4 query heads over 2 kv heads
SCHEDULE = ([3, 2, 3], [3, 3, 1], [2, 3, 3], [3, 1, 3], [3, 3, 2], [1, 3, 3])  # then the final step
FINAL = np.array([0, 3, 1])


def _cache(name, window):
    if name == "ring-pooled":
        return PagedKVCache.init(SPEC, B, page_size=4, ring=Ring(window, 3, bounded=False), num_pages=24)
    if name == "ring-bounded":
        return PagedKVCache.init(SPEC, B, page_size=4, ring=Ring(window, 3))
    if name.startswith("plan"):
        kind = "paged" if name == "plan-paged" else "f32"
        return jkv.caches.make_cache(kind, SPEC, B, windows=(window, None), slack=3, page_size=4)
    return jkv.caches.make_cache(name, SPEC, B, **({"page_size": 4} if "paged" in name else {}))


@jax.jit(static_argnames=("window", "softcap"))
def _step(cache, counts, q, k, v, window, softcap):
    cache = cache.begin(counts)
    outs = []
    for layer in range(SPEC.num_layers):
        out, cache = jkv.attend_write(q, k[layer], v[layer], cache, layer, impl="xla", window=window, softcap=softcap)
        outs.append(out)
    return jnp.stack(outs), cache.commit()


CASES = [
    ("f32", 2, None),
    ("f32", None, 1.5),
    ("paged", 2, 2.0),
    ("q8", 2, None),
    ("fp8-paged", None, 2.0),
    ("ring-pooled", 2, 1.5),
    ("ring-bounded", 3, None),
    ("plan-paged", 2, None),
    ("plan-contiguous", 3, 2.0),
]


@pytest.mark.parametrize(("name", "window", "softcap"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_ragged_steps_match_float64(name, window, softcap):
    rng = np.random.default_rng(11)
    plan = name.startswith("plan")
    cache = _cache(name, window)
    steps = [np.asarray(c) for c in SCHEDULE] + [FINAL]
    lengths = np.cumsum([np.zeros(B, int), *steps[:-1]], axis=0)  # lengths before each step
    final_len = lengths[-1]
    # Position p of row b is read by the final step iff some query t < FINAL[b] at final_len[b] + t sees it.
    keys = rng.standard_normal((SPEC.num_layers, B, SPEC.num_kv_heads, SPEC.max_len, SPEC.head_dim))
    vals = rng.standard_normal(keys.shape)
    p = np.arange(SPEC.max_len)[None, :]
    lo = final_len[:, None] - (SPEC.max_len if window is None else window - 1)
    read = (FINAL[:, None] > 0) & (p >= lo) & (p < final_len[:, None] + FINAL[:, None])
    # A plan's full layer (layer 1) reads everything: only its windowed layer 0 is poisoned.
    hidden = (
        ~read[None, :, None, :, None] & (np.arange(SPEC.num_layers) < (1 if plan else 2))[:, None, None, None, None]
    )
    keys, vals = np.where(hidden, np.nan, keys), np.where(hidden, np.nan, vals)
    if "q8" in name or "fp8" in name:  # a quantized format cannot store NaN: real values, the bound decides
        keys, vals = np.nan_to_num(keys, nan=0.5), np.nan_to_num(vals, nan=-0.5)
    for i, counts in enumerate(steps):
        k = np.zeros((SPEC.num_layers, B, SPEC.num_kv_heads, T, SPEC.head_dim), np.float32)
        for b in range(B):
            k[:, b, :, : counts[b]] = keys[:, b, :, lengths[i][b] : lengths[i][b] + counts[b]]
        v = np.zeros_like(k)
        for b in range(B):
            v[:, b, :, : counts[b]] = vals[:, b, :, lengths[i][b] : lengths[i][b] + counts[b]]
        q = rng.standard_normal((B, T, N, SPEC.head_dim)).astype(np.float32)
        out, cache = _step(cache, jnp.asarray(counts, jnp.int32), q, k, v, window=window, softcap=softcap)
    cache.check()
    np.testing.assert_array_equal(cache.lengths, final_len + FINAL)
    pos = np.where(np.arange(T)[None] < FINAL[:, None], final_len[:, None] + np.arange(T)[None], -1)
    for layer in range(SPEC.num_layers):  # every layer attends with the window (a plan's full layer too)
        want = attention_f64(q, keys[layer], vals[layer], pos, window=window, softcap=softcap)
        got = np.asarray(out[layer], np.float64)
        live = pos >= 0
        np.testing.assert_array_equal(got[~live], 0.0)
        assert rel_err(got[live], want[live]) < (8e-2 if "fp8" in name else 3e-2 if "q8" in name else 1e-5)
