"""``jkv.attend_write_qkv``: a step's queries, keys and values as one fused-projection array. It equals
``jkv.attend_write`` of the slices (output, cache and error bits) on every path: the decode kernel reading the packed
rows in place (a contiguous cache storing the queries' dtype, T = 1, Pallas), and the slices handed on (another
kind, a cache of another dtype, T > 1, the reference); fresh random inputs, a cache already holding other rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkv
from jkv.attention import api
from pallas_kernels import backend, decode

BATCH, KV_HEADS, GROUP, HEAD_DIM, MAX_LEN = 3, 2, 3, 64, 48


def filled_cache(rng, kind, dtype, lengths):
    spec = jkv.CacheSpec(2, KV_HEADS, HEAD_DIM, MAX_LEN, dtype)
    cache = jkv.make_cache(kind, spec, BATCH, **({"page_size": 16} if jkv.caches.kind(kind).paged else {}))
    t = max(lengths)
    k, v = (jnp.asarray(rng.standard_normal((BATCH, KV_HEADS, t, HEAD_DIM)), jnp.float32) for _ in range(2))
    cache = cache.begin(jnp.asarray(lengths, jnp.int32))
    for layer in range(2):
        cache = cache.write(layer, k, v)
    return cache.commit()


def both(rng, kind, cache_dtype, q_dtype, t, impl, monkeypatch):
    """The two calls' results, and how often the packed kernel ran."""
    cache = filled_cache(rng, kind, cache_dtype, [5, 17, 30])
    qkv = jnp.asarray(rng.standard_normal((BATCH, t, KV_HEADS, GROUP + 2, HEAD_DIM)), jnp.float32)
    calls = []
    kernel = decode.decode_attention_packed
    monkeypatch.setattr(decode, "decode_attention_packed", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    counts = jnp.asarray([t, t, 0], jnp.int32)  # the last sequence is padding this step

    @functools.partial(jax.jit, static_argnames="packed")
    def step(qkv, cache, packed):
        cache = cache.begin(counts)
        if packed:
            out, cache = jkv.attend_write_qkv(qkv, cache, 1, q_dtype=q_dtype, impl=impl)
        else:
            q = qkv[:, :, :, :GROUP].reshape(BATCH, t, KV_HEADS * GROUP, HEAD_DIM).astype(q_dtype)
            k, v = (jnp.swapaxes(qkv[:, :, :, GROUP + i], 1, 2) for i in (0, 1))
            out, cache = jkv.attend_write(q, k, v, cache, 1, impl=impl)
        return out, cache.commit()

    return step(qkv, cache, True), step(qkv, cache, False), len(calls)


@pytest.mark.parametrize(
    "kind,q_dtype,t,impl,kernel_runs",
    [
        ("f32", jnp.float32, 1, "pallas", True),  # the packed kernel
        ("bf16", jnp.bfloat16, 1, "pallas", True),  # the packed kernel, bf16 rows
        ("f32", jnp.bfloat16, 1, "pallas", False),  # the cache stores another dtype
        ("f32", jnp.float32, 2, "pallas", False),  # T > 1: the multi-token kernel
        ("paged", jnp.float32, 1, "pallas", False),  # no fused write for this kind
        ("f32", jnp.float32, 1, "xla", False),  # the reference
    ],
)
def test_equals_attend_write_of_the_slices(rng, kind, q_dtype, t, impl, kernel_runs, monkeypatch):
    (out, cache), (want, want_cache), runs = both(rng, kind, jnp.float32, q_dtype, t, impl, monkeypatch)
    assert bool(runs) == kernel_runs
    assert out.dtype == want.dtype == jnp.dtype(q_dtype) and out.shape == (BATCH, t, KV_HEADS * GROUP, HEAD_DIM)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    assert not np.any(np.isnan(np.asarray(out, np.float32)))
    for got, expected in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_refuses_arrays_not_in_the_fused_layout(rng):
    cache = filled_cache(rng, "f32", jnp.float32, [5, 17, 30])
    with pytest.raises(ValueError, match=r"qkv must have shape \[B, T, K, G \+ 2, D\] with G >= 1"):
        jkv.attend_write_qkv(jnp.ones((BATCH, 1, KV_HEADS, 2, HEAD_DIM)), cache, 0, q_dtype=jnp.float32)
    with pytest.raises(ValueError, match="does not match the cache"):
        jkv.attend_write_qkv(
            jnp.ones((BATCH + 1, 1, KV_HEADS, 4, HEAD_DIM)), cache.begin(1), 0, q_dtype=jnp.float32, impl="pallas"
        )


def test_lowers_to_the_packed_kernel_alone(monkeypatch):
    """For CUDA on any host: the step's one kernel reads the packed rows; no slice of them is made for it."""
    monkeypatch.setattr(backend, "gpu_backend", lambda: backend.TRITON)
    spec = jkv.CacheSpec(2, KV_HEADS, HEAD_DIM, 64, jnp.bfloat16)
    cache = jax.eval_shape(lambda: jkv.make_cache("bf16", spec, BATCH))
    qkv = jax.ShapeDtypeStruct((BATCH, 1, KV_HEADS, GROUP + 2, HEAD_DIM), jnp.bfloat16)

    def step(qkv, cache):
        return api.attend_write_qkv(qkv, cache.begin(1), 1, q_dtype=jnp.bfloat16, impl="pallas")

    text = jax.jit(step).trace(qkv, cache).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "jkv_decode_attention_append" in text
    assert "stablehlo.slice" not in text.split("jkv_decode_attention_append")[0].split("func.func public @main")[-1]
