"""The paged entry of the Mosaic GPU multi-token kernel against a float64 NumPy reference (values on a Hopper GPU
only, as in test_multi_token_mgpu.py); its CUDA lowering and argument errors on every host.

Pools hold the poisoned contiguous cache at permuted pages, spare pages are NaN, and table entries of pages with
no readable position are -1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arg_errors import MULTI_TOKEN_MGPU_OPTION_ERRORS, parametrize
from conftest import REL_TOL, rel_err
from multi_token_f64 import multi_token_attention_f64, readable
from test_multi_token_mgpu import CASES, case_inputs

from pallas_kernels import backend
from pallas_kernels import multi_token_mgpu as mgpu
from pallas_kernels.multi_token_mgpu_paged import multi_token_attention_mgpu_paged

ON_HOPPER = backend.mosaic_gpu_usable()
BY_ID = {c[0]: c for c in CASES}
# (case of test_multi_token_mgpu, page_size)
PAGED = [
    ("ragged_g4_d64", 16),
    ("ragged_g8_window_softcap", 16),  # windows of 50 start inside pages
    ("verify_t5_g8_d128", 8),
    ("chunk_window_cuts_block", 64),
    ("ragged_g4_heads_1_bk128", 32),
]


def to_pages(rng, cache, page_size, ok):
    """``cache [B, K, S, D]`` as pools ``[P, K, page_size, D]`` at permuted pages (three spare NaN pages) and
    ``int32[B, M]`` tables, -1 where a page holds no readable position (``ok [B, S]``)."""
    batch, kv_heads, max_len, head_dim = cache.shape
    pages = -(-max_len // page_size)
    pad = pages * page_size - max_len
    cache = np.pad(cache, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=np.nan)
    ok = np.pad(ok, ((0, 0), (0, pad)))
    table = rng.permutation(batch * pages + 3)[: batch * pages].reshape(batch, pages)
    pools = np.full((batch * pages + 3, kv_heads, page_size, head_dim), np.nan)
    for b in range(batch):
        for j in range(pages):
            pools[table[b, j]] = cache[b, :, j * page_size : (j + 1) * page_size]
    used = ok.reshape(batch, pages, page_size).any(axis=2)
    return pools, np.where(used, table, -1).astype(np.int32)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
@pytest.mark.parametrize("name,page_size", PAGED, ids=[f"{n}_page{p}" for n, p in PAGED])
def test_paged_kernel_matches_float64(rng, name, page_size):
    q, k, v, starts, lengths, counts, window, softcap, config = case_inputs(rng, BY_ID[name])
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float64)
    ref = multi_token_attention_f64(bf(q), bf(k), bf(v), starts, lengths, counts, window=window, softcap=softcap)
    ok = readable(lengths, counts, window, k.shape[2])
    seed = int(rng.integers(1 << 30))
    (k_pages, table), (v_pages, _) = (to_pages(np.random.default_rng(seed), x, page_size, ok) for x in (k, v))
    bfs = lambda *xs: [jnp.asarray(x, jnp.bfloat16) for x in xs]
    ints = [jnp.asarray(x) for x in (table, starts, lengths, counts)]
    out = multi_token_attention_mgpu_paged(
        *bfs(q, k_pages, v_pages), *ints, window=window, softcap=softcap, config=config
    )
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    out = np.asarray(out).astype(np.float64)
    np.testing.assert_array_equal(out[np.isnan(q[:, 0, 0])], 0.0)
    assert rel_err(out, ref) < REL_TOL["bfloat16"]


@pytest.mark.parametrize("page_size,block_k", [(16, 64), (8, 64), (64, 128)], ids=str)
def test_paged_lowers_for_cuda(page_size, block_k):
    """Each ring slot filled by one TMA copy per page, all on the slot's barrier: Mosaic GPU lowers it."""
    layers, pages, kv_heads, head_dim, batch, per_seq = 2, 40, 2, 128, 3, 16
    sd = jax.ShapeDtypeStruct
    pools = sd((layers, pages, kv_heads, page_size, head_dim), jnp.bfloat16)
    ints = sd((batch,), jnp.int32)
    args = (sd((64, 8, head_dim), jnp.bfloat16), pools, pools, sd((batch * per_seq,), jnp.int32), ints, ints, ints)
    config = mgpu.MgpuMultiTokenConfig(16, 4, block_k, 2)
    options = dict(scale=0.1, window=40, softcap=None, config=config, pages_per_seq=per_seq)
    lowered = mgpu._attend.trace(*args, sd((1,), jnp.int32), **options).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def _paged_args(page_size=16, pages=12, table=None, pool_shape=None, lengths=(3, 5)):
    q = jnp.ones((16, 8, 128), jnp.bfloat16)
    pools = jnp.ones(pool_shape or (pages, 2, page_size, 128), jnp.bfloat16)
    table = jnp.asarray(table if table is not None else [[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32)
    ints = lambda *x: jnp.asarray(x, jnp.int32)
    return q, pools, pools, table, ints(0, 8), ints(*lengths), ints(8, 4)


@pytest.mark.parametrize(
    "change,options,match",
    [
        (dict(page_size=12), {}, "page_size=12 must be a multiple of 8"),
        (dict(page_size=48), {}, "page_size=48 must divide config.block_k=64"),
        (dict(table=[[0, 1, 2, 12], [4, 5, 6, 7]]), {}, "block_tables hold page 12 but the pools have P=12 pages"),
        (dict(table=[0, 1, 2]), {}, r"block_tables must be int\[B, M\]"),
        (dict(pool_shape=(12, 2, 16)), {}, "k_pages and v_pages must both be"),
        (dict(table=[[0, 1], [2, 3]], lengths=(30, 5)), {}, r"must lie in \[0, S=32\]"),
    ],
    ids=["page_off_tile", "page_off_block", "page_past_pool", "table_1d", "pool_3d", "past_table"],
)
def test_paged_argument_errors(monkeypatch, change, options, match):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    monkeypatch.setattr(mgpu, "_attend", lambda *a, **kw: None)  # the launch itself cannot run here
    with pytest.raises(ValueError, match=match):
        multi_token_attention_mgpu_paged(*_paged_args(**change), **options)


@parametrize("options,error,match", MULTI_TOKEN_MGPU_OPTION_ERRORS)
def test_paged_option_errors(monkeypatch, options, error, match):
    """The contiguous kernel's option checks, through the paged entry point."""
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    monkeypatch.setattr(mgpu, "_attend", lambda *a, **kw: None)  # the launch itself cannot run here
    with pytest.raises(error, match=match):
        multi_token_attention_mgpu_paged(*_paged_args(), **options)


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal where Mosaic GPU cannot run")
def test_paged_refuses_to_run_without_mosaic_gpu():
    with pytest.raises(RuntimeError, match="the Mosaic GPU multi-token kernel cannot run here: "):
        multi_token_attention_mgpu_paged(*_paged_args())


def test_to_pages_spells_out_the_readable_cache(rng):
    """The GPU test's pools: every readable position is where the table says, the rest never listed."""
    _, k, _, _, lengths, counts, window, _, _ = case_inputs(rng, BY_ID["ragged_g8_window_softcap"])
    ok = readable(lengths, counts, window, k.shape[2])
    pools, table = to_pages(rng, k, 16, ok)
    for b, s in zip(*np.nonzero(ok), strict=True):
        np.testing.assert_array_equal(pools[table[b, s // 16], :, s % 16], k[b, :, s])
    assert len(set(table[table >= 0].tolist())) == (table >= 0).sum()  # no page listed twice
    pages_used = np.pad(ok, ((0, 0), (0, -k.shape[2] % 16))).reshape(len(ok), -1, 16).any(axis=2)
    assert (table[~pages_used] == -1).all() and (table[pages_used] >= 0).all()
