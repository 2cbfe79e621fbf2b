"""``pallas_kernels.dequantize_weights``: a block-quantized matrix dequantized in one launch gives
``block_formats.dequantize``'s values (interpret mode: bit for bit; the real lowering: to the float rounding of a
fused multiply-add), every element written (outputs start NaN-poisoned); and a model's prefill-sized product through
it equals XLA's dequantization's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from poison import poisoned_outputs
from qweight_inputs import planes_like, random_planes

from jkv.models import quant
from pallas_kernels import backend, block_formats, dequantize_weights

FORMATS = tuple(block_formats.FORMATS)
ON_GPU = backend.gpu_backend() == backend.TRITON
# (N, K): several programs each way, N with fewer than BLOCK_N rows a program, K of one widest group
SHAPES = [(64, 1024), (37, 512), (96, 256)]


def check(rng, fmt, n, k, dtype, interpret):
    planes = tuple(jnp.asarray(p) for p in random_planes(rng, fmt, n, k))
    with poisoned_outputs():
        got = dequantize_weights.dequantize_matrix(planes, fmt, dtype, interpret=interpret)
    want = block_formats.dequantize(planes, fmt, dtype)
    assert got.shape == (n, k) and got.dtype == jnp.dtype(dtype)
    return np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("n,k", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_xla_dequantization_interpret(rng, fmt, n, k, dtype):
    got, want = check(rng, fmt, n, k, dtype, interpret=True)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_launch_divides_the_matrix(fmt):
    spec = block_formats.block_format(fmt)
    for n, k in [(14336, 4096), (4096, 14336), (128256, 4096), (37, 256)]:
        block_n, block_k = dequantize_weights.launch(n, k, fmt)
        assert n % block_n == 0 and block_n <= dequantize_weights.BLOCK_N
        assert (k // spec.parts) % block_k == 0 and block_k % spec.max_group == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_lowers_to_one_triton_kernel(fmt):
    """For CUDA on any host: one Triton kernel, no dequantization left to XLA."""
    sds = jax.ShapeDtypeStruct
    planes = planes_like(fmt, 1024, 1024, sds)
    fn = lambda *p: dequantize_weights._dequantize(p, fmt, jnp.dtype(jnp.bfloat16), interpret=False)
    text = jax.jit(fn).trace(*planes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and f"jkv_dequantize_{fmt.lower()}" in text


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0"])
def test_prefill_product_through_the_kernel_interpret(rng, fmt, monkeypatch):
    """``quant.DEQUANT_IMPL = "kernel"``: a product of DEQUANT_MIN_ROWS rows gives the XLA path's output exactly;
    a bad setting is named."""
    n, k, m = 64, 512, quant.DEQUANT_MIN_ROWS
    planes = tuple(jnp.asarray(p) for p in random_planes(rng, fmt, n, k))
    w = quant.from_planes(fmt, planes, (k, n), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    want = quant.project(x, w, "pallas")
    calls = []
    kernel = dequantize_weights.dequantize_matrix
    counted = lambda *a, **kw: calls.append(a[1]) or kernel(*a, **kw)
    monkeypatch.setattr(dequantize_weights, "dequantize_matrix", counted)
    monkeypatch.setattr(quant, "DEQUANT_IMPL", "kernel")
    np.testing.assert_array_equal(np.asarray(quant.project(x, w, "pallas")), np.asarray(want))
    assert calls == [fmt]
    monkeypatch.setattr(quant, "DEQUANT_IMPL", "triton")
    with pytest.raises(ValueError, match="DEQUANT_IMPL='triton'"):
        quant.project(x, w, "pallas")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("n,k", [(4096, 14336), (37, 512)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_matches_xla_dequantization(rng, fmt, n, k):
    """Compiled by Triton: XLA's values to the rounding of a fused multiply-add (float32), or exactly once
    rounded to bfloat16 but for values that rounding splits."""
    got, want = check(rng, fmt, n, k, "float32", interpret=False)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    got, want = check(rng, fmt, n, k, "bfloat16", interpret=False)
    assert np.mean(got != want) <= 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-2)
