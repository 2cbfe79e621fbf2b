"""pallas_kernels.rms_norm: the residual add + RMSNorm kernel against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from poison import poisoned_outputs

from pallas_kernels import backend, rms_norm
from pallas_kernels.reference import residual_rms_norm_reference
from pallas_kernels.rms_norm import residual_rms_norm

ON_GPU = backend.gpu_backend() == backend.TRITON


def reference64(x, y, w, eps):
    s = np.asarray(x, np.float64) + (0.0 if y is None else np.asarray(y, np.float64))
    scale = 1.0 / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps)
    return s, s * np.asarray(w, np.float64), scale


def check(rng, lead, hidden, *, with_y, y_dtype=jnp.float32, dtype=jnp.float32, interpret=None):
    # Rows of very different magnitudes (the scale is per row) and an outlier column.
    x = rng.standard_normal((*lead, hidden)) * rng.uniform(0.1, 30.0, (*lead, 1))
    x[..., hidden // 3] *= 20.0
    y = rng.standard_normal((*lead, hidden)) if with_y else None
    w = rng.uniform(0.5, 1.5, hidden)
    eps = 1e-5
    xj, wj = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    yj = None if y is None else jnp.asarray(y, y_dtype)
    with poisoned_outputs():
        s, u, scale = residual_rms_norm(xj, yj, wj, eps=eps, dtype=dtype, interpret=interpret)
    y64 = None if yj is None else np.asarray(yj.astype(jnp.float32))
    s64, u64, scale64 = reference64(np.asarray(xj), y64, np.asarray(wj), eps)
    assert s.dtype == jnp.float32 and u.dtype == jnp.dtype(dtype) and scale.dtype == jnp.float32
    assert scale.shape == (*lead, 1)
    assert rel_err(s, s64) < REL_TOL["float32"]
    assert rel_err(scale, scale64) < REL_TOL["float32"]
    assert rel_err(u, u64) < REL_TOL[jnp.dtype(dtype).name]
    # The split norm reassembles the usual one: (x * w) * scale == rmsnorm(x) * w.
    normed = np.asarray(u, np.float64) * np.asarray(scale, np.float64)
    assert rel_err(normed, u64 * scale64) < REL_TOL[jnp.dtype(dtype).name]


@pytest.mark.parametrize("hidden", [64, 576, 896, 4096], ids=str)
@pytest.mark.parametrize("with_y", [True, False], ids=["add", "norm-only"])
def test_matches_float64(rng, hidden, with_y):
    check(rng, (3, 2), hidden, with_y=with_y)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_low_precision_output_and_residual(rng, dtype):
    check(rng, (8,), 576, with_y=True, y_dtype=dtype, dtype=dtype)


def test_reference_agrees(rng):
    x = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, 96), jnp.float32)
    for got, want in zip(
        residual_rms_norm(x, y, w, eps=1e-6), residual_rms_norm_reference(x, y, w, eps=1e-6), strict=True
    ):
        assert rel_err(got, want) < REL_TOL["float32"]


def test_under_jit_and_vmap(rng):
    x = jnp.asarray(rng.standard_normal((4, 3, 128)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 3, 128)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, 128), jnp.float32)
    fn = jax.jit(jax.vmap(lambda a, b: residual_rms_norm(a, b, w, eps=1e-5)))
    want = reference64(np.asarray(x), np.asarray(y), np.asarray(w), 1e-5)
    for got, ref in zip(fn(x, y), want, strict=True):
        assert rel_err(got, ref) < REL_TOL["float32"]


@pytest.mark.parametrize(
    "x_shape,y_shape,w_shape,match",
    [
        ((2, 64), (2, 32), (64,), "one shape"),
        ((2, 64), None, (32,), r"weight.shape=\(32,\) must be \(64,\)"),
    ],
)
def test_bad_shapes(x_shape, y_shape, w_shape, match):
    y = None if y_shape is None else jnp.ones(y_shape)
    with pytest.raises(ValueError, match=match):
        residual_rms_norm(jnp.ones(x_shape), y, jnp.ones(w_shape), eps=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    @pytest.mark.parametrize("hidden", [576, 2048, 4096, 8192], ids=str)
    def test_matches_float64(self, rng, hidden):
        check(rng, (8,), hidden, with_y=True, dtype=jnp.bfloat16, interpret=False)
        check(rng, (2, 5), hidden, with_y=False, interpret=False)


@pytest.mark.parametrize("fmt", [None, "Q4_K"], ids=["rows", "rounded"])
@pytest.mark.parametrize("hidden,with_y", [(4096, True), (4096, False), (576, True), (100, False)], ids=str)
def test_lowers_for_cuda_in_one_launch_of_chunks(hidden, with_y, fmt):
    """For CUDA on any host (interpret mode does not check what Triton's lowering refuses): one Triton kernel of
    ``hidden / chunk_of(hidden)`` programs a row: chunks of whole powers of two (4,096: four of 1,024; 576: nine of
    64), or the whole row masked to its tile where none divides it (100)."""
    if fmt is not None and hidden % 32:
        pytest.skip("rounded rows are whole 32-blocks")
    sds = jax.ShapeDtypeStruct
    args = (
        sds((2, hidden), jnp.float32),
        sds((2, hidden), jnp.bfloat16) if with_y else None,
        sds((hidden,), jnp.float32),
    )
    traced = rms_norm._call.trace(*args, eps=1e-5, dtype=jnp.dtype(jnp.bfloat16), fmt=fmt, interpret=False)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "jkv_residual_rms_norm" in text
    assert rms_norm.chunk_of(hidden) == {4096: 1024, 576: 64, 100: 100}[hidden]
