"""The NNX and Equinox attention layers against float64 NumPy (GQA, NORM rotary, window, soft cap, ragged
steps); their models' donated steps updating the cache in place; vmap over single-sequence caches."""

import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_integrations import CONFIG, FRAMEWORKS, make_cache, model_step, random_params
from reference import attention_f64, rope_f64

import jkv
from jkv.attention import api
from jkv.integrations import common
from jkv.integrations import eqx as jeqx
from jkv.integrations import nnx as jnnx
from pallas_kernels import backend

H, N, K, D, THETA = 32, 6, 2, 16, 500.0
OPTIONS = {"plain": {}, "window-softcap-norm": dict(window=3, softcap=1.5, rope_style="norm")}
LAYER_CALL = {
    "nnx": nnx.jit(lambda layer, x, cache: layer(x, cache, 1)),
    "eqx": jax.jit(lambda layer, x, cache: layer(x, cache, 1)),
}


def make_layer(framework, weights, options):
    if framework == "eqx":
        return jeqx.Attention(
            *(jnp.asarray(weights[n]) for n in ("wq", "wk", "wv", "wo")), None, None, None, N, K, D,
            common.rope_frequencies(D, THETA), **options,
        )  # fmt: skip
    # Built abstractly (as example_nnx.from_llama_params does): no random init to compile, every kernel set below.
    layer = nnx.eval_shape(lambda: jnnx.Attention(H, N, K, D, rngs=nnx.Rngs(0), rope_theta=THETA, **options))
    for proj, name in ((layer.q_proj, "wq"), (layer.k_proj, "wk"), (layer.v_proj, "wv"), (layer.o_proj, "wo")):
        proj.kernel.set_value(jnp.asarray(weights[name]))
    return layer


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_attention_layer_matches_float64(framework, options, rng):
    options = OPTIONS[options]
    shapes = {"wq": (H, N * D), "wk": (H, K * D), "wv": (H, K * D), "wo": (N * D, H)}
    weights = {n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for n, s in shapes.items()}
    layer = make_layer(framework, weights, options)
    call = LAYER_CALL[framework]
    spec = jkv.CacheSpec(2, K, D, 16, jnp.float32)
    cache = jkv.KVCache.init(spec, 2)
    cache = cache.replace(data=tuple(jnp.full_like(x, jnp.nan) for x in cache.data))  # unwritten: NaN
    keys, values = np.zeros((2, K, 16, D)), np.zeros((2, K, 16, D))
    lengths = np.zeros(2, int)
    style = options.get("rope_style", "neox")
    for t, counts in ((4, [4, 2]), (4, [1, 2]), (1, [1, 0])):  # two shapes: a ragged multi-token one and decode
        x = rng.standard_normal((2, t, H)).astype(np.float32)
        cache = cache.begin(jnp.asarray(counts, jnp.int32))
        out, cache = call(layer, jnp.asarray(x), cache)
        cache = cache.commit()

        positions = lengths[:, None] + np.arange(t)[None]
        x64 = x.astype(np.float64)
        q = rope_f64((x64 @ weights["wq"]).reshape(2, t, N, D), positions, THETA, style)
        k = rope_f64((x64 @ weights["wk"]).reshape(2, t, K, D), positions, THETA, style)
        v = (x64 @ weights["wv"]).reshape(2, t, K, D)
        for b in range(2):
            keys[b, :, lengths[b] : lengths[b] + counts[b]] = k[b, : counts[b]].transpose(1, 0, 2)
            values[b, :, lengths[b] : lengths[b] + counts[b]] = v[b, : counts[b]].transpose(1, 0, 2)
        window, softcap = options.get("window"), options.get("softcap")
        attn = attention_f64(q, keys, values, positions, window=window, softcap=softcap)
        live = np.arange(t)[None, :] < np.asarray(counts)[:, None]
        want = np.where(live[..., None], attn.reshape(2, t, N * D) @ weights["wo"], 0)
        lengths += counts
        assert out.shape == (2, t, H) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    for stored, want in zip(cache.layer(1), (keys, values), strict=True):
        stored = np.asarray(stored)  # keys written rotated, values as they are, at their positions only
        for b in range(2):
            np.testing.assert_allclose(stored[b, :, : lengths[b]], want[b, :, : lengths[b]], atol=1e-5)
            assert np.isnan(stored[b, :, lengths[b] :]).all()


def test_layer_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_q_heads=6 must be a positive multiple of num_kv_heads=4"):
        jnnx.Attention(H, 6, 4, D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim=15 must be even"):
        jeqx.Attention.init(H, 4, 2, 15, key=jax.random.key(0))


DONATION_MARKS = ("tf.aliasing_output", "jax.buffer_donor")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_donated_step_updates_cache_in_place(framework, rng):
    # Four layers: the reference attention's scratch (about one layer's K and V, buffers // 4) stays well under a
    # copy of K alone (buffers // 2).
    config = dataclasses.replace(CONFIG, num_layers=4)
    step, weights = model_step(framework, random_params(config), config, donate=True)
    cache = make_cache("f32", 4, 256, config, nan=False)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (4, 1)), jnp.int32)
    for _ in range(2):
        _, cache = step(weights, cache, tokens)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [2, 2, 2, 2])
    stats = step.lower(weights, cache, tokens).compile().memory_analysis()
    buffers = sum(x.nbytes for x in cache.data)
    assert stats.alias_size_in_bytes >= buffers
    assert stats.temp_size_in_bytes < buffers * 3 // 8, stats.temp_size_in_bytes
    # The control: without donation the program asks for no input/output aliasing (read from the lowering: an
    # eight-layer compile less).
    plain, _ = model_step(framework, random_params(config), config, donate=False)
    assert any(x in step.lower(weights, cache, tokens).as_text() for x in DONATION_MARKS)
    assert not any(x in plain.lower(weights, cache, tokens).as_text() for x in DONATION_MARKS)


@pytest.mark.parametrize(("framework", "kind"), [("nnx", "f32"), ("nnx", "paged"), ("eqx", "f32")])
def test_vmap_over_single_sequence_caches_equals_batched(framework, kind, rng):
    """The step written for one sequence (a batch-1 cache), vmapped over stacked batch-1 caches."""
    step, weights = model_step(framework, random_params())
    one = lambda w, cache, tokens, counts: step(w, cache, tokens[None], counts[None])
    mapped = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))
    batched = make_cache(kind, 3)
    stacked = jax.jit(common.stack_caches)([make_cache(kind, 1) for _ in range(3)])
    counts = np.asarray([5, 3, 4], np.int32)
    tokens = rng.integers(0, CONFIG.vocab_size, (3, 5)).astype(np.int32)
    for _ in range(3):  # a ragged prefill, then two decode steps padded to the same T (one program each)
        logits, batched = step(weights, batched, jnp.asarray(tokens), jnp.asarray(counts))
        mapped_logits, stacked = mapped(weights, stacked, jnp.asarray(tokens), jnp.asarray(counts))
        logits, mapped_logits = np.asarray(logits), np.asarray(mapped_logits)
        assert mapped_logits.shape == (3, 1, *logits.shape[1:])
        scale = np.abs(logits).max()  # 1e-6 of the logits' range: float32 sums in another order
        np.testing.assert_allclose(mapped_logits[:, 0], logits, atol=1e-6 * scale, rtol=0)
        last = logits[np.arange(3), counts - 1]
        mapped_last = mapped_logits[np.arange(3), 0, counts - 1]
        np.testing.assert_array_equal(np.argmax(mapped_last, -1), np.argmax(last, -1))
        tokens = rng.integers(0, CONFIG.vocab_size, (3, 5)).astype(np.int32)  # padding after the first: unwritten
        tokens[:, 0], counts = np.argmax(last, -1), np.ones(3, np.int32)
    singles = common.unstack_caches(stacked, 3)
    np.testing.assert_array_equal(np.concatenate([np.asarray(c.lengths) for c in singles]), batched.lengths)
    np.testing.assert_array_equal(np.asarray(batched.lengths), [7, 5, 6])
    for b, single in enumerate(singles):
        want, got = batched.extract_slot(b), single.extract_slot(0)
        n = int(batched.lengths[b])
        for layer in range(CONFIG.num_layers):
            for x, y in zip(got.layer(layer), want.layer(layer), strict=True):
                x, y = np.asarray(x)[0, :, :n], np.asarray(y)[0, :, :n]
                np.testing.assert_allclose(x, y, atol=1e-6 * np.abs(y).max(), rtol=0)


def _cuda_kernels(fn, *args) -> collections.Counter:
    """The Pallas kernels (by name) in ``fn``'s program lowered for CUDA."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return collections.Counter(re.findall(r'name = "(jkv_[A-Za-z0-9_]+)"', text))


@pytest.mark.parametrize("framework,kind", [("nnx", "f32"), ("eqx", "paged"), ("nnx", "q8")])
def test_vmap_over_single_sequence_caches_runs_the_batched_kernels(monkeypatch, framework, kind):
    """On a GPU the vmapped one-sequence step runs the batched step's kernels (vmap adds a grid axis to each
    Pallas call): both programs lowered for CUDA, with the GPU paths forced (Triton, no interpret mode), name the
    same kernels, a multi-token one for a prompt step and a decode one for T = 1."""
    monkeypatch.setattr(api, "default_impl", lambda: "pallas")
    monkeypatch.setattr(backend, "gpu_backend", lambda: backend.TRITON)
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: False)
    monkeypatch.setattr(backend, "resolve_interpret", lambda interpret: bool(interpret))
    step, weights = model_step(framework, random_params())
    one = lambda w, cache, tokens, counts: step(w, cache, tokens[None], counts[None])
    batched = make_cache(kind, 3, nan=False)
    stacked = common.stack_caches([make_cache(kind, 1, nan=False) for _ in range(3)])
    for t, family in ((5, "jkv_multi_token"), (1, "jkv_")):
        tokens, counts = jnp.zeros((3, t), jnp.int32), jnp.full((3,), t, jnp.int32)
        want = _cuda_kernels(step, weights, batched, tokens, counts)
        got = _cuda_kernels(jax.vmap(one, in_axes=(None, 0, 0, 0)), weights, stacked, tokens, counts)
        assert want and all(name.startswith(family) for name in want), want
        assert (t == 1) == all("multi_token" not in name for name in want), want
        assert got == want
