"""Argument checks and the launch rule of the multi-token attention kernels (``pallas_kernels.multi_token``).

One check serves every (layout, format) kind and the kernels' references alike: the format checks
(:func:`check_q8_pair`, :func:`check_fp8_pair`) reduce a quantized cache to stand-ins of its values, then
:func:`check_args` checks shapes, dtypes, GQA, head_dim, the step's ``q_starts`` / ``lengths`` / ``counts`` (range
and overlap when concrete), the block table, ``layer``, ``window`` and ``softcap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import common, decode_q8, formats
from pallas_kernels.common import MIN_BLOCK, NUM_WARPS

MAX_HEAD_DIM = 256  # the query tile and the accumulator of 128 rows x 256 columns fill a program's registers


class Dims(NamedTuple):
    """Sizes of a multi-token call: tokens, query heads, kv heads, head_dim, sequences and the positions a
    sequence can hold (``S``, or ``M * page_size`` through a block table)."""

    tokens: int
    num_heads: int
    kv_heads: int
    head_dim: int
    batch: int
    max_len: int


class MultiTokenConfig(NamedTuple):
    """Launch parameters of the Triton multi-token kernel (static: each distinct value compiles its own kernel).

    A program owns ``block_q`` query tokens of one sequence and all ``G`` query heads of one kv head: its tile has
    ``block_q * G`` rows (padded to a power of two >= 16, :func:`tile_rows`), so each K/V block it loads serves
    every query head that reads it.
    """

    block_q: int  # query tokens per tile (any int >= 1)
    block_k: int  # keys per loop step (power of two >= 16)
    num_warps: int
    num_stages: int  # Triton software-pipelining depth of the key loop's loads


def tile_rows(block_q: int, group: int) -> int:
    """Rows of a program's query tile: ``block_q * group`` rounded up to a power of two, at least 16."""
    return common.group_rows(block_q * group)


def multi_token_config(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    *,
    max_len: int | None = None,
    max_count: int | None = None,
) -> MultiTokenConfig:
    """The default launch parameters (a rule to be tuned on the GPU: docs/notes/kernel_rules.md).

    ``block_q`` tokens so that a tile has about 128 rows (64 where a row is wider than 256 bytes of K: head_dim
    256, or float32), never more than ``max_count`` (the most queries a sequence brings, when the caller knows
    it: speculative verification's T = 5 needs no 128-row tile); ``block_k`` 64 keys, no more than ``max_len``;
    8 warps for tiles of 128 x 128 floats and more (the accumulator), else 4; up to 3 stages, capped by shared
    memory. ``dtype`` is the dtype of
    the stored K/V values (int8 / float8 for Q8 / FP8 caches).
    """
    group = num_q_heads // num_kv_heads
    itemsize = jnp.dtype(dtype).itemsize
    target_rows = 128 if head_dim <= 128 and itemsize <= 2 else 64
    block_q = max(1, target_rows // group)
    if max_count is not None:
        block_q = max(1, min(block_q, int(max_count)))
    block_k = 64
    if max_len is not None:
        block_k = max(MIN_BLOCK, min(block_k, common.pow2_floor(max(max_len, MIN_BLOCK))))
    num_warps = 8 if tile_rows(block_q, group) * head_dim >= 128 * 128 else 4
    num_stages = max(1, min(3, common.max_stages(block_k, head_dim, itemsize)))
    return MultiTokenConfig(block_q, block_k, num_warps, num_stages)


def resolve_config(config, default: MultiTokenConfig, head_dim: int, itemsize: int) -> MultiTokenConfig:
    """``config`` (a :class:`MultiTokenConfig`) or ``default`` for None, validated; stages are capped so the
    resident K/V blocks fit in shared memory (``common.max_stages``)."""
    if config is None:
        config = default
    if not isinstance(config, MultiTokenConfig):
        raise TypeError(f"config must be a MultiTokenConfig or None, got {config!r}")
    for name, value in config._asdict().items():
        if not common.is_int(value):
            raise TypeError(f"config.{name} must be an int, got {value!r}")
    if config.block_q < 1:
        raise ValueError(f"config.block_q={config.block_q} must be >= 1")
    if config.block_k < MIN_BLOCK or config.block_k & (config.block_k - 1):
        raise ValueError(f"config.block_k={config.block_k} must be a power of two >= {MIN_BLOCK}")
    if config.num_warps not in NUM_WARPS:
        raise ValueError(f"config.num_warps={config.num_warps} must be one of {NUM_WARPS}")
    if config.num_stages < 1:
        raise ValueError(f"config.num_stages={config.num_stages} must be >= 1")
    stages = max(1, min(config.num_stages, common.max_stages(config.block_k, head_dim, itemsize)))
    return MultiTokenConfig(*(int(x) for x in config._replace(num_stages=stages)))


# ----------------------------------------------------------------------------------------------- formats


def check_q8_pair(name: str, codes, scales) -> jax.ShapeDtypeStruct:
    """``codes`` int8 ``[..., D]`` and ``scales [..., D // 32]`` float16/float32 (``decode_q8.check_q8``); a
    stand-in of the values."""
    decode_q8.check_q8(name, codes, scales)
    return jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)


def check_fp8_pair(name: str, values, scales) -> jax.ShapeDtypeStruct:
    """``values`` float8_e4m3fn ``[..., D]`` and ``scales`` float32 ``[..., 1]``; a stand-in of the values."""
    if getattr(values, "dtype", None) != formats.FP8_DTYPE:
        raise TypeError(f"{name} values must be float8_e4m3fn, got {getattr(values, 'dtype', None)}")
    if getattr(scales, "dtype", None) != jnp.float32:
        raise TypeError(f"{name} scales must be float32, got {getattr(scales, 'dtype', None)}")
    if values.ndim == 0 or scales.shape != (*values.shape[:-1], 1):
        raise ValueError(
            f"{name}: values.shape={values.shape} and scales.shape={scales.shape} do not form an FP8 pair "
            f"(scales of shape values.shape[:-1] + (1,))"
        )
    return jax.ShapeDtypeStruct(values.shape, jnp.bfloat16)


def check_pairs(check, k, k_scale, v, v_scale):
    """Both pairs of a quantized cache through ``check``; they must agree in shape and scale dtype."""
    k_vals, v_vals = check("k", k, k_scale), check("v", v, v_scale)
    if v.shape != k.shape or v_scale.shape != k_scale.shape or v_scale.dtype != k_scale.dtype:
        raise ValueError(
            f"k and v must have the same shapes and scale dtype, got {k.shape}/{k_scale.shape}/{k_scale.dtype} "
            f"and {v.shape}/{v_scale.shape}/{v_scale.dtype}"
        )
    return k_vals, v_vals


# ----------------------------------------------------------------------------------------------- arguments


def _check_int_vector(name: str, x, batch: int):
    if getattr(x, "shape", None) != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be int[{batch}], got {getattr(x, 'dtype', None)}{getattr(x, 'shape', None)}")
    return common.concrete(x)


def _check_step(q_starts, lengths, counts, tokens: int, max_len: int, bound: str) -> None:
    """Concrete step values: counts >= 0, rows in ``[0, T]``, positions in ``[0, max_len]``, no shared rows."""
    if any(x is None for x in (q_starts, lengths, counts)):
        return
    if (counts < 0).any() or (lengths < 0).any() or (q_starts < 0).any():
        raise ValueError(f"counts={counts}, lengths={lengths} and q_starts={q_starts} must be >= 0")
    live = counts > 0
    ends = q_starts + counts
    if (ends[live] > tokens).any():
        raise ValueError(f"q_starts + counts = {ends} must be <= T={tokens} for every sequence with counts > 0")
    if (lengths + counts > max_len).any():
        raise ValueError(f"lengths + counts = {lengths + counts} must be <= {bound}")
    order = np.argsort(q_starts[live], kind="stable")
    starts, stops = q_starts[live][order], ends[live][order]
    if (starts[1:] < stops[:-1]).any():
        raise ValueError(f"sequences' query rows overlap: q_starts={q_starts}, counts={counts}")


def _check_tables(block_tables, batch, num_pages, page_size, lengths, counts, window) -> None:
    """Concrete tables: every entry a query may read names a page (entries before the first query's window
    start, and past the last query's position, may be anything)."""
    tshape = getattr(block_tables, "shape", None)
    if tshape is None or len(tshape) != 2 or tshape[0] != batch or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must be int[{batch}, M], got {getattr(block_tables, 'dtype', None)}{tshape}")
    tables = common.concrete(block_tables)
    if tables is None or lengths is None or counts is None:
        return
    first = np.zeros_like(lengths) if window is None else np.maximum(lengths - window + 1, 0)
    column = np.arange(tshape[1])[None, :]
    read = (counts[:, None] > 0) & (column >= first[:, None] // page_size)
    read &= column < -(-(lengths + counts)[:, None] // page_size)
    bad = read & ((tables < 0) | (tables >= num_pages))
    if bad.any():
        b0, m0 = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"block_tables[{b0}, {m0}]={int(tables[b0, m0])} must name a page in [0, {num_pages}): the queries "
            f"of sequence {b0} (lengths={int(lengths[b0])}, counts={int(counts[b0])}) read it"
        )


def check_args(q, k, v, q_starts, lengths, counts, *, layer=None, window=None, softcap=None, block_tables=None) -> Dims:
    """Validate a multi-token call's arguments (kernel and reference); return its :class:`Dims`.

    ``k``/``v``: a contiguous cache ``[B, K, S, D]`` / ``[L, B, K, S, D]``, or (with ``block_tables``) pools
    ``[P, K, page_size, D]`` / ``[L, P, K, page_size, D]`` (arrays, or stand-ins of a quantized cache's values).
    Concrete ``q_starts``, ``lengths``, ``counts``, tables and ``layer`` are range-checked; traced ones cannot be
    (the kernel clamps them in bounds).
    """
    paged = block_tables is not None
    what = "[P, K, page_size, D] or [L, P, K, page_size, D]" if paged else "[B, K, S, D] or [L, B, K, S, D]"
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must have shape [T, N, D], got {getattr(q, 'shape', None)}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating array, got dtype {q.dtype}")
    kshape, vshape = getattr(k, "shape", None), getattr(v, "shape", None)
    if kshape is None or len(kshape) not in (4, 5) or vshape != kshape:
        raise ValueError(f"k and v must both have shape {what}, got {kshape} and {vshape}")
    if len(kshape) == 5 and layer is None:
        raise ValueError(f"k.shape={kshape} holds every layer: pass layer=")
    if len(kshape) == 4 and layer is not None:
        raise ValueError(f"layer={layer!r} needs a cache with a leading layer axis, got k.shape={kshape}")
    if k.dtype != v.dtype or jnp.dtype(k.dtype) not in common.CACHE_DTYPES:
        raise TypeError(
            f"k and v must share a dtype among {[str(d) for d in common.CACHE_DTYPES]}, got {k.dtype}, {v.dtype}"
        )
    tokens, num_heads, head_dim = q.shape
    first, kv_heads, rows, dk = kshape[-4:]
    if dk != head_dim:
        raise ValueError(f"q.shape={q.shape} does not match k.shape={kshape} (head_dim must agree)")
    if num_heads % kv_heads:
        raise ValueError(f"num_q_heads={num_heads} must be a multiple of num_kv_heads={kv_heads}")
    if head_dim % MIN_BLOCK or not MIN_BLOCK <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} is not supported; expected a multiple of 16 in [16, {MAX_HEAD_DIM}]")
    common.check_window_softcap(window, softcap)
    batch = getattr(q_starts, "shape", (None,))[0] if paged else first
    if paged and (batch is None or getattr(q_starts, "ndim", None) != 1):
        raise ValueError(f"q_starts must be int[B], got {getattr(q_starts, 'shape', None)}")
    values = [
        _check_int_vector(n, x, batch) for n, x in (("q_starts", q_starts), ("lengths", lengths), ("counts", counts))
    ]
    if paged and rows & (rows - 1):
        raise ValueError(f"page_size={rows} must be a power of two")
    max_len = block_tables.shape[1] * rows if paged and getattr(block_tables, "ndim", 0) == 2 else rows
    bound = f"M * page_size = {max_len}" if paged else f"S={max_len}"
    if paged:
        _check_tables(block_tables, batch, first, rows, values[1], values[2], window)
    _check_step(*values, tokens, max_len, bound)
    if layer is not None:
        common.check_layer(layer, kshape[0])
    return Dims(tokens, num_heads, kv_heads, head_dim, batch, max_len)
