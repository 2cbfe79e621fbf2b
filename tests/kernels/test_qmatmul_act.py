"""``pallas_kernels.qmatmul_act``: the dp4a path's activation rounding in one launch gives the words and factors of
``qmatmul_dp4a.quantize_activations`` (interpret mode: bit for bit; the real lowering: within one code where a
float rounds differently), and the products made from either are the same."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import fast_jit
from qweight_inputs import planes_like, random_planes

from pallas_kernels import backend, block_formats, qmatmul_act, qmatmul_dp4a
from pallas_kernels import quantized_matmul as qmatmul

FORMATS = tuple(block_formats.FORMATS)
ON_GPU = backend.gpu_backend() == backend.TRITON


def activations(rng, m, k, dtype):
    """Rows of very different scales, a zero block, a block whose largest value is negative, exact halves."""
    x = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, (m, 1))
    x[0, 32:64] = 0.0
    x[-1, :32] = np.linspace(-127.0, 0.0, 32)  # peak 127 (negative): unit 1, codes at every integer
    x[-1, 1:32:2] += 0.5  # halves: round up
    return jnp.asarray(x, dtype)


def both(x, fmt, interpret):
    fn = lambda rows: qmatmul_act.rounded_rows(rows, fmt, interpret=interpret)
    return jax.jit(lambda v: qmatmul_dp4a.quantize_activations(v, fmt))(x), fast_jit(fn)(x)


@pytest.mark.parametrize("m,k", [(1, 4096), (3, 96), (2, 7168), (5, 256)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_same_words_and_factors_as_xla_interpret(rng, fmt, m, k):
    """Every chunk size (96: 32-value programs; 7168: seven 1024-value ones), bf16 rows, each format's factors."""
    (want_words, want_factors), (words, factors) = both(activations(rng, m, k, jnp.bfloat16), fmt, True)
    assert words.shape == (m, k // 4) and words.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(words), np.asarray(want_words))
    assert len(factors) == len(want_factors) == {"Q4_0": 2, "Q4_1": 2, "Q4_K": 2, "Q6_K": 3}.get(fmt, 1)
    for got, want in zip(factors, want_factors, strict=True):
        assert got.shape == (m, k // 32) and got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rounding_rule():
    """Halves round up, each block's peak is +-127, a zero block has zero codes and a zero scale."""
    x = np.zeros((1, 64), np.float32)
    x[0, :6] = [127.0, 0.5, -0.5, 1.5, -1.5, 2.5]
    words, (scale,) = qmatmul_act.rounded_rows(jnp.asarray(x), "Q8_0", interpret=True)
    codes = np.asarray(words).view(np.int8)[0]
    np.testing.assert_array_equal(codes[:6], [127, 1, 0, 2, -1, 3])
    assert not codes[6:].any() and np.asarray(scale)[0, 1] == 0.0 and np.asarray(scale)[0, 0] == np.float32(1.0)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "Q6_K"])
def test_products_equal_under_either_rounding_interpret(rng, fmt, monkeypatch):
    """The dp4a product through ``quantized_matmul`` is the same array whichever form rounds its activations."""
    k = 2 * block_formats.FORMATS[fmt].block
    planes = tuple(jnp.asarray(p) for p in random_planes(rng, fmt, 37, k))
    x = activations(rng, 3, k, jnp.float32)
    config = qmatmul.dp4a_config(3, 37, k, fmt)
    run = lambda: np.asarray(qmatmul.qmatmul(x, planes, fmt, config=config, interpret=True))
    want = run()
    monkeypatch.setattr(qmatmul_act, "ROUNDING", "kernel")
    np.testing.assert_array_equal(run(), want)
    monkeypatch.setattr(qmatmul_act, "ROUNDING", "fast")
    with pytest.raises(ValueError, match="ROUNDING='fast' must be one of"):
        run()


def test_refuses_rows_not_in_blocks():
    with pytest.raises(ValueError, match="K=48 values"):
        qmatmul_act.chunk_of(48)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lowers_to_one_triton_kernel_before_the_product(fmt):
    """For CUDA on any host: the rounding is one Triton kernel of its own, then the product's."""
    sds = jax.ShapeDtypeStruct
    n, k = 1024, 512
    config = qmatmul.dp4a_config(1, n, k, fmt)
    args = (sds((1, k), jnp.bfloat16), planes_like(fmt, n, k, sds))
    traced = qmatmul._qmatmul.trace(*args, fmt=fmt, config=config, interpret=False, rounding="kernel")
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 and f"jkv_act_rounding_{fmt.lower()}" in text
    assert "stablehlo.floor" not in text and "stablehlo.maximum" not in text  # no rounding left to XLA


def test_auto_rounds_in_the_kernel_on_a_gpu_and_in_xla_when_interpreting(monkeypatch):
    """The default ``"auto"``: lowered for CUDA the rounding is its own Triton kernel; in interpret mode XLA's
    fusions round (the kernel is never called), and ``"xla"`` keeps XLA's form on a GPU too."""
    assert qmatmul_act.ROUNDING == "auto"
    calls = []
    kernel = qmatmul_act.rounded_rows
    monkeypatch.setattr(qmatmul_act, "rounded_rows", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    sds = jax.ShapeDtypeStruct
    n, k, fmt = 256, 512, "Q4_K"
    config = qmatmul.dp4a_config(1, n, k, fmt)
    args = (sds((1, k), jnp.bfloat16), planes_like(fmt, n, k, sds))

    def lowered(interpret, rounding):
        calls.clear()
        traced = qmatmul._qmatmul.trace(*args, fmt=fmt, config=config, interpret=interpret, rounding=rounding)
        return traced.lower(lowering_platforms=None if interpret else ("cuda",)).as_text()

    assert "jkv_act_rounding_q4_k" in lowered(False, "auto") and calls == [{"interpret": False}]
    assert "jkv_act_rounding_q4_k" in lowered(False, None) and len(calls) == 1
    assert "jkv_act_rounding" not in lowered(False, "xla") and not calls
    lowered(True, "auto")
    assert not calls
    lowered(True, "kernel")
    assert calls == [{"interpret": True}]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("m,k", [(1, 4096), (16, 14336), (2, 96)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_words_and_factors(rng, fmt, m, k):
    """Compiled by Triton: XLA's words and factors, up to a code where the two compilers round a float apart
    (a division or a fused multiply-add): then within one code, in at most a thousandth of the values, with the
    factors the kernel's own codes give."""
    (want_words, want_factors), (words, factors) = both(activations(rng, m, k, jnp.bfloat16), fmt, None)
    got, want = (np.asarray(w).view(np.int8).astype(np.int32) for w in (words, want_words))
    differ = got != want
    assert np.abs(got - want).max() <= 1 and differ.mean() <= 1e-3
    np.testing.assert_array_equal(np.asarray(factors[0]), np.asarray(want_factors[0]))  # the scales: max, multiply
    blocks = got.reshape(m, -1, 32)
    sums = {"Q4_0": [blocks.sum(2)], "Q6_K": [blocks[:, :, :16].sum(2), blocks[:, :, 16:].sum(2)]}
    sums |= {f: [np.asarray(factors[0]) * blocks.sum(2)] for f in ("Q4_1", "Q4_K")}
    for f, s in zip(factors[1:], sums.get(fmt, []), strict=True):
        np.testing.assert_allclose(np.asarray(f), s, rtol=1e-6, atol=1e-6)
