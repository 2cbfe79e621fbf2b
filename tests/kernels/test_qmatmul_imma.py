"""The Q4_K and Q6_K products on the int8 tensor cores (``pallas_kernels.qmatmul_imma``, ``qmatmul_imma_q6k``): the
activations rounded per 256-value super-block, then exact integer arithmetic on them and the weights. Checked
against float64 NumPy of the same rounded activations times the exact dequantized matrix (tight), and against the
unrounded product within the rounding's bound; interpret mode here, the real lowering on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qweight_inputs import dequantize_f64, random_planes

from pallas_kernels import backend
from pallas_kernels import qmatmul_imma as qi


def rounded_f64(x):
    """``x`` rounded as the kernel rounds it (per 256 values, halves up), in float64."""
    m, k = x.shape
    blocks = x.astype(np.float64).reshape(m, k // 256, 256)
    peak = np.abs(blocks).max(axis=-1, keepdims=True)
    step = peak / 127
    codes = np.clip(np.floor(blocks / np.where(step > 0, step, 1) + 0.5), -127, 127)
    return (codes * step).reshape(m, k), np.repeat(step.reshape(m, -1), 256, axis=1)


def check(rng, m, n, k, fmt="Q4_K", config=None):
    planes = random_planes(rng, fmt, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(qi.qmatmul_imma(jnp.asarray(x), tuple(map(jnp.asarray, planes)), fmt, config=config), np.float64)
    w = dequantize_f64(planes, fmt)
    xr, step = rounded_f64(x)
    want = xr @ w.T
    assert got.shape == (m, n)
    # the same rounded activations: float32 sums and scalings only
    assert np.abs(got - want).max() <= 2e-6 * (np.abs(xr) @ np.abs(w).T).max()
    # the unrounded product: each activation moved by at most half its super-block's step
    assert np.all(np.abs(got - x.astype(np.float64) @ w.T) <= (step / 2) @ np.abs(w).T * (1 + 1e-4) + 1e-5)
    return got


@pytest.mark.parametrize("fmt", qi.FORMATS)
@pytest.mark.parametrize("m,n,k", [(1, 64, 256), (17, 128, 512), (40, 64, 1024), (64, 192, 768), (20, 48, 512)])
def test_matches_float64_of_the_rounded_activations(rng, m, n, k, fmt):
    check(rng, m, n, k, fmt)


@pytest.mark.parametrize("fmt", qi.FORMATS)
def test_splits_and_row_blocks_agree(rng, fmt):
    """K split over programs (partials summed outside) and rows in several blocks give the one-program result."""
    n, k, m = 64, 1024, 40
    planes = tuple(map(jnp.asarray, random_planes(rng, fmt, n, k)))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    one = np.asarray(qi.qmatmul_imma(x, planes, fmt, config=qi.ImmaConfig(64, 64, 1, 4, 2)))
    for config in (qi.ImmaConfig(64, 64, 4, 4, 2), qi.ImmaConfig(16, 32, 2, 4, 2)):
        got = np.asarray(qi.qmatmul_imma(x, planes, fmt, config=config))
        np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-4 * np.abs(one).max())


@pytest.mark.parametrize("fmt", qi.FORMATS)
def test_zero_super_blocks_and_large_values(rng, fmt):
    """A super-block of zeros has scale 0 and contributes 0 (no NaN); activations of 1e4 stay in int32 range."""
    n, k, m = 64, 512, 3
    planes = random_planes(rng, fmt, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32) * 1e4
    x[:, :256] = 0.0
    got = np.asarray(qi.qmatmul_imma(jnp.asarray(x), tuple(map(jnp.asarray, planes)), fmt), np.float64)
    assert np.isfinite(got).all()
    xr, _ = rounded_f64(x)
    want = xr @ dequantize_f64(planes, fmt).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_round_activations_pair_order():
    """Codes come in pair order (position 2c + h of a 32-block holds value 16h + c), sums are per 32-block."""
    x = jnp.arange(512, dtype=jnp.float32)[None] - 200.0
    codes, xs, sums = qi.round_activations(x)
    assert codes.dtype == jnp.int8 and xs.shape == (1, 2) and sums.shape == (1, 16)
    natural = np.asarray(codes).reshape(16, 16, 2).transpose(0, 2, 1).reshape(512)  # undo the pairing
    xr, _ = rounded_f64(np.asarray(x))
    np.testing.assert_allclose(natural * np.repeat(np.asarray(xs)[0], 256), xr[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sums)[0], xr[0].reshape(16, 32).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("fmt", qi.FORMATS)
def test_lowers_to_an_int8_tensor_core_dot(fmt):
    """For CUDA (no GPU needed): one Triton kernel whose products are int8 x int8 dots; no floor division's
    fix-up (``arith.remsi``) in its addresses."""
    from qweight_inputs import planes_like

    from bench import qmatmul_ir

    sds = jax.ShapeDtypeStruct
    n, k = 256, 1024
    planes = planes_like(fmt, n, k, sds)
    modules = []
    with qmatmul_ir._capture_triton_modules(modules):
        lower = jax.jit(lambda x, p: qi.qmatmul_imma(x, p, fmt, interpret=False)).trace(
            sds((64, k), jnp.bfloat16), planes
        )
        lower.lower(lowering_platforms=("cuda",))
    (ttir,) = modules
    assert "tt.dot" in ttir and "xi8>" in ttir and "arith.remsi" not in ttir


def test_q6_k_part_order():
    """Q6_K's activation rows: per 32-block two rows in part order (position 4c + 2p + a holds value
    16p + 8a + c), each holding one half-block's values and zeros at the other's."""
    from pallas_kernels import qmatmul_imma_q6k as q6

    codes = jnp.arange(64, dtype=jnp.int8)[None] - 32  # two blocks, every value distinct
    rows = np.asarray(q6.part_order(codes)).reshape(2, 2, 8, 2, 2)  # [block, row, c, p, a]
    for blk in range(2):
        for p in range(2):
            for a in range(2):
                np.testing.assert_array_equal(rows[blk, p, :, p, a], blk * 32 + 16 * p + 8 * a + np.arange(8) - 32)
            assert not rows[blk, p, :, 1 - p].any()


def test_refusals(rng):
    planes = tuple(map(jnp.asarray, random_planes(rng, "Q4_K", 64, 512)))
    x = jnp.zeros((4, 512), jnp.float32)
    with pytest.raises(ValueError, match="takes \\('Q4_K', 'Q6_K'\\), not 'Q8_0'"):
        qi.qmatmul_imma(x, planes, "Q8_0")
    with pytest.raises(ValueError, match="x must be \\[M, 512\\]"):
        qi.qmatmul_imma(jnp.zeros((4, 256)), planes)
    with pytest.raises(TypeError, match="floating point"):
        qi.qmatmul_imma(jnp.zeros((4, 512), jnp.int32), planes)
    with pytest.raises(ValueError, match="does not tile"):
        qi.qmatmul_imma(x, planes, config=qi.ImmaConfig(16, 64, 3, 4, 2))
    with pytest.raises(ValueError, match="power of two"):
        qi.qmatmul_imma(x, planes, config=qi.ImmaConfig(8, 64, 1, 4, 2))
    assert qi.qmatmul_imma(jnp.zeros((0, 512)), planes).shape == (0, 64)
    narrow = tuple(map(jnp.asarray, random_planes(rng, "Q4_K", 40, 512)))  # 40 columns: no 16-wide tiling
    with pytest.raises(ValueError, match="multiple of 16, got N=40"):
        qi.qmatmul_imma(x, narrow)


@pytest.mark.gpu
@pytest.mark.skipif(backend.gpu_backend() != backend.TRITON, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("fmt", qi.FORMATS)
@pytest.mark.parametrize("m", [1, 17, 64, 100])
def test_gpu_matches_float64(rng, m, fmt):
    check(rng, m, 512, 4096, fmt)
