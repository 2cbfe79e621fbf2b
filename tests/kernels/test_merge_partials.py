"""The Pallas merge of split-K partials (``pallas_kernels.common.merge_partials``, which every split kernel runs)
against float64 and against its pure-jnp reference. (Each split kernel's own table has cases with several splits.)

Partials are fresh random draws; the padding rows the split kernels allocate but never write hold NaN, so a
merge that read them would fail. Interpret mode on the CPU; the real lowering on a GPU.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from kernel_inputs import run_jitted

from pallas_kernels import backend, common, reference

ON_GPU = backend.gpu_backend() == backend.TRITON


def random_partials(rng, rows, splits, cols, head_dim, padded):
    """Partials of softmax pieces: per (r, c) the split maxima, denominators and unnormalised outputs of random
    scores over random values, with split 1 empty everywhere and row 0, column 0 empty in every split; NaN in
    the padding splits. Returns the arrays and the float64 merged output."""
    pieces = 7
    scores = rng.standard_normal((rows, cols, splits, pieces)) * 3
    values = rng.standard_normal((rows, cols, splits, pieces, head_dim))
    seen = np.ones((rows, cols, splits, pieces), bool)
    seen[:, :, 1 % splits] = splits == 1  # an empty split (unless it is the only one)
    seen[0, 0] = False  # a head that saw no position at all
    s = np.where(seen, scores, -np.inf)
    m = s.max(axis=-1)  # (R, C, P)
    e = np.where(seen, np.exp(s - np.where(np.isfinite(m), m, 0)[..., None]), 0.0)
    denom, acc = e.sum(axis=-1), np.einsum("rcpk,rcpkd->rcpd", e, values)
    with np.errstate(invalid="ignore", divide="ignore"):  # the empty head: -inf - -inf
        total = np.exp(s - s.max(axis=(-1, -2), keepdims=True)).sum(axis=(-1, -2))
        want = np.einsum("rcpk,rcpkd->rcd", np.exp(s - s.max(axis=(-1, -2), keepdims=True)), values)
        want = np.where(total[..., None] > 0, want / total[..., None], 0.0)
    pad = lambda x: np.concatenate([x, np.full((*x.shape[:2], padded - splits, *x.shape[3:]), np.nan)], axis=2)
    m, denom, acc = (pad(x).swapaxes(1, 2) for x in (m, denom, acc))  # (R, Pp, C(, D))
    return m, denom, acc, np.nan_to_num(want, nan=0.0)


@pytest.mark.parametrize(
    "splits,padded,head_dim", [(1, 1, 64), (3, 4, 64), (4, 4, 64), (66, 128, 64), (3, 4, 96)], ids=str
)
@pytest.mark.parametrize("packed", [False, True], ids=["m_denom", "packed_stats"])
def test_merge_matches_float64(rng, splits, padded, head_dim, packed):
    """head_dim 96: merged in power-of-two column chunks (``common.column_slices``)."""
    m, denom, acc, want = random_partials(rng, 2, splits, 5, head_dim, padded)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    if packed:  # the Mosaic GPU kernel's layout: max and denominator as columns of one array
        stats = np.stack([m, denom] + [np.full_like(m, np.nan)] * 2, axis=-1)
        args = (f32(acc), f32(stats))
    else:
        args = (f32(acc), f32(m), f32(denom))
    out = run_jitted(common.merge_partials, *args, splits=splits, dtype=jnp.float32, interpret=True)
    assert rel_err(out, want) < REL_TOL["float32"]
    np.testing.assert_array_equal(np.asarray(out[0, 0]), 0.0)
    ref = run_jitted(reference.merge_partials_reference, *args, splits=splits, dtype=jnp.float32)
    assert rel_err(ref, want) < REL_TOL["float32"]
    assert rel_err(out, ref) < REL_TOL["float32"]


def test_merge_errors():
    acc, m = jnp.zeros((1, 3, 2, 16)), jnp.zeros((1, 3, 2))
    with pytest.raises(ValueError, match=r"acc.shape\[1\]=3 must be a power of two >= splits=3"):
        common.merge_partials(acc, m, m, splits=3, dtype=jnp.float32, interpret=True)


@pytest.mark.parametrize("splits,want", [(1, 1), (2, 2), (3, 4), (66, 128)], ids=str)
def test_partials_are_padded_to_a_power_of_two(splits, want):
    """The split kernels allocate the merge's power-of-two tile; one split writes the output itself."""
    q = jnp.zeros((2, 8, 64), jnp.bfloat16)
    shapes = common.split_out_shape(q, splits)
    if splits == 1:
        assert [(o.shape, o.dtype) for o in shapes] == [(q.shape, q.dtype)]
    else:
        assert [o.shape for o in shapes] == [(2, want, 8, 64), (2, want, 8), (2, want, 8)]
        assert all(o.dtype == jnp.float32 for o in shapes)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    @pytest.mark.parametrize("splits,padded", [(3, 4), (66, 128)], ids=str)
    def test_merge_matches_float64(self, rng, splits, padded):
        m, denom, acc, want = random_partials(rng, 2, splits, 32, 128, padded)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        out = common.merge_partials(f32(acc), f32(m), f32(denom), splits=splits, dtype=jnp.float32, interpret=False)
        assert rel_err(out, want) < REL_TOL["float32"]
