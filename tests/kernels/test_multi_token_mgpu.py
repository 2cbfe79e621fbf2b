"""Mosaic GPU multi-token attention kernel (issue 20) against a float64 NumPy reference.

Mosaic GPU's interpreter cannot run this kernel (it has no rule for ``run_state``, ``layout_cast`` or a transposed
MMA operand), so the kernel's values are checked on a Hopper GPU only (``TestOnHopper``, skipped elsewhere). On
every host: the tile table, through a float64 NumPy emulation of the kernel's loop over it (the blocks each tile
loads, its masks, the V rows it zeroes, the rows it stores) on NaN-poisoned inputs; the CUDA lowering (Mosaic GPU's
layout inference runs without a GPU), with no T x S array in the program; argument errors. Every case draws fresh
random inputs with NaN in each cache position no query of its sequence may read and in each q row no sequence
owns; ragged counts include 0 and 1.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arg_errors import MGPU_INPUT_ERRORS, MULTI_TOKEN_MGPU_OPTION_ERRORS, multi_token_args, parametrize
from conftest import REL_TOL, rel_err
from kernel_inputs import fast_jit
from multi_token_f64 import multi_token_attention_f64, poisoned_inputs

from pallas_kernels import backend, multi_token_tiles
from pallas_kernels import multi_token_mgpu as mgpu

ON_HOPPER = backend.mosaic_gpu_usable()
Config = mgpu.MgpuMultiTokenConfig
tile_table = fast_jit(multi_token_tiles.tile_table, static_argnames=("num_rows", "block_q", "block_k", "window"))
RAGGED = dict(q_starts=[70, 3, 20, 64, 100], lengths=[10, 0, 100, 200, 63], counts=[0, 1, 37, 5, 17], rows=128)
VERIFY = dict(q_starts=[0, 5, 10, 15, 20, 25], lengths=[0, 60, 64, 127, 150, 195], counts=[5] * 6, rows=32)

# (id, sequences, N, K, D, S, window, softcap, config or None for the default)
CASES = [
    ("ragged_g4_d64", RAGGED, 8, 2, 64, 300, None, None, None),
    ("ragged_g8_window_softcap", RAGGED, 16, 2, 64, 300, 50, 20.0, None),
    ("ragged_mha_window_1", RAGGED, 4, 4, 64, 300, 1, None, None),
    ("verify_t5_g8_d128", VERIFY, 8, 1, 128, 200, None, None, None),
    ("verify_t5_g4_window", VERIFY, 8, 2, 128, 200, 70, None, Config(16, 4, 64, 3)),
    ("prefill_g1_d128", dict(q_starts=[0], lengths=[0], counts=[130], rows=136), 2, 2, 128, 160, None, None, None),
    (
        "chunk_window_cuts_block",
        dict(q_starts=[8], lengths=[100], counts=[90], rows=104),
        4,
        1,
        64,
        256,
        131,  # the tile at positions 180..195: its last row's window starts at 65, one past a block start
        None,
        None,
    ),
    ("ragged_g4_heads_1_bk128", RAGGED, 8, 2, 128, 300, 90, 10.0, Config(64, 1, 128, 2)),
    # tiles whose first query sits 2 below a block's end: the unmasked run must stop before that block
    ("chunk_diagonal_edge", dict(q_starts=[0], lengths=[62], counts=[70], rows=72), 4, 1, 64, 160, None, None, None),
    # the warp-specialised kernels' dispatched launch at G = 4, D = 128 (dispatch.ws_config: 128-key blocks)
    (
        "chunk_g4_bk128",
        dict(q_starts=[0], lengths=[300], counts=[200], rows=200),
        8,
        2,
        128,
        512,
        None,
        30.0,
        Config(16, 4, 128, 2),
    ),
]
IDS = [c[0] for c in CASES]


def case_inputs(rng, case):
    _, seqs, num_heads, kv_heads, head_dim, max_len, window, softcap, config = case
    starts, lengths, counts = (np.asarray(seqs[n], np.int32) for n in ("q_starts", "lengths", "counts"))
    q, k, v = poisoned_inputs(
        rng, seqs["rows"], num_heads, kv_heads, head_dim, max_len, starts, lengths, counts, window
    )
    config = config or mgpu.mgpu_multi_token_config(num_heads, kv_heads, head_dim, jnp.bfloat16)
    return q, k, v, starts, lengths, counts, window, softcap, config


def emulate(tiles, q, k, v, *, config, scale, window, softcap):
    """The kernel's algorithm in float64 NumPy over ``tiles`` (rows of a tile table: one per 64-row MMA tile):
    the blocks each loads, its masks, the V rows it zeroes, the rows it stores. Returns out (NaN where no tile
    stored) and the stores per row."""
    num_rows, num_heads, _ = q.shape
    block_q, block_k = config.block_q, config.block_k
    max_len = k.shape[2]
    padded = max(block_k, -(-max_len // 8) * 8)  # the wrapper's padding of S (NaN here: never to be read)
    k, v = (np.pad(x, ((0, 0), (0, 0), (0, padded - max_len), (0, 0)), constant_values=np.nan) for x in (k, v))
    kv_of_head = np.arange(num_heads) // (num_heads // k.shape[1])
    out, stores = np.full(q.shape, np.nan), np.zeros(num_rows, int)
    for b, row0, skip, nrows, pos_base, lo, hi, t_lo, u_lo, u_hi, t_hi in tiles:
        if nrows == 0:
            continue
        assert row0 % 8 == 0 and 0 <= skip and skip + nrows <= block_q and t_lo <= u_lo <= u_hi <= t_hi
        limit = pos_base + np.arange(block_q)  # each tile row's position
        rows = row0 + np.arange(block_q)
        tile_q = np.where((rows < num_rows)[:, None, None], q[np.minimum(rows, num_rows - 1)], 0.0)
        scores, values = [np.zeros((block_q, num_heads, 0))], [np.zeros((num_heads, 0, q.shape[2]))]
        for t in range(t_lo, t_hi):
            start = min(t * block_k, padded - block_k)
            pos = start + np.arange(block_k)
            vb = v[b, kv_of_head][:, pos]  # [N, bk, D]
            s = np.einsum("rnd,npd->rnp", tile_q, k[b, kv_of_head][:, pos]) * scale
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            valid = (pos >= t * block_k) & (pos <= limit[:, None])
            if window is not None:
                valid &= pos + window > limit[:, None]
            if u_lo <= t < u_hi:  # the table says no row needs a mask here: it must hold for the tile's own rows
                assert valid[skip : skip + nrows].all(), (t, pos, limit)
            else:
                s = np.where(valid[:, None, :], s, -np.inf)
                keep_lo = max(lo, t * block_k)
                if start < keep_lo or start + block_k > hi:
                    vb = np.where(((pos >= keep_lo) & (pos < hi))[None, :, None], vb, 0.0)
            scores.append(s)
            values.append(vb)
        s, vals = np.concatenate(scores, axis=2), np.concatenate(values, axis=1)
        own = slice(skip, skip + nrows)
        if s.shape[2] == 0:  # a tile over rows no sequence owns
            out[row0 + skip : row0 + skip + nrows] = 0.0
        else:
            w = np.exp(s[own] - s[own].max(axis=2, keepdims=True))
            out[row0 + skip : row0 + skip + nrows] = np.einsum("rnp,npd->rnd", w, vals) / w.sum(axis=2)[..., None]
        stores[row0 + skip : row0 + skip + nrows] += 1
    return out, stores


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tile_table_through_an_emulation_of_the_kernel(rng, case):
    """Every row is stored by exactly one tile, gives the float64 reference, and nothing unreadable is read."""
    q, k, v, starts, lengths, counts, window, softcap, config = case_inputs(rng, case)
    table = tile_table(
        starts, lengths, counts, num_rows=q.shape[0], block_q=config.block_q, block_k=config.block_k, window=window
    )
    table = np.asarray(table)
    assert table.shape == (multi_token_tiles.max_tiles(q.shape[0], len(counts), config.block_q), 11)
    work = np.asarray(table[:, -1] - table[:, -4])
    assert (np.diff(work) <= 0).all()  # the longest key loops first
    scale = q.shape[2] ** -0.5
    out, stores = emulate(np.asarray(table), q, k, v, config=config, scale=scale, window=window, softcap=softcap)
    np.testing.assert_array_equal(stores, 1)
    ref = multi_token_attention_f64(q, k, v, starts, lengths, counts, window=window, softcap=softcap)
    assert rel_err(out, ref) < 1e-12


def test_tile_table_is_cheap_at_a_long_prompt():
    """A 32k-token prefill: about T / block_q live tiles; the rest are dead (no rows) and last."""
    table = np.asarray(
        tile_table(np.int32([0]), np.int32([0]), np.int32([32768]), num_rows=32768, block_q=16, block_k=64, window=None)
    )
    live = table[:, 3] > 0
    assert live.sum() == 2048 and live[:2048].all()
    assert table[0, -1] == 512 and table[0, -4] == 0  # the last tile of the prompt reads every block


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
class TestOnHopper:
    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case, dtype):
        q, k, v, starts, lengths, counts, window, softcap, config = case_inputs(rng, case)
        dtype = jnp.dtype(dtype)
        rounded = lambda x: np.asarray(jnp.asarray(x, dtype)).astype(np.float64)
        ref = multi_token_attention_f64(
            rounded(q), rounded(k), rounded(v), starts, lengths, counts, window=window, softcap=softcap
        )
        args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(x) for x in (starts, lengths, counts)]
        out = mgpu.multi_token_attention_mgpu(*args, window=window, softcap=softcap, config=config)
        assert out.shape == q.shape and out.dtype == dtype
        out = np.asarray(out).astype(np.float64)
        owned = ~np.isnan(q[:, 0, 0])
        np.testing.assert_array_equal(out[~owned], 0.0)  # rows no sequence owns
        assert rel_err(out, ref) < REL_TOL[dtype.name]

    def test_whole_cache_traced_layer_float32_queries(self, rng):
        """A [L, B, K, S, D] cache with the layer traced under jit, NaN in the other layer; f32 q keeps its dtype."""
        q, k, v, starts, lengths, counts, window, softcap, _ = case_inputs(rng, CASES[1])
        bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float64)
        ref = multi_token_attention_f64(bf(q), bf(k), bf(v), starts, lengths, counts, window=window, softcap=softcap)
        whole = lambda x: jnp.asarray(np.stack([np.full_like(x, np.nan), x]), jnp.bfloat16)
        fn = jax.jit(
            lambda q, k, v, s, n, c, layer: mgpu.multi_token_attention_mgpu(
                q, k, v, s, n, c, layer=layer, window=window, softcap=softcap
            )
        )
        out = fn(jnp.asarray(q, jnp.float32), whole(k), whole(v), starts, lengths, counts, jnp.int32(1))
        assert out.dtype == jnp.float32
        assert rel_err(np.asarray(out, np.float64), ref) < REL_TOL["bfloat16"]

    def test_long_prefill_memory_is_not_t_times_s(self):
        """Issue 20: a 32k-token prompt's prefill never allocates memory proportional to T x S (the compiled
        program's temporaries, read from its memory analysis, stay below one T x S array of bf16 / 16)."""
        rows = max_len = 32768
        q = jax.ShapeDtypeStruct((rows, 32, 128), jnp.bfloat16)
        cache = jax.ShapeDtypeStruct((8, 1, 8, max_len, 128), jnp.bfloat16)
        ints = jax.ShapeDtypeStruct((1,), jnp.int32)
        fn = jax.jit(lambda q, k, v, s, n, c: mgpu.multi_token_attention_mgpu(q, k, v, s, n, c, layer=3))
        memory = fn.lower(q, cache, cache, ints, ints, ints).compile().memory_analysis()
        assert memory.temp_size_in_bytes < rows * max_len * 2 // 16, memory

    @pytest.mark.parametrize("head_dim", [256])
    def test_head_dim_256(self, rng, head_dim):
        case = ("verify", VERIFY, 8, 2, head_dim, 200, None, None, None)
        q, k, v, starts, lengths, counts, *_ = case_inputs(rng, case)
        bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float64)
        ref = multi_token_attention_f64(bf(q), bf(k), bf(v), starts, lengths, counts)
        args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(x) for x in (starts, lengths, counts)]
        out = mgpu.multi_token_attention_mgpu(*args)
        assert rel_err(np.asarray(out.astype(jnp.float32), np.float64), ref) < REL_TOL["bfloat16"]


@pytest.mark.parametrize(
    "num_rows,batch,config,window",
    [(64, 3, None, None), (40, 2, Config(64, 1, 128, 2), 33), (64, 3, Config(16, 4, 64, 3), None)],
    ids=["default", "one_head_bk128_window", "three_stages"],
)
def test_lowers_for_cuda_without_slicing_the_layer(num_rows, batch, config, window):
    """The kernel lowers to a Mosaic GPU custom call on any host (layout inference included), and the whole
    [L, B, K, S, D] cache goes to it: no layer-sized copy in the module."""
    layers, kv_heads, max_len, head_dim = 3, 2, 256, 128
    config = config or mgpu.mgpu_multi_token_config(8, kv_heads, head_dim, jnp.bfloat16)
    sd = jax.ShapeDtypeStruct
    cache = sd((layers, batch, kv_heads, max_len, head_dim), jnp.bfloat16)
    ints = sd((batch,), jnp.int32)
    args = (
        sd((num_rows, 8, head_dim), jnp.bfloat16),
        cache,
        cache,
        sd((1,), jnp.int32),
        ints,
        ints,
        ints,
        sd((1,), jnp.int32),
    )
    options = dict(scale=0.1, window=window, softcap=None, config=config)
    text = mgpu._attend.trace(*args, **options).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert f"tensor<{batch}x{kv_heads}x{max_len}x{head_dim}xbf16>" not in text


def test_long_prefill_holds_nothing_of_size_t_times_s():
    """A 32k-token prompt's program (lowered for CUDA) has no array anywhere near T x S elements."""
    rows = max_len = 32768
    sd = jax.ShapeDtypeStruct
    cache = sd((1, 1, 8, max_len, 128), jnp.bfloat16)
    ints = sd((1,), jnp.int32)
    args = (sd((rows, 32, 128), jnp.bfloat16), cache, cache, sd((1,), jnp.int32), ints, ints, ints, sd((1,), jnp.int32))
    config = mgpu.mgpu_multi_token_config(32, 8, 128, jnp.bfloat16)
    options = dict(scale=0.1, window=None, softcap=None, config=config)
    text = mgpu._attend.trace(*args, **options).lower(lowering_platforms=("cuda",)).as_text()
    sizes = [np.prod([int(d) for d in m.rstrip("x").split("x")]) for m in re.findall(r"tensor<((?:\d+x)+)", text)]
    assert max(sizes) <= rows * 32 * 128  # q and the output; the cache is 8 * S * 128


@parametrize("change,error,match", MGPU_INPUT_ERRORS)
def test_argument_errors(change, error, match):
    with pytest.raises(error, match=match):
        mgpu.multi_token_attention_mgpu(*multi_token_args(**change))


@parametrize("options,error,match", MULTI_TOKEN_MGPU_OPTION_ERRORS)
def test_option_errors(monkeypatch, options, error, match):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    monkeypatch.setattr(mgpu, "_attend", lambda *a, **kw: None)  # the launch itself cannot run here
    with pytest.raises(error, match=match):
        mgpu.multi_token_attention_mgpu(*multi_token_args(), **options)


@pytest.mark.parametrize(
    "starts,lengths,counts,match",
    [
        ((0, 8), (3, 5), (8, -1), r"counts=\[ 8 -1\] must be >= 0"),
        ((0, 8), (250, 5), (8, 4), r"must lie in \[0, S=256\]"),
        ((0, 14), (3, 5), (8, 4), r"must lie in \[0, T=16\]"),
        ((0, 6), (3, 5), (8, 4), "overlap"),
    ],
    ids=["negative_count", "past_S", "past_T", "overlap"],
)
def test_sequence_errors(starts, lengths, counts, match):
    q, k, v, *_ = multi_token_args()
    ints = lambda x: jnp.asarray(x, jnp.int32)
    with pytest.raises(ValueError, match=match):
        mgpu.multi_token_attention_mgpu(q, k, v, ints(starts), ints(lengths), ints(counts))


def test_a_sequence_with_no_queries_may_start_anywhere():
    """counts 0: its start is not a row of q, and it overlaps nothing."""
    q, k, v, *_ = multi_token_args()
    ints = lambda x: jnp.asarray(x, jnp.int32)
    mgpu.check_mgpu_args(q, k, v, ints((0, 99)), ints((3, 256)), ints((8, 0)))


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal where Mosaic GPU cannot run")
def test_refuses_to_run_without_mosaic_gpu():
    with pytest.raises(RuntimeError, match="the Mosaic GPU multi-token kernel cannot run here: "):
        mgpu.multi_token_attention_mgpu(*multi_token_args())


@pytest.mark.parametrize(
    "heads,want", [((32, 8), (16, 4)), ((8, 1), (8, 8)), ((4, 4), (64, 1)), ((24, 8), (64, 1)), ((64, 4), (8, 8))]
)
def test_default_config_fills_the_mma_rows(heads, want):
    config = mgpu.mgpu_multi_token_config(*heads, 128, jnp.bfloat16)
    assert (config.block_q, config.heads_per_tile) == want
    assert mgpu.smem_bytes(config, 128, 2, 2) <= (backend.shared_memory_per_block() - mgpu.MGPU_SMEM_RESERVE) // 2
    assert mgpu.mgpu_supported(*heads, 128, jnp.bfloat16) and not mgpu.mgpu_supported(*heads, 128, jnp.float32)
