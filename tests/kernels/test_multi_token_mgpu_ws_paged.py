"""The paged warp-specialised Mosaic GPU multi-token kernel against a float64 NumPy reference (values on a Hopper
GPU only, as in test_multi_token_mgpu_paged.py); on every host the pages its producer copies into each ring slot,
its CUDA lowering and its argument errors.

Pools hold the poisoned contiguous cache at permuted pages, spare pages are NaN, and table entries of pages with
no readable position are -1 (``test_multi_token_mgpu_paged.to_pages``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arg_errors import MULTI_TOKEN_MGPU_OPTION_ERRORS, parametrize
from conftest import REL_TOL, rel_err
from multi_token_f64 import multi_token_attention_f64, readable
from test_multi_token_mgpu import case_inputs, tile_table
from test_multi_token_mgpu_paged import BY_ID, _paged_args, to_pages

from pallas_kernels import backend
from pallas_kernels import multi_token_mgpu as mgpu
from pallas_kernels import multi_token_mgpu_kernel as kernel
from pallas_kernels import multi_token_mgpu_ws as ws
from pallas_kernels import multi_token_mgpu_ws_paged as wsp

ON_HOPPER = backend.mosaic_gpu_usable()
# (case of test_multi_token_mgpu, page_size, layer: None for one-layer pools, else the layer of two)
PAGED = [
    ("ragged_g4_d64", 16, None),
    ("ragged_g8_window_softcap", 16, 1),  # windows of 50 start inside pages
    ("ragged_mha_window_1", 8, None),
    ("verify_t5_g8_d128", 8, None),
    ("verify_t5_g4_window", 16, 0),
    ("prefill_g1_d128", 32, None),
    ("chunk_window_cuts_block", 64, None),
    ("chunk_diagonal_edge", 16, None),
    ("ragged_g4_heads_1_bk128", 32, 1),
    ("chunk_g4_bk128", 16, 1),  # the dispatched launch: 8 pages a block
]
IDS = [f"{n}_page{p}" + ("" if layer is None else f"_layer{layer}") for n, p, layer in PAGED]


def paged_case(rng, name, page_size):
    """A case's inputs with K and V in pools at the same permuted pages: ``(q, k_pages, v_pages, table, ...)``."""
    q, k, v, starts, lengths, counts, window, softcap, config = case_inputs(rng, BY_ID[name])
    ok = readable(lengths, counts, window, k.shape[2])
    seed = int(rng.integers(1 << 30))
    (k_pages, table), (v_pages, _) = (to_pages(np.random.default_rng(seed), x, page_size, ok) for x in (k, v))
    return q, k, v, k_pages, v_pages, table, starts, lengths, counts, window, softcap, config


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
@pytest.mark.parametrize("pingpong", [False, True], ids=["plain", "pingpong"])
@pytest.mark.parametrize("name,page_size,layer", PAGED, ids=IDS)
def test_ws_paged_kernel_matches_float64(rng, name, page_size, layer, pingpong):
    q, k, v, k_pages, v_pages, table, starts, lengths, counts, window, softcap, config = paged_case(
        rng, name, page_size
    )
    config = config._replace(pingpong=pingpong)
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float64)
    ref = multi_token_attention_f64(bf(q), bf(k), bf(v), starts, lengths, counts, window=window, softcap=softcap)
    if layer is not None:  # two layers, the other all NaN: only the selected one may be read
        k_pages, v_pages = (
            np.stack([x if i == layer else np.full_like(x, np.nan) for i in range(2)]) for x in (k_pages, v_pages)
        )
    bfs = lambda *xs: [jnp.asarray(x, jnp.bfloat16) for x in xs]
    ints = [jnp.asarray(x) for x in (table, starts, lengths, counts)]
    out = wsp.multi_token_attention_mgpu_ws_paged(
        *bfs(q, k_pages, v_pages), *ints, layer=layer, window=window, softcap=softcap, config=config
    )
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    out = np.asarray(out).astype(np.float64)
    np.testing.assert_array_equal(out[np.isnan(q[:, 0, 0])], 0.0)
    assert rel_err(out, ref) < REL_TOL["bfloat16"]


@pytest.mark.parametrize("name,page_size,layer", PAGED, ids=IDS)
def test_slots_hold_every_key_of_their_tile(rng, name, page_size, layer):
    """Each ring slot the producer fills (the warp-specialised tile table's blocks, through ``block_columns``)
    holds every key of its tile's range on its own row, and no -1 or widened table entry is ever read."""
    del layer
    q, k, _, k_pages, _, table, starts, lengths, counts, window, _, config = paged_case(rng, name, page_size)
    block_k = config.block_k
    wide = np.pad(table, ((0, 0), (0, max(block_k // page_size - table.shape[1], 0))), constant_values=-1)
    capacity = wide.shape[1] * page_size
    tiles = tile_table(
        starts,
        lengths,
        counts,
        num_rows=q.shape[0],
        block_q=ws.CONSUMERS * config.block_q,
        block_k=block_k,
        window=window,
    )
    slots = 0
    for b, _, _, _, _, lo, hi, t_lo, _, _, t_hi in np.asarray(tiles):
        for t in range(t_lo, t_hi):
            start = int(kernel.block_start(t, block_k=block_k, max_len=capacity))
            columns = [int(c) for c in wsp.block_columns(start, lo, hi, block_k=block_k, page_size=page_size)]
            entries = wide[b, columns]
            assert (entries >= 0).all(), (b, t, lo, hi, columns, entries)
            slot = np.concatenate([k_pages[e] for e in entries], axis=1)  # [K, block_k, D]
            keys = np.arange(max(lo, start), min(hi, start + block_k))
            np.testing.assert_array_equal(slot[:, keys - start], k[b][:, keys])
            slots += 1
    assert slots > 0


def lower_for_cuda(page_size, block_k, window, stages, pingpong=False):
    """``_attend`` of a three-sequence call over two-layer pools, lowered for CUDA (no GPU needed)."""
    layers, pages, kv_heads, head_dim, batch, per_seq = 2, 40, 2, 128, 3, 16
    sd = jax.ShapeDtypeStruct
    pools = sd((layers, pages, kv_heads, page_size, head_dim), jnp.bfloat16)
    ints = sd((batch,), jnp.int32)
    args = (sd((64, 8, head_dim), jnp.bfloat16), pools, pools, sd((batch * per_seq,), jnp.int32), ints, ints, ints)
    config = mgpu.MgpuMultiTokenConfig(16, 4, block_k, stages, pingpong=pingpong)
    options = dict(scale=0.1, window=window, softcap=None, config=config, pages_per_seq=per_seq)
    return wsp._attend.trace(*args, sd((1,), jnp.int32), **options).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("pingpong", [False, True], ids=["plain", "pingpong"])
@pytest.mark.parametrize(
    "page_size,block_k,window,stages", [(16, 64, None, 2), (8, 64, 40, 3), (64, 128, 70, 2)], ids=str
)
def test_ws_paged_lowers_for_cuda(page_size, block_k, window, stages, pingpong):
    """A producer warpgroup issuing one TMA copy per page, all on the slot's barrier (the consumers with or without
    their ping-pong barrier): Mosaic GPU lowers it."""
    assert "mosaic_gpu" in lower_for_cuda(page_size, block_k, window, stages, pingpong).as_text()


def test_copies_per_slot_match_the_barrier(monkeypatch):
    """A fill issuing fewer copies than its slot barrier awaits would hang the consumers: refused while tracing."""
    fewer = wsp._page_copies
    monkeypatch.setattr(wsp, "_page_copies", lambda *a, **kw: fewer(*a, **kw)[1:])
    wsp._attend.clear_cache()  # trace again with the patched fill
    with pytest.raises(ValueError, match=r"gave 3 copies per slot, fill\.copies=4"):
        lower_for_cuda(16, 64, None, 2)


@pytest.mark.parametrize(
    "change,options,match",
    [
        (dict(page_size=12), {}, "page_size=12 must be a multiple of 8"),
        (dict(page_size=48), {}, "page_size=48 must divide config.block_k=64"),
        (dict(table=[[0, 1, 2, 12], [4, 5, 6, 7]]), {}, "block_tables hold page 12 but the pools have P=12 pages"),
        (dict(table=[[0, 1], [2, 3]], lengths=(30, 5)), {}, r"must lie in \[0, S=32\]"),
        # a ring that fits one consumer's query and output tiles but not two
        ({}, dict(config=mgpu.MgpuMultiTokenConfig(16, 4, 64, 5)), "bytes of shared memory"),
    ],
    ids=["page_off_tile", "page_off_block", "page_past_pool", "past_table", "smem_two_consumers"],
)
def test_ws_paged_argument_errors(monkeypatch, change, options, match):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    monkeypatch.setattr(wsp, "_attend", lambda *a, **kw: None)  # the launch itself cannot run here
    with pytest.raises(ValueError, match=match):
        wsp.multi_token_attention_mgpu_ws_paged(*_paged_args(**change), **options)


@parametrize("options,error,match", MULTI_TOKEN_MGPU_OPTION_ERRORS)
def test_ws_paged_option_errors(monkeypatch, options, error, match):
    """The contiguous kernel's option checks, through the paged warp-specialised entry point."""
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    monkeypatch.setattr(wsp, "_attend", lambda *a, **kw: None)  # the launch itself cannot run here
    with pytest.raises(error, match=match):
        wsp.multi_token_attention_mgpu_ws_paged(*_paged_args(), **options)


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal where Mosaic GPU cannot run")
def test_ws_paged_refuses_to_run_without_mosaic_gpu():
    with pytest.raises(RuntimeError, match="the Mosaic GPU multi-token kernel cannot run here: "):
        wsp.multi_token_attention_mgpu_ws_paged(*_paged_args())
