"""Reference attention (decode and causal prefill) against NumPy float64, and the cache protocol end to end."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from kernel_inputs import run_jitted
from reference import attention_f64, decode_attention_f64

import jkv

CASES = [
    # (batch, kv_heads, group, head_dim, max_len)
    (3, 2, 1, 64, 40),
    (2, 2, 4, 128, 33),
    (4, 1, 8, 64, 17),
    (1, 8, 4, 128, 64),
]
IDS = [f"batch={b}_kv_heads={k}_group={g}_dim={d}_S={s}" for b, k, g, d, s in CASES]


def nan_past(x, lengths):
    """Poison cache positions at or past each sequence's length with NaN."""
    x = np.array(x)
    for b, n in enumerate(lengths):
        x[b, :, n:] = np.nan
    return x


@pytest.mark.parametrize("batch,kv_heads,group,head_dim,max_len", CASES, ids=IDS)
def test_decode_reference_matches_float64(rng, batch, kv_heads, group, head_dim, max_len):
    lengths = rng.integers(1, max_len + 1, size=batch)
    lengths[0] = 1
    lengths[-1] = max_len
    q = rng.standard_normal((batch, kv_heads * group, head_dim))
    k = rng.standard_normal((batch, kv_heads, max_len, head_dim))
    v = rng.standard_normal((batch, kv_heads, max_len, head_dim))
    ref = decode_attention_f64(q, k, v, lengths)
    k, v = nan_past(k, lengths), nan_past(v, lengths)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out = run_jitted(jkv.decode_attention_reference, f32(q), f32(k), f32(v), jnp.asarray(lengths, jnp.int32))
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) < REL_TOL["float32"]
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = run_jitted(jkv.decode_attention_reference, bf(q), bf(k), bf(v), jnp.asarray(lengths, jnp.int32))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < REL_TOL["bfloat16"]


def test_zero_length_gives_zero_output(rng):
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 5, 8)), jnp.float32)
    out = run_jitted(jkv.decode_attention_reference, q, k, k, jnp.array([0, 3], jnp.int32))
    np.testing.assert_array_equal(np.asarray(out[0]), 0)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("batch,kv_heads,group,head_dim,max_len", CASES, ids=IDS)
def test_prefill_after_prefix_matches_float64(rng, batch, kv_heads, group, head_dim, max_len):
    t = 5
    start = rng.integers(0, max_len - t + 1, size=batch)
    positions = start[:, None] + np.arange(t)
    q = rng.standard_normal((batch, t, kv_heads * group, head_dim))
    k = rng.standard_normal((batch, kv_heads, max_len, head_dim))
    v = rng.standard_normal((batch, kv_heads, max_len, head_dim))
    ref = attention_f64(q, k, v, positions)
    k, v = nan_past(k, start + t), nan_past(v, start + t)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out = run_jitted(jkv.attention_reference, f32(q), f32(k), f32(v), jnp.asarray(positions, jnp.int32))
    assert rel_err(out, ref) < REL_TOL["float32"]


def test_through_the_cache_prefill_then_decode(rng):
    """begin + write + attend over T tokens, commit, then one more token: the cache protocol end to end."""
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, max_len=24)
    t, n_heads = 6, 8
    k = rng.standard_normal((2, 2, t + 1, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, t + 1, 16)).astype(np.float32)
    q = rng.standard_normal((2, t + 1, n_heads, 16)).astype(np.float32)

    def steps(q, k, v):  # one program: eager cache operations would compile one by one
        cache = jkv.KVCache.init(spec, 2).begin(t).write(1, k[:, :, :t], v[:, :, :t])
        pre = jkv.attend(q[:, :t], cache, 1)
        cache = cache.commit().begin(1).write(1, k[:, :, t:], v[:, :, t:])
        return pre, jkv.attend(q[:, t:], cache, 1, impl="xla")[:, 0]

    pre, dec = run_jitted(steps, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    full = attention_f64(q, k, v, np.broadcast_to(np.arange(t + 1), (2, t + 1)))
    assert rel_err(pre, full[:, :t]) < REL_TOL["float32"]
    assert rel_err(dec, full[:, t]) < REL_TOL["float32"]


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda q, k, n: jkv.decode_attention_reference(q[:, :3], k, k, n), ValueError, "num_q_heads=3"),
        (lambda q, k, n: jkv.decode_attention_reference(q[0], k, k, n), ValueError, "q must have shape [B, N, D]"),
        (lambda q, k, n: jkv.decode_attention_reference(q, k[0], k[0], n), ValueError, "[B, K, S, D]"),
        (lambda q, k, n: jkv.decode_attention_reference(q[:1], k, k, n), ValueError, "batch and head_dim"),
        (lambda q, k, n: jkv.decode_attention_reference(q, k, k, n[:1]), ValueError, "lengths must be int[2]"),
        (lambda q, k, n: jkv.decode_attention_reference(q, k, k, n + 9), ValueError, "must lie in [0, S=5]"),
        (lambda q, k, n: jkv.attention_reference(q, k, k, n), ValueError, "[B, T, N, D]"),
        (lambda q, k, n: jkv.attention_reference(q[:, None], k, k, n), ValueError, "q_positions.shape=(2,)"),
        (lambda q, k, n: jkv.attend(q[:, None], k, 0), TypeError, "must be a jkv cache"),
        (lambda q, k, n: jkv.attend(q[:, None], None, 0, impl="cuda"), ValueError, "impl='cuda'"),
    ],
    ids=[
        "gqa",
        "q-rank",
        "kv-rank",
        "batch",
        "lengths-shape",
        "lengths-range",
        "prefill-rank",
        "positions",
        "not-a-cache",
        "impl",
    ],
)
def test_attention_errors(rng, call, exc, text):
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 5, 8)), jnp.float32)
    with pytest.raises(exc) as info:
        call(q, k, jnp.array([2, 5], jnp.int32))
    assert text in str(info.value)
