"""The dp4a layout of quantized weights (``jkv.models.quant.to_dp4a_layout``): the same bytes laid out for the
integer-dot kernel's coalesced reads. The matrix it holds is unchanged (dequantized exactly as before, shape and
bytes equal); decode-sized products run the integer-dot kernel (interpret mode here) within the bound of its
activations' int8 rounding against float64; larger ones compute exactly what the row layout's products do; a
model in this layout, in either layer layout, computes its prefill as the row-layout model and its decode step
within the activations' rounding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_compile import FAST_COMPILE
from qweight_inputs import dequantize_f64, random_planes

import jkv
from jkv.loading.quantize import quantize_params
from jkv.models import llama, quant
from pallas_kernels import qmatmul_dp4a

CONFIG = llama.LlamaConfig(
    vocab_size=320, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64
)


def rounding_bound(x, w):
    """What rounding ``x`` to int8 per 32-block (scale ``max|x| / 127``, to nearest) can move ``x @ w.T`` by."""
    blocks = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=2) / 127.0
    return (np.repeat(blocks, 32, axis=1) / 2) @ np.abs(w).T + 1e-5 * (np.abs(x) @ np.abs(w).T)


@pytest.mark.parametrize("fmt", quant.DP4A_FORMATS)
def test_matrix_keeps_its_values_and_products(rng, fmt):
    h, f = 512, 40  # a [H, 2, F] weight over N = 2F rows
    planes = random_planes(rng, fmt, 2 * f, h)
    w = quant.from_planes(fmt, planes, (h, 2, f), jnp.float32)
    laid = quant.to_dp4a_layout(w)
    assert laid.layout == "dp4a" and w.layout == "rows"
    assert laid.shape == w.shape and laid.nbytes == w.nbytes and laid.out_shape == (2, f)
    assert laid.planes[0].shape == (h // qmatmul_dp4a.block_format(fmt).parts // 16, 2 * f, 4)
    np.testing.assert_array_equal(np.asarray(laid.dequantize()), np.asarray(w.dequantize()))
    dense = dequantize_f64(planes, fmt)  # [N, K]
    for m in (3, quant.DP4A_MAX_ROWS):  # rows padded in the kernel's program; the most rows the kernel takes
        x = rng.standard_normal((m, h)).astype(np.float32)
        got = np.asarray(quant.project(jnp.asarray(x), laid, "pallas"), np.float64).reshape(m, 2 * f)
        exact = x.astype(np.float64) @ dense.T
        assert np.all(np.abs(got - exact) <= rounding_bound(x.astype(np.float64), dense))
        assert rel_err(got, exact) > 1e-7  # the activations were rounded: this is the integer-dot kernel's product
    for m in (quant.DP4A_MAX_ROWS + 1, quant.DEQUANT_MIN_ROWS):  # the row layout's kernel, then dequantize + one dot
        x = jnp.asarray(rng.standard_normal((m, h)), jnp.float32)
        np.testing.assert_array_equal(np.asarray(quant.project(x, laid, "pallas")), quant.project(x, w, "pallas"))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_mid_rows_run_the_row_layout_kernel(rng, fmt, monkeypatch):
    """``quant.DP4A_MID_ROWS``: products of more rows than the integer-dot kernel takes and fewer than
    ``DEQUANT_MIN_ROWS`` put the words back in the row layout and run its kernel ("rows", the default): the row
    layout's product exactly; "dequantize" dequantizes the matrix for one dot; a bad value is refused."""
    h, n = 512, 48
    w = quant.from_planes(fmt, random_planes(rng, fmt, n, h), (h, n), jnp.float32)
    laid = quant.to_dp4a_layout(w)
    x = jnp.asarray(rng.standard_normal((quant.DP4A_MAX_ROWS + 24, h)), jnp.float32)
    kernel = np.asarray(quant.project(x, w, "pallas"))  # the row layout: its Triton kernel below DEQUANT_MIN_ROWS
    reference = np.asarray(quant.project(x, w, "xla"))
    assert not np.array_equal(kernel, reference)  # the two forms differ in their float rounding: the test can tell
    assert quant.DP4A_MID_ROWS == "rows"
    np.testing.assert_array_equal(np.asarray(quant.project(x, laid, "pallas")), kernel)
    np.testing.assert_array_equal(np.asarray(quant.project(x, laid, "xla")), reference)
    monkeypatch.setattr(quant, "DP4A_MID_ROWS", "dequantize")
    np.testing.assert_array_equal(np.asarray(quant.project(x, laid, "pallas")), reference)
    monkeypatch.setattr(quant, "DP4A_MID_ROWS", "gemv")
    with pytest.raises(ValueError, match="DP4A_MID_ROWS='gemv' must be one of"):
        quant.project(x, laid, "pallas")


def test_donated_conversion_frees_the_row_planes(rng):
    """``donate=True`` (the loader's): each converted matrix's row-layout planes are freed once its new ones exist,
    so a model's weights are never on the device twice; what it does not convert is left alone."""
    w = quant.from_planes("Q4_K", tuple(map(jnp.asarray, random_planes(rng, "Q4_K", 40, 512))), (512, 40), jnp.float32)
    q6 = quant.from_planes("Q6_K", tuple(map(jnp.asarray, random_planes(rng, "Q6_K", 16, 256))), (256, 16), jnp.float32)
    want = np.asarray(w.dequantize())
    out = quant.to_dp4a_layout({"w": w, "q6": q6}, donate=True)
    assert all(p.is_deleted() for p in w.planes) and not any(p.is_deleted() for p in q6.planes)
    np.testing.assert_array_equal(np.asarray(out["w"].dequantize()), want)
    assert out["q6"] is q6


def test_layout_leaves_what_it_does_not_take(rng):
    """Embeddings (rows are looked up), Q6_K (8-byte windows) and dense weights stay as they are; converting
    twice changes nothing."""
    embed = quant.from_planes("Q8_0", random_planes(rng, "Q8_0", 40, 64), (40, 64), jnp.float32, reduce_axis=1)
    q6 = quant.from_planes("Q6_K", random_planes(rng, "Q6_K", 16, 256), (256, 16), jnp.float32)
    q8 = quant.to_dp4a_layout(quant.from_planes("Q8_0", random_planes(rng, "Q8_0", 16, 64), (64, 16), jnp.float32))
    tree = {"embed": embed, "q6": q6, "dense": jnp.ones((4, 4)), "q8": q8}
    out = quant.to_dp4a_layout(tree)
    assert out["embed"] is embed and out["q6"] is q6 and out["dense"] is tree["dense"] and out["q8"] is q8
    with pytest.raises(ValueError, match="take_rows needs"):
        quant.take_rows(quant.to_dp4a_layout(q8).replace(reduce_axis=1), jnp.zeros((1,), jnp.int32))


@functools.cache
def forward(impl, norm_kernel=False):
    options = llama.LlamaOptions(impl=impl, norm_kernel=norm_kernel)
    return jax.jit(functools.partial(llama.forward, config=CONFIG, options=options), compiler_options=FAST_COMPILE)


def logits_of(params, tokens, impl, norm_kernel=False):
    spec = jkv.CacheSpec(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, 16)
    cache = jkv.KVCache.init(spec, tokens.shape[0])
    return np.asarray(forward(impl, norm_kernel)(params, cache, tokens)[0], np.float64)


@pytest.mark.parametrize("choice,layer_layout", [("q4_k", "layers"), ("q8_0", "stacked")])
def test_model_in_the_dp4a_layout(rng, choice, layer_layout):
    dense = llama.init_params(CONFIG, jax.random.key(3), jnp.float32, scale=0.05, layout="layers")
    rows = quantize_params(dense, choice)
    if layer_layout == "stacked":
        rows = llama.with_layout(rows, layout="stacked")
    laid = quant.to_dp4a_layout(rows)
    wqkv = lambda p: p.layers.wqkv if layer_layout == "stacked" else p.layers[0].wqkv
    assert wqkv(laid).layout == "dp4a" and laid.embed.layout == "rows" and wqkv(laid).shape == wqkv(rows).shape
    prompt = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 9)), jnp.int32)  # 18 rows: dequantize, one dot
    assert prompt.size > quant.DP4A_MAX_ROWS
    assert rel_err(logits_of(laid, prompt, "pallas"), logits_of(rows, prompt, "xla")) < 1e-6
    step = prompt[:, :1]  # 2 rows: the integer-dot kernel, activations rounded to int8
    got, want = logits_of(laid, step, "pallas"), logits_of(rows, step, "xla")
    assert 1e-6 < rel_err(got, want) < 0.02


def test_norm_kernel_rounds_before_the_dp4a_product(rng, monkeypatch):
    """With the norm kernel (by default: ``norm_kernel=None``; or True), the norms before ``wqkv`` and
    ``w_gate_up`` round their rows for the integer-dot product in the same launch
    (``rms_norm.residual_rms_norm_rounded``): the same codes as the product's own rounding, so the logits are the
    plain norm's (``norm_kernel=False``) up to the norm scale's float rounding; prompts (more rows than the kernel
    takes) keep the plain norm. Q4_K weights: the rounding does not depend on the format (Q8_0's dp4a products are
    compared with the row layout's in test_model_in_the_dp4a_layout)."""
    laid = quant.to_dp4a_layout(quantize_params(llama.init_params(CONFIG, jax.random.key(3), jnp.float32,
                                                                  scale=0.05, layout="layers"), "q4_k"))  # fmt: skip
    rounded = []
    project_rounded = quant.project_rounded
    monkeypatch.setattr(
        quant, "project_rounded", lambda r, lead, w: rounded.append(lead) or project_rounded(r, lead, w)
    )
    step = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 1)), jnp.int32)
    want = logits_of(laid, step, "pallas", norm_kernel=False)
    assert not rounded
    got = logits_of(laid, step, "pallas", norm_kernel=None)  # True rounds alike: where it rounds, None is True
    assert rounded == [(2, 1)] * 2 * CONFIG.num_layers  # wqkv and w_gate_up of each layer
    assert rel_err(got, want) < 1e-6
    rounded.clear()
    prompt = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 9)), jnp.int32)
    got, want = logits_of(laid, prompt, "pallas", norm_kernel=True), logits_of(laid, prompt, "pallas", False)
    assert not rounded and rel_err(got, want) < 1e-6


def test_decode_rows_are_not_padded_for_the_dp4a_kernel(rng, monkeypatch):
    """The residual stream is padded to ``min_matmul_rows`` for XLA's dense products, but not in a model holding
    dp4a-layout matrices: the integer-dot kernel's work grows with its rows (a batch-1 step padded to 8 rows made
    it slower than the row layout's kernel on the GPU)."""
    seen = []
    project = quant._project_dp4a
    monkeypatch.setattr(quant, "_project_dp4a", lambda x2, w, impl: seen.append(x2.shape[0]) or project(x2, w, impl))
    dense = llama.init_params(CONFIG, jax.random.key(3), jnp.float32, scale=0.05, layout="layers")
    laid = quant.to_dp4a_layout(quantize_params(dense, "q8_0"))
    assert quant.holds_layout(laid, "dp4a") and not quant.holds_layout(dense, "dp4a")
    options = llama.LlamaOptions(impl="pallas", min_matmul_rows=8)
    spec = jkv.CacheSpec(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, 16)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, 1)), jnp.int32)
    logits, _ = jax.jit(functools.partial(llama.forward, config=CONFIG, options=options))(
        laid, jkv.KVCache.init(spec, 1), tokens
    )
    assert logits.shape == (1, 1, CONFIG.vocab_size) and seen and set(seen) == {1}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: the integer-dot kernel compiled")
@pytest.mark.parametrize("choice", ["q4_k", "q8_0"])
def test_gpu_model_in_the_dp4a_layout(rng, choice):
    """The same on a GPU: the integer-dot kernel compiled by Triton, over the interleaved words."""
    test_model_in_the_dp4a_layout(rng, choice, "layers")
