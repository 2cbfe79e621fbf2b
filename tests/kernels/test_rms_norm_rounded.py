"""``pallas_kernels.rms_norm.residual_rms_norm_rounded``: the norm before a dp4a product with the product's
activation rounding in the same launch gives the residual sum and scale of the plain norm kernel and the words and
factors ``qmatmul_dp4a.quantize_activations`` makes of its weighted rows (interpret mode: bit for bit; the real
lowering: within one code where a float rounds differently)."""

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import fast_jit
from poison import poisoned_outputs

from pallas_kernels import backend, block_formats, qmatmul_dp4a
from pallas_kernels.reference import residual_rms_norm_reference
from pallas_kernels.rms_norm import residual_rms_norm_rounded

FORMATS = tuple(block_formats.FORMATS)
ON_GPU = backend.gpu_backend() == backend.TRITON
EPS = 1e-5


def inputs(rng, lead, hidden, with_y):
    """Rows of very different magnitudes, an outlier column, a residual of another dtype."""
    x = rng.standard_normal((*lead, hidden)) * rng.uniform(0.1, 30.0, (*lead, 1))
    x[..., hidden // 3] *= 20.0
    y = jnp.asarray(rng.standard_normal((*lead, hidden)), jnp.bfloat16) if with_y else None
    return jnp.asarray(x, jnp.float32), y, jnp.asarray(rng.uniform(0.5, 1.5, hidden), jnp.float32)


def run(x, y, w, fmt, dtype, interpret):
    """The kernel's outputs (into NaN-filled buffers) and what the reference norm and XLA's rounding make."""
    fn = lambda a, b, c: residual_rms_norm_rounded(a, b, c, eps=EPS, dtype=dtype, fmt=fmt, interpret=interpret)
    with poisoned_outputs():
        got = fast_jit(fn)(x, y, w)
    s, rows, scale = residual_rms_norm_reference(x, y, w, eps=EPS, dtype=dtype)
    hidden = x.shape[-1]
    return got, (s, qmatmul_dp4a.quantize_activations(rows.reshape(-1, hidden), fmt), scale)


@pytest.mark.parametrize("hidden", [96, 576, 4096], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype,with_y", [(jnp.bfloat16, True), (jnp.float32, False)], ids=["bf16-add", "f32"])
def test_same_words_and_factors_as_norm_then_xla_interpret(rng, fmt, hidden, dtype, with_y):
    """Power-of-two and masked row widths (576 in a 1,024-wide tile), every format's factors."""
    (s, (words, factors), scale), (want_s, (want_words, want_factors), want_scale) = run(
        *inputs(rng, (2, 3), hidden, with_y), fmt, dtype, True
    )
    assert s.shape == (2, 3, hidden) and scale.shape == (2, 3, 1) and words.shape == (6, hidden // 4)
    np.testing.assert_allclose(np.asarray(s), np.asarray(want_s), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(scale), np.asarray(want_scale), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(words), np.asarray(want_words))
    assert len(factors) == len(want_factors)
    for got, want in zip(factors, want_factors, strict=True):
        assert got.shape == (6, hidden // 32)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_refuses_rows_not_in_blocks():
    x = jnp.ones((2, 48), jnp.float32)
    with pytest.raises(ValueError, match="H=48 cannot be rounded per 32-block"):
        residual_rms_norm_rounded(x, None, jnp.ones(48), eps=EPS, dtype=jnp.bfloat16, fmt="Q8_0")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (16, 4096), (3, 576)], ids=str)
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "Q6_K"])
def test_gpu_words_and_factors(rng, fmt, rows, hidden):
    """Compiled by Triton: up to a code where the compilers round a float apart (the scale's reciprocal square
    root, a fused multiply-add), then within one code in at most a thousandth of the values."""
    (s, (words, _), scale), (want_s, (want_words, _), want_scale) = run(
        *inputs(rng, (rows,), hidden, True), fmt, jnp.bfloat16, None
    )
    np.testing.assert_allclose(np.asarray(s), np.asarray(want_s), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(scale), np.asarray(want_scale), rtol=1e-5)
    got, want = (np.asarray(w).view(np.int8).astype(np.int32) for w in (words, want_words))
    assert np.abs(got - want).max() <= 1 and (got != want).mean() <= 1e-3
