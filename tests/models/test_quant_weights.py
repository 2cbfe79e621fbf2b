"""Block-quantized weights in the Llama model (``jkv.models.quant``): a model whose matrices are
``QuantizedMatrix`` pytrees computes what the model of their dequantized values computes (float32, up to
summation order), through the reference (``impl="xla"``) and the kernels (``"pallas"``, interpret mode here),
in either layer layout; the pytree's shape, bytes, errors and embedding rows."""

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

CONFIG = llama.LlamaConfig(
    vocab_size=320, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64
)


@functools.cache
def dense_params():
    return llama.init_params(CONFIG, jax.random.key(3), jnp.float32, scale=0.05, layout="layers")


@functools.cache
def quantized(choice):  # quantized on the host once per format (two tests take Q8_0)
    return quantize_params(dense_params(), choice)


# One compile each (eager, every matrix shape's dequantize or stack compiles on its own).
dequantized = jax.jit(quant.dequantize_params)
stacked_layout = jax.jit(functools.partial(llama.with_layout, layout="stacked"))


@functools.cache
def forward(impl):  # one jitted function per impl: dense and dequantized params share its compile
    options = llama.LlamaOptions(impl=impl)
    return jax.jit(functools.partial(llama.forward, config=CONFIG, options=options), compiler_options=FAST_COMPILE)


def logits_of(params, tokens, impl):
    spec = jkv.CacheSpec(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, 16)
    return np.asarray(forward(impl)(params, jkv.KVCache.init(spec, tokens.shape[0]), tokens)[0])


@pytest.mark.parametrize("choice,impl", [("q8_0", "pallas"), ("q4_k", "xla")])
def test_quantized_model_computes_its_dequantized_model(rng, choice, impl):
    params = quantized(choice)
    assert isinstance(params.layers[0].wqkv, quant.QuantizedMatrix)
    assert params.layers[1].w_down.format == choice.upper() and params.embed.format == "Q8_0"
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 5)), jnp.int32)
    got = logits_of(params, tokens, impl)
    want = logits_of(dequantized(params), tokens, "xla")
    assert rel_err(got, want) < 1e-5
    # and the quantization itself stays near the float model (its error is the format's, docs/quant.md)
    assert rel_err(got, logits_of(dense_params(), tokens, "xla")) < {"q8_0": 0.02, "q4_k": 0.2}[choice]


def test_stacked_layout_takes_quantized_layers(rng):
    params = quantized("q8_0")
    stacked = stacked_layout(params)
    assert stacked.layers.wqkv.shape == (2, *params.layers[0].wqkv.shape)
    llama.check_params(stacked, CONFIG)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 5)), jnp.int32)
    assert rel_err(logits_of(stacked, tokens, "xla"), logits_of(params, tokens, "xla")) < 1e-6


@pytest.mark.parametrize("fmt", ["Q4_1", "Q6_K"])
def test_matrix_dequantizes_in_dense_layout_and_counts_its_bytes(rng, fmt):
    """A [H, 2, F] weight over N = 2F rows: dequantize() is the rows' transpose in the dense layout."""
    h, f = 256, 48
    planes = random_planes(rng, fmt, 2 * f, h)
    w = quant.from_planes(fmt, planes, (h, 2, f), jnp.float32)
    assert w.shape == (h, 2, f) and w.dtype == jnp.float32 and w.out_shape == (2, f)
    assert w.nbytes == sum(p.nbytes for p in planes)
    np.testing.assert_allclose(np.asarray(w.dequantize()), dequantize_f64(planes, fmt).T.reshape(h, 2, f), rtol=1e-6)
    x = rng.standard_normal((3, h)).astype(np.float32)
    y = quant.project(jnp.asarray(x), w, "xla")
    assert rel_err(y, (x @ dequantize_f64(planes, fmt).T).reshape(3, 2, f)) < 1e-6


def test_embedding_rows_and_tied_head(rng):
    v, h = 40, 64
    planes = random_planes(rng, "Q8_0", v, h)
    w = quant.from_planes("Q8_0", planes, (v, h), jnp.float32, reduce_axis=1)
    ids = jnp.asarray([[3, 39], [0, 3]])
    np.testing.assert_array_equal(np.asarray(quant.take_rows(w, ids)), dequantize_f64(planes, "Q8_0")[np.asarray(ids)])
    with pytest.raises(ValueError, match="reduces over axis 1, not 0"):
        quant.project(jnp.ones((2, h)), w, "xla", contract=0)


@pytest.mark.parametrize(
    "shape,axis,match",
    [((32, 80), 0, r"cannot stand for a dense \(32, 80\)"), ((40, 64), 2, "reduce_axis=2"), ((40,), 0, "reduce_axis")],
)
def test_from_planes_rejects_a_shape_the_planes_do_not_hold(rng, shape, axis, match):
    planes = random_planes(rng, "Q8_0", 40, 64)
    with pytest.raises(ValueError, match=match):
        quant.from_planes("Q8_0", planes, shape, jnp.float32, axis)


def test_quantizing_quantized_params_is_an_error():
    """Quantizing blocks again would stack a second rounding on the first without a word: an error naming the
    matrix and the way to its values."""
    with pytest.raises(ValueError, match=r"layers\[0\]\.wqkv is already Q8_0: .*dequantize_params"):
        quantize_params(quantized("q8_0"), "q4_k")


def test_weights_impl_is_checked():
    assert llama.LlamaOptions(impl="pallas", weights_impl="xla").resolve().weights_impl == "xla"
    with pytest.raises(ValueError, match="weights_impl='cuda' is not one of"):
        llama.LlamaOptions(weights_impl="cuda")


def test_mgpu_weights_impl_lowers_to_the_mosaic_gpu_kernel_where_it_takes_the_matrix(rng, monkeypatch):
    """``weights_impl="mgpu"``: bf16 activations times a Q8_0 matrix the Mosaic GPU kernel takes lower (for CUDA,
    no GPU needed) to that kernel; a matrix it refuses (N below its 64-row block) and more rows than its block (short
    of ``quant.DEQUANT_MIN_ROWS``) to the Triton kernel."""
    from pallas_kernels import backend

    monkeypatch.setattr(backend, "resolve_interpret", lambda interpret: bool(interpret))
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    from pallas_kernels import qmatmul_mgpu

    beyond = qmatmul_mgpu.MAX_BLOCK_M + 8  # more rows than the Mosaic GPU kernel's block, short of DEQUANT_MIN_ROWS
    assert beyond < quant.DEQUANT_MIN_ROWS
    for m, n, kernel in ((1, 128, "mosaic_gpu"), (1, 40, "xla.gpu.triton"), (beyond, 128, "xla.gpu.triton")):
        x = jax.ShapeDtypeStruct((m, 256), jnp.bfloat16)
        w = quant.from_planes("Q8_0", random_planes(rng, "Q8_0", n, 256), (256, n), jnp.bfloat16)
        text = jax.jit(lambda x, w: quant.project(x, w, "mgpu")).trace(x, w).lower(lowering_platforms=("cuda",))
        assert kernel in text.as_text() and ("mosaic_gpu" in text.as_text()) == (kernel == "mosaic_gpu"), (m, n)
    with pytest.raises(ValueError, match="'gemm' is not one of"):
        quant.project(jnp.ones((1, 256)), w, "gemm")


@pytest.mark.parametrize("impl", ["pallas", "mgpu"])
def test_prefill_sized_products_dequantize_for_one_dot(rng, monkeypatch, impl):
    """From ``quant.DEQUANT_MIN_ROWS`` rows a product lowers (for CUDA, no GPU needed) to the matrix dequantized
    and one XLA dot under either kernel impl, with no kernel, its planes behind an optimization barrier with the
    activations; a row fewer still runs the Triton kernel. The values are the reference's
    (``test_quantized_model_computes_its_dequantized_model`` covers the model)."""
    from pallas_kernels import backend

    monkeypatch.setattr(backend, "resolve_interpret", lambda interpret: bool(interpret))
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    w = quant.from_planes("Q4_K", random_planes(rng, "Q4_K", 128, 256), (256, 128), jnp.bfloat16)
    for m in (quant.DEQUANT_MIN_ROWS - 1, quant.DEQUANT_MIN_ROWS, 3 * quant.DEQUANT_MIN_ROWS):
        x = jax.ShapeDtypeStruct((m, 256), jnp.bfloat16)
        text = jax.jit(lambda x, w: quant.project(x, w, impl)).trace(x, w).lower(lowering_platforms=("cuda",))
        text = text.as_text()
        kernel = "xla.gpu.triton" in text or "mosaic_gpu" in text
        assert kernel == (m < quant.DEQUANT_MIN_ROWS), (m, impl)
        if m >= quant.DEQUANT_MIN_ROWS:  # the planes wait for the activations (no dequantization hoisted)
            assert "dot_general" in text and "bf16" in text and "optimization_barrier" in text
    # the dp4a layout past its kernel's rows: its interleaved words wait too, before they go back to rows for the
    # row layout's kernel (mid-size rows) or are dequantized (prefill-sized)
    laid = quant.to_dp4a_layout({"w": w})["w"]
    for m in (quant.DP4A_MAX_ROWS + 1, quant.DEQUANT_MIN_ROWS):
        x = jax.ShapeDtypeStruct((m, 256), jnp.bfloat16)
        lowered = jax.jit(lambda x, w: quant.project(x, w, impl)).trace(x, laid).lower(lowering_platforms=("cuda",))
        text = lowered.as_text()
        barrier = next(line for line in text.splitlines() if "optimization_barrier" in line)
        assert "x4xi32>" in barrier  # the words [K/16, N, 4] as held
        assert ("xla.gpu.triton" in text) == (m < quant.DEQUANT_MIN_ROWS), m
