"""Mosaic GPU paged decode attention against NumPy float64 on a Hopper GPU; its page addressing, launch defaults,
argument errors and the CUDA lowering of every code path everywhere.

Mosaic GPU has no interpret mode that runs this kernel (as for ``decode_mgpu``), so the value tests need the real
GPU and skip elsewhere. Every case draws fresh random inputs and places each sequence's pages at random in the pool
(a permuted block table); every page no sequence uses, every row past a sequence's length and every layer but the
attended one hold NaN. Table entries past a sequence's pages are -1, NaN pages ("nan") or garbage: -1, -7, P and
2**31 - 1 ("wild"); the kernel must never read them. Outputs are not NaN-poisoned first: ``plgpu.kernel`` has no
input/output aliasing to hand the kernel a prefilled buffer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arg_errors import (
    DECODE_MGPU_INPUT_ERRORS,
    DECODE_MGPU_LAUNCH_ERRORS,
    assert_refusals,
    paged_check_errors,
    parametrize,
)
from conftest import REL_TOL, rel_err
from kernel_inputs import bench_paged_inputs, random_paged
from reference import decode_attention_f64
from test_paged_kernel import LENGTHS

from pallas_kernels import backend, decode_mgpu
from pallas_kernels import decode_mgpu_paged as mp

ON_HOPPER = backend.mosaic_gpu_usable()
LENGTHS = {**LENGTHS, "2bk+1": lambda ps, bk, s: 2 * bk + 1}

# (id, batch, kv_heads, group, head_dim, page_size, max_pages, dtype, lengths, layers, num_splits, num_stages,
#  stale). layers: None for one-layer pools [P, K, ps, D], (L, layer) for all layers, layer "traced" under jit
# (then lengths and tables are traced too). None for splits/stages: the default launch parameters. Lengths are
# named relative to the page size ps, the block bk = 64 and the capacity S = M * ps.
CASES = [
    ("g1_d128_bf16_ps16_splits3", 4, 2, 1, 128, 16, 40, "bfloat16", ("1", "ps-1", "ps", "ps+1"), None, 3, None, "nan"),
    ("g4_d128_bf16_ps16_default", 3, 2, 4, 128, 16, 256, "bfloat16", ("S", "bk+1", "S-1"), None, None, None, "-1"),
    ("g8_d64_f16_ps8_one_split_S_off_block", 2, 1, 8, 64, 8, 250, "float16", ("S", "1"), None, 1, 2, "wild"),
    ("g4_d128_bf16_ps32_traced_layer", 2, 2, 4, 128, 32, 94, "bfloat16", ("S", "2bk+1"), (2, "traced"), 4, 2, "nan"),
    ("g2_d256_bf16_ps64_splits2", 2, 2, 2, 256, 64, 10, "bfloat16", ("S-1", "bk"), None, 2, 2, "-1"),
    ("g3_d128_bf16_ps128_layer1_of3", 2, 2, 3, 128, 128, 4, "bfloat16", ("S", "0"), (3, 1), None, None, "nan"),
    ("g5_d128_f16_ps16_deep_ring", 3, 1, 5, 128, 16, 94, "float16", ("bk-1", "S", "2bk+1"), None, 2, 4, "wild"),
    ("g4_d128_bf16_more_splits_than_blocks", 3, 2, 4, 128, 16, 13, "bfloat16", ("S", "1", "0"), None, 8, 2, "nan"),
    ("g16_d64_bf16_ps16_table_under_one_block", 2, 1, 16, 64, 16, 2, "bfloat16", ("S", "1"), None, None, None, "wild"),
    ("mha_d128_bf16_ps256", 2, 8, 1, 128, 256, 3, "bfloat16", ("ps+1", "S"), None, 2, 2, "nan"),
    ("g8_d256_f16_ps8_layer0_of2", 2, 2, 8, 256, 8, 40, "float16", ("ps-1", "bk+1"), (2, 0), 3, None, "-1"),
    ("g5_d128_bf16_ps32_rows_past_64", 7, 2, 5, 128, 32, 20, "bfloat16", ("S", "ps", "1", "bk"), None, 2, 2, "wild"),
    ("g5_d64_bf16_ps32_rows_past_64", 7, 2, 5, 64, 32, 20, "bfloat16", ("S", "ps", "1", "bk"), None, 2, 2, "wild"),
    ("g3_d64_f16_ps16_one_split", 3, 3, 3, 64, 16, 40, "float16", ("S-1", "ps"), None, 1, 2, "wild"),
]
IDS = [c[0] for c in CASES]


def case_inputs(rng, case):
    """Lengths, q, pools, tables and the float64 slabs they spell out (``random_paged``), stale entries as named."""
    _, batch, kv_heads, group, head_dim, ps, max_pages, _, names, layers, _, _, stale = case
    s = max_pages * ps
    names = [names[i % len(names)] for i in range(batch)]
    lengths = np.array([min(LENGTHS[name](ps, 64, s), s) for name in names], np.int32)
    q = rng.standard_normal((batch, kv_heads * group, head_dim))
    k_pages, v_pages, tables, slabs = random_paged(
        rng, batch, kv_heads, head_dim, ps, max_pages, lengths, layers, stale == "nan"
    )
    if stale == "wild":
        num_pages = k_pages.shape[-4]
        for b, n in enumerate(lengths):
            past = tables[b, -(-n // ps) :]
            past[:] = rng.choice([-1, -7, num_pages, 2**31 - 1], size=past.shape)
    return names, lengths, q, k_pages, v_pages, tables, slabs


def run_case(rng, case, q_dtype=None):
    _, _, _, _, _, _, _, dtype, _, layers, splits, stages, _ = case
    dtype = jnp.dtype(dtype)
    q_dtype = jnp.dtype(q_dtype or dtype)
    names, lengths, q, k_pages, v_pages, tables, (k_slab, v_slab) = case_inputs(rng, case)
    rounded = lambda x, t: np.asarray(jnp.asarray(x, t).astype(jnp.float32), np.float64)
    ref = decode_attention_f64(rounded(q, q_dtype), rounded(k_slab, dtype), rounded(v_slab, dtype), lengths)

    args = [jnp.asarray(q, q_dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype)]
    args += [jnp.asarray(tables), jnp.asarray(lengths)]
    options = dict(num_splits=splits, num_stages=stages)
    if layers is None:
        out = mp.paged_decode_attention_mgpu(*args, **options)
    elif layers[1] == "traced":
        fn = lambda *a: mp.paged_decode_attention_mgpu(*a[:-1], layer=a[-1], **options)
        out = jax.jit(fn)(*args, jnp.int32(1))
    else:
        out = mp.paged_decode_attention_mgpu(*args, layer=layers[1], **options)
    assert out.shape == q.shape and out.dtype == q_dtype
    out = np.asarray(out.astype(jnp.float32), np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    assert not np.isnan(out).any(), names
    assert rel_err(out, ref) < REL_TOL[dtype.name], names


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
class TestOnHopper:
    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case):
        run_case(rng, case)

    def test_float32_queries_over_bf16_pools(self, rng):
        """q keeps its dtype in the output; the kernel rounds it to the pools' dtype for the MMA."""
        run_case(rng, CASES[0], q_dtype="float32")

    @pytest.mark.parametrize("num_splits", [1, 3])
    @pytest.mark.parametrize("page_size", [16, 64, 128])
    def test_equals_the_contiguous_kernel(self, rng, page_size, num_splits):
        """Over the cache the pages spell out (S a multiple of the block), the same blocks, splits and MMAs: the
        same bits as ``decode_mgpu``."""
        batch, kv_heads, max_len = 3, 2, 1024
        lengths = np.array([max_len, 1, 3 * page_size + 5], np.int32)
        k_pages, v_pages, tables, (k, v) = random_paged(
            rng, batch, kv_heads, 128, page_size, max_len // page_size, lengths, None, True
        )
        past = np.arange(max_len)[None, None, :, None] >= lengths[:, None, None, None]
        k, v = (np.where(past, np.nan, x) for x in (k, v))  # the contiguous cache poisoned alike
        q = rng.standard_normal((batch, kv_heads * 4, 128))
        bf = lambda x: jnp.asarray(x, jnp.bfloat16)
        n = jnp.asarray(lengths)
        got = mp.paged_decode_attention_mgpu(
            bf(q), bf(k_pages), bf(v_pages), jnp.asarray(tables), n, num_splits=num_splits
        )
        want = decode_mgpu.decode_attention_mgpu(bf(q), bf(k), bf(v), n, num_splits=num_splits)
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))

    @pytest.mark.parametrize(
        "batch,seq,page_size", [(1, 4096, 16), (8, 4096, 16), (1, 32768, 16), (32, 2048, 64)], ids=str
    )
    def test_bench_shapes_default_config(self, rng, batch, seq, page_size):
        """The benchmark's head layout (N=32, K=8, D=128, bf16) with the default launch parameters."""
        args, ref = bench_paged_inputs(rng, batch, seq, page_size)
        out = mp.paged_decode_attention_mgpu(*args)
        assert rel_err(out.astype(jnp.float32), ref) < REL_TOL["bfloat16"]


# ----------------------------------------------------------------------------------------------- everywhere


@pytest.mark.parametrize("page_size", [8, 16, 32, 64, 128, 256])
def test_block_copies_cover_the_block_within_the_sequence(page_size):
    """The kernel's copies of each block walked: slot row r holds position t * 64 + r wherever that position is
    below the length, and no copy names a table column past the sequence's last page."""
    bk = 64
    fn = jax.jit(lambda t, n: mp.block_copies(t, n, block_k=bk, page_size=page_size))
    rows = min(bk, page_size)
    for n in sorted({1, page_size - 1, page_size, page_size + 1, 63, 64, 65, 200, 4 * page_size + 3}):
        for t in range(-(-n // bk)):
            copies = [(int(col), int(row)) for col, row in fn(t, n)]
            assert len(copies) * rows == bk
            for c, (col, row) in enumerate(copies):
                assert 0 <= col <= (n - 1) // page_size and row % rows == 0 and row + rows <= page_size
                for r in range(rows):
                    pos = t * bk + c * rows + r
                    if pos < n:
                        assert (col, row + r) == (pos // page_size, pos % page_size), (n, t, c, r)


@pytest.mark.parametrize(
    "batch,kv_heads,pages,page_size,want",
    [(1, 8, 2048, 16, (16, 2)), (8, 8, 256, 16, (2, 2)), (64, 8, 128, 64, (1, 2)), (2, 1, 2, 16, (1, 2))],
    ids=["B=1_T=32k", "B=8_T=4k", "B=64_T=8k", "B=2_T=32"],
)
def test_launch_defaults_are_the_contiguous_kernels(batch, kv_heads, pages, page_size, want):
    """The contiguous kernel's rule at the table's capacity: 64-position blocks, about one program per SM."""
    config = mp.paged_mgpu_config(batch, kv_heads, pages, page_size, 128, jnp.bfloat16, num_multiprocessors=132)
    assert config == decode_mgpu.mgpu_config(
        batch, kv_heads, pages * page_size, 128, jnp.bfloat16, num_multiprocessors=132
    )
    assert config.block_k == 64 and (config.num_splits, config.num_stages) == want


def _args(batch=2, kv_heads=2, group=4, head_dim=128, page_size=16, pages=6, dtype=jnp.bfloat16):
    q = jnp.zeros((batch, kv_heads * group, head_dim), dtype)
    pools = jnp.zeros((pages, kv_heads, page_size, head_dim), dtype)
    table = jnp.asarray([[0, 1, 2], [3, 4, 5]][:batch], jnp.int32)
    return q, pools, pools, table, jnp.full((batch,), 3, jnp.int32)


# What this kernel adds to paged.check_args (whose table test_argument_errors_of_the_shared_checks runs).
PAGED_MGPU_INPUT_ERRORS = [
    *DECODE_MGPU_INPUT_ERRORS,
    ("head_dim_96", dict(head_dim=96), ValueError, "head_dim=96 is not supported"),
    ("page_4", dict(page_size=4), ValueError, r"page_size=4 must be a power of two >= 8"),
    ("page_1", dict(page_size=1), ValueError, "page_size=1 must be a power of two >= 8"),
]


@parametrize("change,error,match", PAGED_MGPU_INPUT_ERRORS)
def test_argument_errors(change, error, match):
    with pytest.raises(error, match=match):
        mp.paged_decode_attention_mgpu(*_args(**change))


def test_argument_errors_of_the_shared_checks():
    """The table of ``paged.check_args`` errors the Triton paged kernel's tests run: it runs first here too."""
    assert_refusals(mp.paged_decode_attention_mgpu, paged_check_errors())


@parametrize("options,error,match", DECODE_MGPU_LAUNCH_ERRORS)
def test_launch_parameter_errors(monkeypatch, options, error, match):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    with pytest.raises(error, match=match):
        mp.paged_decode_attention_mgpu(*_args(), **options)


def test_empty_table_gives_zeros(monkeypatch, rng):
    """A table of no columns holds no position: zeros in q's dtype, without a launch."""
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    q, pools, _, _, _ = _args()
    q = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    out = mp.paged_decode_attention_mgpu(q, pools, pools, jnp.zeros((2, 0), jnp.int32), jnp.zeros(2, jnp.int32))
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal where Mosaic GPU cannot run")
def test_refuses_to_run_without_mosaic_gpu():
    with pytest.raises(RuntimeError, match="the Mosaic GPU paged decode kernel cannot run here: "):
        mp.paged_decode_attention_mgpu(*_args())


# (id, batch, kv_heads, group, head_dim, page_size, layers, pool dtype, q dtype, num_splits, num_stages)
LOWERINGS = [
    ("g4_d128_ps16_one_split", 2, 2, 4, 128, 16, 3, "bfloat16", "bfloat16", 1, 2),
    ("g4_d128_ps16_three_splits", 2, 2, 4, 128, 16, 3, "bfloat16", "bfloat16", 3, 2),
    ("g8_d256_ps8_f16", 3, 2, 8, 256, 8, None, "float16", "float16", 2, 2),
    ("mha_d128_ps64_f32_q", 5, 8, 1, 128, 64, None, "bfloat16", "float32", 1, 4),
    ("g5_d128_ps128_rows_off_tile", 7, 2, 5, 128, 128, 2, "bfloat16", "bfloat16", 4, 3),
    ("g8_d64_ps256_f16", 1, 4, 8, 64, 256, 2, "float16", "float16", 2, 2),
]


@pytest.mark.parametrize("case", LOWERINGS, ids=[c[0] for c in LOWERINGS])
def test_lowers_for_cuda(monkeypatch, case):
    """The public call (traced lengths, tables and layer) lowers to a Mosaic GPU custom call on any host, for
    each way of filling a slot (several pages, one page, part of one), one and several splits, each head_dim,
    query windows inside and past 64 rows; and no layer of the pools is sliced out around the kernel."""
    _, batch, kv_heads, group, head_dim, page_size, layers, dtype, q_dtype, splits, stages = case
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # lowering for CUDA needs no GPU
    pages, per_seq = 24, 5
    sd = jax.ShapeDtypeStruct
    pool = sd((*([layers] if layers else []), pages, kv_heads, page_size, head_dim), jnp.dtype(dtype))
    q = sd((batch, kv_heads * group, head_dim), jnp.dtype(q_dtype))
    ints = sd((batch, per_seq), jnp.int32), sd((batch,), jnp.int32)
    options = dict(num_splits=splits, num_stages=stages)
    if layers:
        fn = lambda q, k, v, t, n, layer: mp.paged_decode_attention_mgpu(q, k, v, t, n, layer=layer, **options)
        args = (q, pool, pool, *ints, sd((), jnp.int32))
    else:
        fn = lambda q, k, v, t, n: mp.paged_decode_attention_mgpu(q, k, v, t, n, **options)
        args = (q, pool, pool, *ints)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    if layers:
        assert f"tensor<{pages}x{kv_heads}x{page_size}x{head_dim}x" not in text
