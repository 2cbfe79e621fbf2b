"""The warp-specialised Mosaic GPU multi-token kernel (two consumer warpgroups, one producer) against a float64
NumPy reference on a Hopper GPU; on every host its consumers' split of each tile through the float64 emulation of
test_multi_token_mgpu.py, its CUDA lowering and its shared-memory check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arg_errors import MULTI_TOKEN_MGPU_OPTION_ERRORS, multi_token_args, parametrize
from conftest import REL_TOL, rel_err
from multi_token_f64 import multi_token_attention_f64
from test_multi_token_mgpu import CASES, IDS, case_inputs, emulate, tile_table

from pallas_kernels import backend
from pallas_kernels import multi_token_mgpu as mgpu
from pallas_kernels import multi_token_mgpu_ws as ws

ON_HOPPER = backend.mosaic_gpu_usable()
Config = mgpu.MgpuMultiTokenConfig
# Long key loops (the ring wraps many times) over which the consumers' ranges differ: a window cuts blocks that only
# consumer 0 reads, the causal diagonal blocks that only consumer 1 reads. (id, sequences, N, K, D, S, window,
# softcap, config) as test_multi_token_mgpu.CASES.
LONG = dict(q_starts=[0, 704], lengths=[0, 500], counts=[700, 300], rows=1008)
LONG_CASES = [
    ("long_one_stage_window", LONG, 8, 2, 128, 1024, 300, None, Config(64, 1, 64, 1)),
    ("long_three_stages", LONG, 8, 2, 128, 1024, None, None, Config(64, 1, 64, 3)),
    ("long_bk128_window", LONG, 8, 2, 128, 1024, 200, None, Config(64, 1, 128, 2)),
    ("long_g4_window_softcap", LONG, 8, 2, 128, 1024, 100, 30.0, None),
    ("long_g4_bk128_window", LONG, 8, 2, 128, 1024, 300, None, Config(16, 4, 128, 2)),  # the dispatched launch
]
WS_CASES, WS_IDS = CASES + LONG_CASES, IDS + [c[0] for c in LONG_CASES]


def consumer_tiles(table, *, config, window):
    """Each tile of a ``2 * block_q`` table as the two consumers' 64-row tiles (``_own_range``), in the one-consumer
    table's columns; checks that a consumer's blocks lie inside its tile's."""
    out = []
    for b, row0, skip, nrows, pos_base, lo, hi, t_lo, _, _, t_hi in np.asarray(table):
        for wg in range(ws.CONSUMERS):
            own = ws._own_range(
                wg, skip, nrows, pos_base, hi, t_lo, block_q=config.block_q, block_k=config.block_k, window=window
            )
            my_skip, my_rows, my_base, my_lo, my_ulo, my_uhi, my_hi = (int(x) for x in own)
            assert t_lo <= my_lo <= my_ulo <= my_uhi <= my_hi <= max(t_hi, t_lo)
            row = (b, row0 + wg * config.block_q, my_skip, my_rows, my_base, lo, hi, my_lo, my_ulo, my_uhi, my_hi)
            out.append(row)
    return out


@pytest.mark.parametrize("case", WS_CASES, ids=WS_IDS)
def test_consumers_split_tiles_through_the_emulation(rng, case):
    q, k, v, starts, lengths, counts, window, softcap, config = case_inputs(rng, case)
    table = tile_table(
        starts, lengths, counts, num_rows=q.shape[0], block_q=2 * config.block_q, block_k=config.block_k, window=window
    )
    tiles = consumer_tiles(np.asarray(table), config=config, window=window)
    options = dict(config=config, scale=q.shape[2] ** -0.5, window=window, softcap=softcap)
    out, stores = emulate(tiles, q, k, v, **options)
    np.testing.assert_array_equal(stores, 1)
    ref = multi_token_attention_f64(q, k, v, starts, lengths, counts, window=window, softcap=softcap)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
@pytest.mark.parametrize("pingpong", [False, True], ids=["plain", "pingpong"])
@pytest.mark.parametrize("case", WS_CASES, ids=WS_IDS)
def test_ws_kernel_matches_float64(rng, case, pingpong):
    q, k, v, starts, lengths, counts, window, softcap, config = case_inputs(rng, case)
    config = config._replace(pingpong=pingpong)
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float64)
    ref = multi_token_attention_f64(bf(q), bf(k), bf(v), starts, lengths, counts, window=window, softcap=softcap)
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(x) for x in (starts, lengths, counts)]
    out = ws.multi_token_attention_mgpu_ws(*args, window=window, softcap=softcap, config=config)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    out = np.asarray(out).astype(np.float64)
    np.testing.assert_array_equal(out[np.isnan(q[:, 0, 0])], 0.0)
    assert rel_err(out, ref) < REL_TOL["bfloat16"]


@pytest.mark.parametrize("pingpong", [False, True], ids=["plain", "pingpong"])
@pytest.mark.parametrize(
    "config,window",
    [(None, None), (mgpu.MgpuMultiTokenConfig(64, 1, 128, 2), 70), (mgpu.MgpuMultiTokenConfig(16, 4, 64, 1), 40)],
    ids=["default", "bk128_window", "one_stage_window"],
)
def test_ws_lowers_for_cuda(config, window, pingpong):
    """Three warpgroups (two consumers, a producer) sharing the ring through barriers, with or without the
    consumers' ping-pong barrier: Mosaic GPU lowers it."""
    sd = jax.ShapeDtypeStruct
    cache = sd((2, 3, 2, 256, 128), jnp.bfloat16)
    ints = sd((3,), jnp.int32)
    config = (config or mgpu.mgpu_multi_token_config(8, 2, 128, jnp.bfloat16))._replace(pingpong=pingpong)
    args = (sd((64, 8, 128), jnp.bfloat16), cache, cache, ints, ints, ints, sd((1,), jnp.int32))
    options = dict(scale=0.1, window=window, softcap=None, config=config)
    assert "mosaic_gpu" in ws._attend.trace(*args, **options).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
def test_dispatched_long_prefill_memory_is_not_t_times_s():
    """Issue 20 through the dispatch (the warp-specialised kernel, its 128-key launch): a 32k-token prompt's prefill
    compiles with temporaries below one T x S array of bf16 / 16."""
    from pallas_kernels import dispatch

    rows = max_len = 32768
    q = jax.ShapeDtypeStruct((rows, 32, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((8, 1, 8, max_len, 128), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((1,), jnp.int32)
    assert dispatch.multi_token_mgpu_kind(rows, 1, 32, 8, 128, jnp.bfloat16) == "ws"
    fn = jax.jit(lambda q, k, v, s, n, c: dispatch.multi_token_attention_auto(q, k, v, s, n, c, layer=3))
    memory = fn.lower(q, cache, cache, ints, ints, ints).compile().memory_analysis()
    assert memory.temp_size_in_bytes < rows * max_len * 2 // 16, memory


def test_ws_shared_memory_counts_both_consumers(monkeypatch):
    """Two query and output tiles beside the ring: a ring that fits one consumer may not fit two."""
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    monkeypatch.setattr(ws, "_attend", lambda *a, **kw: None)
    config = mgpu.MgpuMultiTokenConfig(16, 4, 64, 5)  # 160 KiB of ring at D = 128, 32 KiB of tiles per consumer
    assert mgpu.resolve_config(config, 8, 2, 128, jnp.bfloat16, jnp.bfloat16) == config
    with pytest.raises(ValueError, match="bytes of shared memory"):
        ws.multi_token_attention_mgpu_ws(*multi_token_args(), config=config)


@parametrize("options,error,match", MULTI_TOKEN_MGPU_OPTION_ERRORS)
def test_ws_option_errors(monkeypatch, options, error, match):
    """The contiguous kernel's option checks, through the warp-specialised entry point."""
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    monkeypatch.setattr(ws, "_attend", lambda *a, **kw: None)  # the launch itself cannot run here
    with pytest.raises(error, match=match):
        ws.multi_token_attention_mgpu_ws(*multi_token_args(), **options)


def test_ws_takes_pingpong(monkeypatch):
    """The warp-specialised entry point passes ``config.pingpong`` on to its kernel."""
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    calls = []
    monkeypatch.setattr(ws, "_attend", lambda *a, **kw: calls.append(kw["config"]))  # the launch cannot run here
    config = mgpu.MgpuMultiTokenConfig(16, 4, 64, 2, pingpong=True)
    ws.multi_token_attention_mgpu_ws(*multi_token_args(), config=config)
    assert calls == [config]


def test_one_warpgroup_kernel_refuses_pingpong(monkeypatch):
    """The ping-pong schedule needs two consumers: the one-warpgroup kernel refuses it rather than ignore it."""
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    monkeypatch.setattr(mgpu, "_attend", lambda *a, **kw: None)
    config = mgpu.MgpuMultiTokenConfig(16, 4, 64, 2, pingpong=True)
    with pytest.raises(ValueError, match=r"config\.pingpong=True takes two consumer warpgroups"):
        mgpu.multi_token_attention_mgpu(*multi_token_args(), config=config)
