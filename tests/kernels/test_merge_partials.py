"""The Pallas merge of split-K partials (``merge="pallas"``, the default) against float64 and against
``combine_splits``, and every split kernel (contiguous, Q8, paged, Q8 pages) with either merge.

Partials are fresh random draws; the padding rows the split kernels allocate but never write hold NaN, so a
merge that read them would fail. Interpret mode on the CPU; the real lowering on a GPU.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import test_decode_kernel as contiguous_cases
import test_paged_kernel as paged_cases
import test_paged_q8 as paged_q8_cases
import test_q8_kernel as q8_cases
from conftest import REL_TOL, rel_err

from pallas_kernels import backend
from pallas_kernels import decode_attention as kernels

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


@pytest.mark.parametrize("splits,padded", [(1, 1), (3, 4), (4, 4), (66, 128)], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["m_denom", "packed_stats"])
def test_merge_matches_float64(rng, splits, padded, packed):
    m, denom, acc, want = random_partials(rng, 2, splits, 5, 64, padded)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    if packed:  # the Mosaic GPU kernel's layout: max and denominator as columns of one array
        stats = np.stack([m, denom] + [np.full_like(m, np.nan)] * 2, axis=-1)
        out = kernels.merge_partials(f32(acc), f32(stats), splits=splits, dtype=jnp.float32, interpret=True)
    else:
        out = kernels.merge_partials(f32(acc), f32(m), f32(denom), splits=splits, dtype=jnp.float32, interpret=True)
    assert rel_err(out, want) < REL_TOL["float32"]
    np.testing.assert_array_equal(np.asarray(out[0, 0]), 0.0)
    xla = kernels.combine_splits(*(f32(x[:, :splits]) for x in (m, denom, acc)))
    assert rel_err(out, xla) < REL_TOL["float32"]


def test_merge_errors():
    acc, m = jnp.zeros((1, 3, 2, 16)), jnp.zeros((1, 3, 2))
    with pytest.raises(ValueError, match=r"acc.shape\[1\]=3 must be a power of two >= splits=3"):
        kernels.merge_partials(acc, m, m, splits=3, dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="merge='cuda' must be one of"):
        kernels.split_out_shape(jnp.zeros((1, 4, 16)), 2, "cuda")


# Table cases of each split kernel with more than one split (their own tests run the default merge).
SPLIT_CASES = {
    "contiguous_" + c[0]: (contiguous_cases.run_case, c) for c in contiguous_cases.CASES if c[10] and c[10] > 1
} | {"q8_" + c[0]: (q8_cases.run_case, c) for c in q8_cases.CASES if c[11] and c[11] > 1}
SPLIT_CASES |= {"paged_" + c[0]: (paged_cases.run_case, c) for c in paged_cases.CASES if c[11] and c[11] > 1}
SPLIT_CASES |= {"paged_q8_" + c[0]: (paged_q8_cases.run_case, c) for c in paged_q8_cases.CASES if c[11] and c[11] > 1}


@pytest.fixture(params=kernels.SPLIT_MERGES)
def merge(request, monkeypatch):
    monkeypatch.setattr(kernels, "SPLIT_MERGE", request.param)
    return request.param


@pytest.mark.parametrize("run,case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_split_kernels_with_each_merge_interpret(rng, merge, run, case):
    run(rng, case, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    @pytest.mark.parametrize("splits,padded", [(3, 4), (66, 128)], ids=str)
    def test_merge_matches_float64(self, rng, splits, padded):
        m, denom, acc, want = random_partials(rng, 2, splits, 32, 128, padded)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        out = kernels.merge_partials(f32(acc), f32(m), f32(denom), splits=splits, dtype=jnp.float32, interpret=False)
        assert rel_err(out, want) < REL_TOL["float32"]

    @pytest.mark.parametrize("run,case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
    def test_split_kernels_with_each_merge(self, rng, merge, run, case):
        scale = 16 if run in (paged_cases.run_case, paged_q8_cases.run_case) else 32
        run(rng, case, scale_up=scale, interpret=False)
