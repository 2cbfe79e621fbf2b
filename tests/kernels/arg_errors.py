"""Argument-error tables that several kernels' tests share, each row ``(id, ..., error, match)``, and the inputs
they change. Each test file runs a table through its own entry point (and its own ``_args`` where a row changes
the inputs): the same check, written once, must refuse the same way everywhere."""

import jax.numpy as jnp
import pytest

from pallas_kernels import multi_token_mgpu as mgpu


def parametrize(names: str, rows):
    """``pytest.mark.parametrize`` over rows that start with their id."""
    return pytest.mark.parametrize(names, [row[1:] for row in rows], ids=[row[0] for row in rows])


# What every Mosaic GPU attention kernel refuses (16-bit MMA inputs, the swizzle's head dims): (id, change to the
# inputs, error, regex).
MGPU_INPUT_ERRORS = [
    ("f32_cache", dict(dtype=jnp.float32), TypeError, "16-bit MMA inputs"),
    ("head_dim_32", dict(head_dim=32), ValueError, "head_dim=32 is not supported by the Mosaic GPU kernel"),
]
# The Mosaic GPU decode kernels (contiguous and paged): a kv head's query heads are rows of one 64-row MMA tile.
DECODE_MGPU_INPUT_ERRORS = [
    *MGPU_INPUT_ERRORS,
    ("group_65", dict(group=65, kv_heads=1), ValueError, "65 query heads per kv head exceeds 64"),
]
# Their launch overrides (decode_mgpu._resolve_config): (id, keyword arguments, error, regex).
DECODE_MGPU_LAUNCH_ERRORS = [
    ("block_k", dict(block_k=128), ValueError, "block_k=128 must be 64"),
    ("splits", dict(num_splits=0), ValueError, "num_splits=0 must be >= 1"),
    ("stages", dict(num_stages=0), ValueError, "num_stages=0 must be >= 1"),
    ("ring_too_big", dict(num_stages=8), ValueError, "bytes of K/V ring and query tile"),
    ("splits_float", dict(num_splits=2.0), TypeError, "num_splits must be an int"),
    ("scale", dict(scale="x"), TypeError, "scale must be a Python number"),
]

# The options of the Mosaic GPU multi-token kernels (contiguous, paged, warp-specialised) on a cache with 8 query
# and 2 kv heads, head_dim 128: (id, keyword arguments, error, regex).
Config = mgpu.MgpuMultiTokenConfig
MULTI_TOKEN_MGPU_OPTION_ERRORS = [
    ("heads_per_tile", dict(config=Config(8, 8, 64, 2)), ValueError, "heads_per_tile=8 must divide G=4"),
    ("rows", dict(config=Config(32, 4, 64, 2)), ValueError, "must be 64 rows"),
    ("block_k", dict(config=Config(16, 4, 32, 2)), ValueError, r"block_k=32 must be one of \(64, 128\)"),
    ("smem", dict(config=Config(16, 4, 128, 8)), ValueError, "bytes of shared memory"),
    ("config_type", dict(config=(16, 4, 64, 2)), TypeError, "config must be an MgpuMultiTokenConfig"),
    ("pingpong_type", dict(config=Config(16, 4, 64, 2, pingpong=1)), TypeError, r"config\.pingpong=1 must be a bool"),
    ("window", dict(window=0), ValueError, "window=0 must be None or an int >= 1"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap=-1.0 must be None or a positive number"),
    ("scale", dict(scale="x"), TypeError, "scale must be a Python number"),
    ("layer_4d", dict(layer=0), ValueError, "layer=0 goes with a whole"),
]


def multi_token_args(rows=16, batch=2, kv_heads=2, group=4, head_dim=128, max_len=256, dtype=jnp.bfloat16):
    """A valid contiguous multi-token call's arguments: two sequences of 8 and 4 queries after 3 and 5 cached."""
    q = jnp.ones((rows, kv_heads * group, head_dim), dtype)
    k = jnp.ones((batch, kv_heads, max_len, head_dim), dtype)
    ints = lambda *x: jnp.asarray(x, jnp.int32)
    return q, k, k, ints(0, 8), ints(3, 5), ints(8, 4)


def _f32(*shape):
    return jnp.zeros(shape, jnp.float32)


def paged_check_errors() -> list:
    """``pallas_kernels.paged.check_args``, which every paged decode entry point runs first: rows (keyword arguments
    for :func:`paged_decode_call`, error, substring of the message)."""
    f32 = _f32
    layers = dict(k=f32(2, 6, 2, 16, 64), v=f32(2, 6, 2, 16, 64))
    return [
        (dict(q=f32(2, 64)), ValueError, "q must have shape [B, N, D]"),
        (dict(k=f32(6, 2, 64)), ValueError, "must both have shape [P, K, page_size, D]"),
        (layers, ValueError, "holds every layer"),
        (dict(layer=0), ValueError, "layer=0 needs pools of shape"),
        (dict(k=f32(6, 2, 16, 64).astype(jnp.bfloat16)), TypeError, "must share a dtype"),
        (dict(k=f32(6, 2, 16, 64).astype(jnp.int8), v=f32(6, 2, 16, 64).astype(jnp.int8)), TypeError, "must share"),
        (dict(q=f32(2, 4, 64).astype(jnp.int32)), TypeError, "q must be a floating array"),
        (dict(q=f32(2, 4, 32)), ValueError, "head_dim must agree"),
        (dict(q=f32(2, 3, 64)), ValueError, "num_q_heads=3 must be a multiple of num_kv_heads=2"),
        (dict(q=f32(2, 4, 40), k=f32(6, 2, 16, 40), v=f32(6, 2, 16, 40)), ValueError, "head_dim=40 is not supported"),
        (dict(q=f32(2, 4, 272), k=f32(6, 2, 16, 272), v=f32(6, 2, 16, 272)), ValueError, "head_dim=272 is not"),
        (dict(k=f32(6, 2, 12, 64), v=f32(6, 2, 12, 64)), ValueError, "page_size=12 must be a power of two"),
        (dict(t=jnp.zeros((3, 3), jnp.int32)), ValueError, "block_tables must be int[2, M]"),
        (dict(t=jnp.zeros((2, 3))), ValueError, "block_tables must be int[2, M]"),
        (dict(n=jnp.ones(3, jnp.int32)), ValueError, "lengths must be int[2]"),
        (dict(n=jnp.array([1, 49])), ValueError, "lengths=[ 1 49] must lie in [0, M * page_size = 48]"),
        (dict(t=jnp.array([[0, 1, 2], [-1, 0, 0]])), ValueError, "block_tables[1, 0]=-1 must name a page in [0, 6)"),
        (dict(t=jnp.array([[6, 1, 2], [0, 0, 0]])), ValueError, "block_tables[0, 0]=6 must name a page"),
        (dict(layers, layer=0.0), TypeError, "layer must be an int"),
        (dict(layers, layer=jnp.zeros(2, jnp.int32)), ValueError, "scalar"),
        (dict(layers, layer=2), ValueError, "layer=2 out of range"),
    ]


def paged_decode_call(fn, **kw):
    """``fn(q, k_pages, v_pages, block_tables, lengths, **rest)`` on float32 inputs (q ``[2, 4, 64]``, pools
    ``[6, 2, 16, 64]``, a ``[2, 3]`` table, lengths 1), ``q``, ``k``, ``v``, ``t``, ``n`` in ``kw`` replacing them."""
    q, pool = _f32(2, 4, 64), _f32(6, 2, 16, 64)
    defaults = dict(q=q, k=pool, v=pool, t=jnp.zeros((2, 3), jnp.int32), n=jnp.ones(2, jnp.int32))
    args = [kw.pop(name, default) for name, default in defaults.items()]
    return fn(*args, **kw)


def assert_refusals(fn, rows) -> None:
    """Each row ``(keyword arguments, error, substring)`` of a ``paged_decode_call`` of ``fn`` raises so."""
    for kwargs, exc, text in rows:
        with pytest.raises(exc) as info:
            paged_decode_call(fn, **kwargs)
        assert text in str(info.value), (text, str(info.value))
