"""head_dims that are not powers of two (Phi-3's 96; 80, 48): on the Pallas path a T = 1 step over any cache (plain,
Q8, FP8; contiguous or paged) runs its decode kernel, which reads them in power-of-two column chunks; any T > 1 step
the multi-token kernel; head_dims no kernel takes (72) run the reference; all against float64 NumPy on
NaN-poisoned caches, the fused write included."""

import functools
import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import fast_jit
from reference import attention_f64

import jkv

BATCH, HEADS, KV_HEADS, MAX_LEN, LAYER = 3, 4, 2, 32, 1
TOL = {"q8": 3e-2, "fp8": 8e-2}


@functools.partial(fast_jit, static_argnames=("kind", "head_dim", "t"))
def _step(k_all, v_all, lengths, q, k, v, counts, *, kind, head_dim, t):
    """A cache of ``kind`` holding ``k_all`` / ``v_all`` up to ``lengths``, then ``attend_write`` of a step of
    ``counts`` tokens at layer 1 on the Pallas path, and ``attend`` again over the cache it returns."""
    del t  # (static: one program per step length)
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=KV_HEADS, head_dim=head_dim, max_len=MAX_LEN, dtype=jnp.float32)
    paged = jkv.caches.kind(kind).paged
    cache = jkv.make_cache(kind, spec, BATCH, **({"page_size": 8} if paged else {})).begin(MAX_LEN)
    for layer in range(2):
        cache = cache.write(layer, k_all[layer], v_all[layer])
    cache = cache.commit().rollback(lengths)
    out, cache = jkv.attend_write(q, k, v, cache.begin(counts), LAYER, impl="pallas")
    return out, cache, jkv.attend(q, cache, LAYER, impl="pallas"), cache.layer(LAYER, jnp.float32)


CASES = [("f32", 96, 1), ("paged", 96, 1), ("q8", 96, 1), ("fp8-paged", 96, 1), ("f32", 80, 1), ("paged", 48, 1)]
CASES += [("q8-paged", 96, 1), ("fp8", 80, 1)]
CASES += [("f32", 96, 3), ("q8-paged", 96, 3), ("f32", 72, 1), ("paged", 72, 3)]


@pytest.mark.parametrize(("kind", "head_dim", "t"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_steps_at_head_dims_off_the_decode_tiles_match_float64(rng, kind, head_dim, t):
    lengths = np.asarray([5, 0, 17])
    counts = np.asarray([t, min(t, 2), 0], np.int32)
    k_all, v_all = (rng.standard_normal((2, BATCH, KV_HEADS, MAX_LEN, head_dim)) for _ in "kv")
    past = np.arange(MAX_LEN)[None, :] >= lengths[:, None]  # nothing there may be read
    k_all, v_all = (np.where(past[None, :, None, :, None], np.nan, x).astype(np.float32) for x in (k_all, v_all))
    q = rng.standard_normal((BATCH, t, HEADS, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((BATCH, KV_HEADS, t, head_dim)).astype(np.float32) for _ in "kv")
    args = (k_all, v_all, jnp.asarray(lengths, jnp.int32), q, k, v, jnp.asarray(counts))
    options = dict(kind=kind, head_dim=head_dim, t=t)
    names = set(re.findall(r"name=(jkv_\w+)", str(_step.trace(*args, **options).jaxpr)))
    decode = {n for n in names if "decode" in n or re.fullmatch(r"jkv_paged(_q8|_fp8)?_attention", n)}
    if head_dim % 16:  # no kernel takes it: the reference
        assert not {n for n in names if "attention" in n}, names
    elif t == 1:  # the kind's decode kernel, in column chunks
        assert decode and not any("multi_token" in n for n in names), names
    else:  # the multi-token kernel, not a decode kernel
        assert any("multi_token" in n for n in names) and not decode, names
    out, _, again, (kd, vd) = _step(*args, **options)
    kd, vd = (np.nan_to_num(np.asarray(x, np.float64)) for x in (kd, vd))  # the cache's own rounding of K/V
    live = np.arange(t)[None, :] < counts[:, None]
    pos = np.where(live, lengths[:, None] + np.arange(t)[None, :], -1)
    want = attention_f64(q, kd, vd, pos)
    tol = next((v for k, v in TOL.items() if kind.startswith(k)), 1e-5)
    assert rel_err(np.asarray(out)[live], want[live]) < tol
    np.testing.assert_array_equal(np.asarray(out)[~live], 0.0)
    np.testing.assert_allclose(np.asarray(again), np.asarray(out), rtol=1e-5, atol=1e-6)
