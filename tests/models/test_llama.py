"""The Llama-family model against a float64 NumPy forward pass: prefill, decode, ragged batches, layouts, caches,
one compile per decode step, donation in place, and config/params validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_compile import FAST_COMPILE
from helpers_params import random_params as numpy_params

import jkv
from jkv.models import llama
from jkv.models.llama import fusions

# Tiny configs that still exercise every feature: GQA ratios 1, 3 and 4, q/k/v biases, tied and untied heads,
# Llama 3.1 rope scaling, llama.cpp-style frequency factors.
CONFIGS = {
    "llama-gqa4-untied": llama.LlamaConfig(97, 64, 96, 2, 8, 2, 16, 1e-5, 10000.0),
    "qwen2-bias-tied": llama.LlamaConfig(
        97, 64, 80, 2, 4, 2, 16, 1e-6, 1e6, tie_embeddings=True, qkv_bias=True, architecture="qwen2"
    ),
    "llama3rope-mha": llama.LlamaConfig(89, 64, 96, 3, 2, 2, 32, 1e-5, 5e5, rope_llama3=(8.0, 1.0, 4.0, 16)),
    "q8able-gqa2": llama.LlamaConfig(61, 64, 64, 2, 4, 2, 32, 1e-5, 1e4),
    "smollm2like-gqa3-factors": llama.LlamaConfig(
        101, 48, 64, 2, 3, 1, 16, 1e-5, 1e5, tie_embeddings=True, rope_factors=(1.0, 1.5, 2.0, 4.0, 1, 1, 2, 8)
    ),
}
IDS = [name for name in CONFIGS if name != "q8able-gqa2"]
XLA = llama.LlamaOptions(impl="xla")
LAST = jnp.full((3,), 4, jnp.int32)  # the last of 5 prompt tokens: the prefill shape of three tests


FAST = FAST_COMPILE  # every float32 program below; the bfloat16 one compiles with the default options


@functools.cache
def jitted(name, config, impl="xla", **options):
    """``llama.<name>`` compiled for ``config`` (eager dispatch op by op is far slower than one compile), float32
    weights, the cache donated (as served). One per (name, config, options): tests of equal shapes share compiles."""
    options = llama.LlamaOptions(impl=impl, **options)
    fn = functools.partial(getattr(llama, name), config=config, options=options)
    return jax.jit(fn, donate_argnums=1, compiler_options=FAST)


# One compile per params structure (eager, each leaf shape's stack or slice compiles on its own).
with_layout = jax.jit(llama.with_layout, static_argnums=1)


def random_params(config, seed=0, layout="layers"):
    # init_params' distribution drawn by NumPy (nothing compiles), larger weights than its default so that
    # attention and the MLP move the logits a lot.
    return numpy_params(config, seed, scale=0.15, layout=layout)


def make_cache(config, batch, max_len, dtype=jnp.float32, kind="contiguous"):
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, max_len, dtype)
    if kind == "q8":
        return jkv.KVCache.init(spec, batch, format=jkv.Q8())
    if kind == "paged":
        return jkv.PagedKVCache.init(spec, batch, page_size=8)
    cache = jkv.KVCache.init(spec, batch)
    # Unused positions hold NaN: nothing may read them.
    return cache.replace(data=tuple(jnp.full_like(x, jnp.nan) for x in cache.data))


# ---------------------------------------------------------------------------------------------- NumPy reference
def forward_f64(params: llama.LlamaParams, config: llama.LlamaConfig, tokens) -> np.ndarray:
    """Logits [B, T, V] of a full causal pass, in float64, written from the model's definition."""
    f = lambda x: np.asarray(x, np.float64)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    n, kh, d = config.num_heads, config.num_kv_heads, config.head_dim
    g = n // kh
    inv = config.inv_freq()
    angle = np.arange(t)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]

    def rope(x):  # (B, T, H, D), split halves
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.rms_norm_eps) * f(w)

    x = f(params.embed)[tokens]  # (B, T, H)
    causal = np.tril(np.ones((t, t), bool))
    for layer in params.layers:
        wq, wk, wv = llama.unfuse_qkv(f(layer.wqkv))
        qkv = norm(x, layer.attn_norm) @ np.concatenate([wq, wk, wv], axis=-1)
        if layer.bqkv is not None:
            qkv = qkv + np.concatenate(llama.unfuse_qkv(f(layer.bqkv)))
        q = rope(qkv[..., : n * d].reshape(b, t, n, d))
        k = rope(qkv[..., n * d : (n + kh) * d].reshape(b, t, kh, d))
        v = qkv[..., (n + kh) * d :].reshape(b, t, kh, d)
        k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # (B, T, N, D)
        scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(d)
        scores = np.where(causal, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        attn = np.einsum("bnqk,bknd->bqnd", p, v).reshape(b, t, n * d)
        x = x + attn @ f(layer.wo)
        gate = norm(x, layer.mlp_norm) @ f(layer.w_gate_up)[:, 0]
        up = norm(x, layer.mlp_norm) @ f(layer.w_gate_up)[:, 1]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ f(layer.w_down)
    x = norm(x, params.norm)
    head = f(params.embed).T if params.lm_head is None else f(params.lm_head)
    return x @ head


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", IDS)
def test_prefill_then_decode_equals_one_full_pass(name, rng):
    """One full causal pass matches the float64 NumPy model; prefill of 5 tokens, then 6 decode steps through the
    jitted, donated step give the same logits at every position."""
    config = CONFIGS[name]
    params = random_params(config, seed=2)
    tokens = rng.integers(0, config.vocab_size, (3, 11))
    full = forward_f64(params, config, tokens)
    logits, cache = jitted("forward", config)(params, make_cache(config, 3, 16), tokens)
    assert logits.shape == (3, 11, config.vocab_size) and logits.dtype == jnp.float32
    assert rel_err(logits, full) < 1e-5
    np.testing.assert_array_equal(np.asarray(cache.lengths), [11] * 3)
    cache = make_cache(config, 3, 16)
    logits, cache = jitted("prefill", config)(params, cache, tokens[:, :5], LAST)
    assert rel_err(logits, full[:, 4]) < 1e-5
    step = jitted("decode_step", config)
    for t in range(5, 11):
        logits, cache = step(params, cache, jnp.asarray(tokens[:, t], jnp.int32))
        assert rel_err(logits, full[:, t]) < 1e-5, t
    np.testing.assert_array_equal(np.asarray(cache.lengths), [11] * 3)
    assert step._cache_size() == 1


def test_ragged_batch_prefill_and_decode(rng):
    """Right-padded prompts of lengths 3, 5, 1: prefill reads each at its own last token, rollback drops the
    padding, and a batched decode step matches each sequence run alone (test_prefill_then_decode's shapes)."""
    config = CONFIGS["llama-gqa4-untied"]
    params = random_params(config, seed=3)
    lengths = np.array([3, 5, 1], np.int32)
    seqs = [rng.integers(0, config.vocab_size, n + 4) for n in lengths]
    padded = np.zeros((3, 5), np.int32)
    for i, n in enumerate(lengths):
        padded[i, :n] = seqs[i][:n]
    cache = make_cache(config, 3, 16)
    logits, cache = jitted("prefill", config)(params, cache, jnp.asarray(padded), jnp.asarray(lengths - 1))
    cache = cache.rollback(jnp.asarray(lengths))
    refs = [forward_f64(params, config, s[None])[0] for s in seqs]
    assert rel_err(logits, np.stack([r[n - 1] for r, n in zip(refs, lengths, strict=True)])) < 1e-5
    for j in range(4):
        tok = np.array([s[n + j] for s, n in zip(seqs, lengths, strict=True)], np.int32)
        logits, cache = jitted("decode_step", config)(params, cache, jnp.asarray(tok))
        want = np.stack([r[n + j] for r, n in zip(refs, lengths, strict=True)])
        assert rel_err(logits, want) < 1e-5, j
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + 4)


@pytest.mark.parametrize("layout", ["layers", "stacked"])
def test_residual_stream_padded_to_min_matmul_rows(layout, rng):
    """With ``min_matmul_rows=8`` (the GPU's row padding) on the CPU, prefill (3 x 2 tokens: padded to 4
    sequences) and decode (3 rows: padded to 8) still match float64, and only the real rows reach the cache."""
    options = llama.LlamaOptions(impl="xla", min_matmul_rows=8)
    config = CONFIGS["qwen2-bias-tied"]
    params = random_params(config, seed=6, layout=layout)
    tokens = rng.integers(0, config.vocab_size, (3, 5))
    full = forward_f64(with_layout(params, "layers"), config, tokens)
    prefill = jax.jit(functools.partial(llama.prefill, config=config, options=options), compiler_options=FAST)
    model_step = functools.partial(llama.decode_step, config=config, options=options)
    step = jax.jit(model_step, donate_argnums=1, compiler_options=FAST)
    logits, cache = prefill(params, make_cache(config, 3, 8), jnp.asarray(tokens[:, :2]))
    assert rel_err(logits, full[:, 1]) < 1e-5
    for t in range(2, 5):
        logits, cache = step(params, cache, jnp.asarray(tokens[:, t], jnp.int32))
        assert logits.shape == (3, config.vocab_size) and rel_err(logits, full[:, t]) < 1e-5, t
    assert cache.batch == 3 and not np.isnan(np.asarray(cache.data[0][:, :, :, :5])).any()
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 5, 5])
    padded = functools.partial(fusions.padded_batch, options=options.resolve())
    assert padded(3, 1) == 8 and padded(3, 2) == 4 and padded(9, 1) == 9
    has_pad = lambda fn: " pad[" in str(jax.make_jaxpr(fn)(params, cache, jnp.asarray(tokens[:, 0], jnp.int32)))
    unpadded = functools.partial(llama.decode_step, config=config, options=XLA)
    assert has_pad(model_step) and not has_pad(unpadded)  # the pad primitive (not a name such as padded_layout)


def test_stacked_and_per_layer_layouts_agree(rng):
    config = CONFIGS["qwen2-bias-tied"]
    params = random_params(config, seed=4, layout="layers")
    stacked = with_layout(params, "stacked")
    assert stacked.stacked and not params.stacked
    assert with_layout(stacked, "layers").layers[1].wqkv.shape == params.layers[1].wqkv.shape
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 11)))  # test_prefill_then_decode's shapes
    outs = []
    for p in (params, stacked):
        logits, cache = jitted("forward", config)(p, make_cache(config, 3, 16), tokens)
        nxt, cache = jitted("decode_step", config)(p, cache, tokens[:, 0])
        outs.append((logits, nxt))
    assert rel_err(outs[1][0], outs[0][0]) < 1e-6
    assert rel_err(outs[1][1], outs[0][1]) < 1e-6


@pytest.mark.parametrize("kind", ["paged", "q8"])
def test_other_cache_types_plug_in(kind, rng):
    """The model only uses the shared cache protocol: the paged cache gives the contiguous cache's logits, the Q8
    cache the same up to its quantization error."""
    config = CONFIGS["q8able-gqa2"]
    params = random_params(config, seed=5)
    tokens = rng.integers(0, config.vocab_size, (2, 10))
    full = forward_f64(params, config, tokens)
    cache = make_cache(config, 2, 16, kind=kind)
    logits, cache = jitted("prefill", config)(params, cache, jnp.asarray(tokens[:, :6]))
    got = [logits]
    for t in range(6, 10):
        logits, cache = jitted("decode_step", config)(params, cache, jnp.asarray(tokens[:, t], jnp.int32))
        got.append(np.asarray(logits))
    tol = {"paged": 1e-5, "q8": 3e-2}[kind]
    assert rel_err(np.stack(got, 1), full[:, 5:10]) < tol
    want = {"paged": ("paged", "Plain"), "q8": ("contiguous", "Q8")}[kind]
    assert (cache.layout, type(cache.format).__name__) == want


def test_pallas_decode_matches_xla(rng):
    """impl="pallas" goes through jkv.attend_write to the Pallas kernel that writes the new row and
    attends in one launch (interpret mode off GPU): ragged lengths, several steps after one (XLA) prefill, logits
    and cache contents equal the XLA path's."""
    config = CONFIGS["llama-gqa4-untied"]
    params = random_params(config, seed=6)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 8)))  # the shapes of the tests above: shared compiles
    outs, caches = {}, {}
    for impl in ("xla", "pallas"):
        _, cache = jitted("prefill", config)(params, make_cache(config, 3, 16), tokens[:, :5], LAST)
        cache = cache.rollback(jnp.asarray([5, 1, 3]))  # ragged: sequence 1 continues from position 1
        got = []
        for t in range(5, 8):
            logits, cache = jitted("decode_step", config, impl)(params, cache, tokens[:, t])
            got.append(np.asarray(logits))
        outs[impl], caches[impl] = np.stack(got, 1), cache
    assert rel_err(outs["pallas"], outs["xla"]) < 1e-5
    np.testing.assert_array_equal(caches["pallas"].lengths, [8, 4, 6])
    for name in (0, 1):  # K and V: the valid positions (the test cache holds NaN past them)
        for b, n in enumerate([8, 4, 6]):
            got, want = (caches[impl].data[name][:, b, :, :n] for impl in ("pallas", "xla"))
            assert rel_err(got, want) < 1e-5, (name, b)
    step = functools.partial(llama.decode_step, config=config, options=llama.LlamaOptions(impl="pallas"))
    assert "jkv_decode_attention_append" in str(jax.make_jaxpr(step)(params, cache, tokens[:, 0]))


@pytest.mark.parametrize("name", ["llama-gqa4-untied", "qwen2-bias-tied"])
def test_packed_qkv_equals_the_slices(name, rng):
    """``LlamaOptions.pack_qkv`` (the default): a padded step hands attention the fused projection's one array and
    the decode kernel reads its rows in place; prefill and decode logits and the cache are the sliced path's
    (``pack_qkv=False``) bit for bit, biases included."""
    config = CONFIGS[name]
    params = random_params(config, seed=9)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 7)))
    results = {}
    for pack in (True, False):
        options = llama.LlamaOptions(impl="pallas", pack_qkv=pack)
        prefill = jax.jit(functools.partial(llama.prefill, config=config, options=options), compiler_options=FAST)
        step = jax.jit(functools.partial(llama.decode_step, config=config, options=options), compiler_options=FAST)
        first, cache = prefill(params, make_cache(config, 3, 16), tokens[:, :5])
        cache = cache.rollback(jnp.asarray([5, 2, 4]))  # ragged
        second, cache = step(params, cache, tokens[:, 5])
        third, cache = step(params, cache, tokens[:, 6])
        results[pack] = (first, second, third, cache)
    for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("layout", ["layers", "stacked"])
def test_norm_kernel_matches_float64(layout, rng):
    """With ``norm_kernel`` on, impl="pallas" runs every RMSNorm through the Pallas kernel (interpret mode off
    GPU): prefill and decode still match the float64 forward pass."""
    options = llama.LlamaOptions(impl="pallas", norm_kernel=True)
    config = CONFIGS["qwen2-bias-tied"]
    params = random_params(config, seed=8, layout=layout)
    tokens = rng.integers(0, config.vocab_size, (2, 6))
    full = forward_f64(with_layout(params, "layers"), config, tokens)
    prefill = jax.jit(functools.partial(llama.prefill, config=config, options=options), compiler_options=FAST)
    model_step = functools.partial(llama.decode_step, config=config, options=options)
    step = jax.jit(model_step, compiler_options=FAST)
    logits, cache = prefill(params, make_cache(config, 2, 8), jnp.asarray(tokens[:, :4]))
    assert rel_err(logits, full[:, 3]) < 1e-5
    for t in range(4, 6):
        logits, cache = step(params, cache, jnp.asarray(tokens[:, t], jnp.int32))
        assert rel_err(logits, full[:, t]) < 1e-5, t
    jaxpr = str(jax.make_jaxpr(model_step)(params, cache, jnp.asarray(tokens[:, 0], jnp.int32)))
    assert "jkv_residual_rms_norm" in jaxpr  # the kernel ran, not the XLA path
    plain = functools.partial(llama.decode_step, config=config, options=llama.LlamaOptions(impl="pallas"))
    assert "jkv_residual_rms_norm" not in str(jax.make_jaxpr(plain)(params, cache, jnp.asarray(tokens[:, 0])))


def test_bf16_weights_and_cache_track_f32(rng):
    config = CONFIGS["qwen2-bias-tied"]
    params32 = random_params(config, seed=7)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 11)))  # test_prefill_then_decode's shapes
    l32, _ = jitted("forward", config)(params32, make_cache(config, 3, 16), tokens)
    forward16 = jax.jit(functools.partial(llama.forward, config=config, options=XLA))
    l16, c16 = forward16(params16, make_cache(config, 3, 16, jnp.bfloat16), tokens)
    assert l16.dtype == jnp.float32 and c16.data[0].dtype == jnp.bfloat16
    assert rel_err(l16, l32) < 3e-2


# ---------------------------------------------------------------------------------------------- compilation
@pytest.mark.parametrize("layout", ["layers", "stacked"])
def test_decode_step_compiles_once_and_runs_in_place(layout, rng):
    """One trace serves every position of a ragged batch; the donated cache is aliased, not copied."""
    # Eight layers: the reference attention's per-layer scratch (about one layer of K and V) stays well under
    # a copy of the whole cache.
    config = dataclasses.replace(CONFIGS["llama-gqa4-untied"], num_layers=8)
    params = random_params(config, seed=8, layout=layout)
    traces = []

    def counted(params, cache, tokens):
        traces.append(1)
        return llama.decode_step(params, cache, tokens, config=config)

    cache = make_cache(config, 4, 256).begin(jnp.array([0, 3, 9, 1], jnp.int32)).commit()
    step = jax.jit(counted, donate_argnums=1)
    for _ in range(5):
        _, cache = step(params, cache, jnp.asarray(rng.integers(0, config.vocab_size, 4), jnp.int32))
    assert len(traces) == 1 and step._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 8, 14, 6])

    tokens = jnp.zeros((4,), jnp.int32)
    stats = step.lower(params, cache, tokens).compile().memory_analysis()
    buffers = sum(x.nbytes for x in cache.data)
    assert stats.alias_size_in_bytes >= buffers
    assert stats.temp_size_in_bytes < buffers // 4, stats.temp_size_in_bytes  # a copy of K alone is buffers // 2
    plain = jax.jit(counted).lower(params, cache, tokens).compile().memory_analysis()
    assert plain.alias_size_in_bytes == 0  # the check above can fail


# ---------------------------------------------------------------------------------------------- validation
CONFIG_ERRORS = {
    "zero-layers": (dict(num_layers=0), ValueError, "num_layers must be a positive int"),
    "heads-not-multiple": (dict(num_heads=6, num_kv_heads=4), ValueError, "must be a multiple of num_kv_heads"),
    "odd-head-dim": (dict(head_dim=15), ValueError, "head_dim must be a positive even int"),
    "rope-factors-length": (dict(rope_factors=(1.0, 2.0)), ValueError, "rope_factors has 2 values"),
}


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_config_errors(name):
    changes, error, message = CONFIG_ERRORS[name]
    with pytest.raises(error, match=message):
        dataclasses.replace(CONFIGS["llama-gqa4-untied"], **changes)


def test_params_errors():
    config = CONFIGS["llama-gqa4-untied"]
    params = random_params(config)
    with pytest.raises(TypeError, match="params must be LlamaParams"):
        llama.check_params({"embed": params.embed}, config)
    with pytest.raises(ValueError, match=r"params has 1 layers, config.num_layers=2"):
        llama.check_params(params.replace(layers=params.layers[:1]), config)
    with pytest.raises(ValueError, match=r"params.lm_head is absent but config.tie_embeddings=False"):
        llama.check_params(params.replace(lm_head=None), config)
    bad = params.replace(layers=(params.layers[0], params.layers[1].replace(wo=params.layers[1].wo[:, :8])))
    with pytest.raises(ValueError, match=r"params.layers\[1\].wo has shape \(128, 8\), expected \(128, 64\)"):
        llama.check_params(bad, config)
    stacked = with_layout(params, "stacked")
    with pytest.raises(ValueError, match=r"params.layers.bqkv has shape \(2, 4, 6, 16\), expected None"):
        llama.check_params(stacked.replace(layers=stacked.layers.replace(bqkv=jnp.zeros((2, 4, 6, 16)))), config)
    with pytest.raises(ValueError, match="layout='rows' is not one of"):
        llama.with_layout(params, "rows")


OPTION_ERRORS = {
    "impl": (dict(impl="cuda"), "LlamaOptions.impl='cuda' is not one of"),
    "norm-kernel": (dict(norm_kernel=1), "LlamaOptions.norm_kernel must be a bool or None, got 1"),
    "pack-qkv": (dict(pack_qkv=None), "LlamaOptions.pack_qkv must be a bool, got None"),
    "min-rows-zero": (dict(min_matmul_rows=0), "min_matmul_rows must be a positive int or None, got 0"),
}


@pytest.mark.parametrize("name", list(OPTION_ERRORS))
def test_options_errors(name):
    changes, message = OPTION_ERRORS[name]
    with pytest.raises(ValueError, match=message):
        llama.LlamaOptions(**changes)


def test_options_resolve_to_the_backend_defaults():
    """``None`` fields take the measured rule for the backend; given values stay; equal options hash equal (one
    compile per distinct option set)."""
    resolved = llama.LlamaOptions().resolve()
    gpu = jax.default_backend() == "gpu"
    assert resolved.impl == ("pallas" if gpu else "xla")
    assert resolved.min_matmul_rows == (8 if gpu else 1) and resolved.norm_kernel is None  # before dp4a products
    assert llama.LlamaOptions(impl="xla", min_matmul_rows=4).resolve() == llama.LlamaOptions("xla", None, 4)
    assert hash(llama.LlamaOptions(impl="xla")) == hash(llama.LlamaOptions(impl="xla"))


def test_presets_by_name():
    assert llama.LlamaConfig.from_name("llama3-8b") == llama.LlamaConfig.llama3_8b()
    assert set(llama.PRESETS) == {"smollm2-135m", "llama3-8b", "qwen2-0.5b"}
    with pytest.raises(ValueError, match="no LlamaConfig preset named 'gpt2'; presets: "):
        llama.LlamaConfig.from_name("gpt2")


def test_presets_have_published_sizes():
    assert llama.LlamaConfig.smollm2_135m().num_params() == 134_515_008
    assert abs(llama.LlamaConfig.llama3_8b().num_params() - 8.03e9) < 0.01e9
    assert abs(llama.LlamaConfig.qwen2_0_5b().num_params() - 0.494e9) < 0.001e9
