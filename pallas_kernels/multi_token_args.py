"""Argument checks and the launch rule of the multi-token attention kernels (``pallas_kernels.multi_token``).

One check serves every (layout, format) kind and the kernels' references alike: the format checks
(``checks.check_q8_pair``, :func:`check_fp8_pair`, through ``checks.check_pairs``) reduce a quantized cache
to stand-ins of its values, then
:func:`check_args` checks shapes, dtypes, GQA, head_dim, the step's ``q_starts`` / ``lengths`` / ``counts`` (range
and overlap when concrete), the block table, ``layer``, ``window`` and ``softcap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import checks, common, formats
from pallas_kernels.checks import NUM_WARPS
from pallas_kernels.common import MIN_BLOCK

MAX_HEAD_DIM = 256  # the query tile and the accumulator of 128 rows x 256 columns fill a program's registers


def takes_head_dim(head_dim: int) -> bool:
    """Whether the multi-token kernels take ``head_dim``: a multiple of 16 up to :data:`MAX_HEAD_DIM` (K/V are
    read in power-of-two column chunks, so 48, 80 or 96 work)."""
    return head_dim % MIN_BLOCK == 0 and MIN_BLOCK <= head_dim <= MAX_HEAD_DIM


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
        if not checks.is_int(value):
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


# ----------------------------------------------------------------------------------------------- arguments


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


def _reads(lengths, counts, window):
    """Concrete positions ``[first, end)`` each sequence's queries read (none without queries), and who reads."""
    if lengths is None or counts is None:
        return ()
    first = np.zeros_like(lengths) if window is None else np.maximum(lengths - window + 1, 0)
    end = np.where(counts > 0, lengths + counts, 0)
    why = lambda b0: (
        f"the queries of sequence {b0} (lengths={int(lengths[b0])}, counts={int(counts[b0])}) read it"
    )  # fmt: skip
    return first, end, why


def check_args(q, k, v, q_starts, lengths, counts, *, layer=None, window=None, softcap=None, block_tables=None) -> Dims:
    """Validate a multi-token call's arguments (kernel and reference); return its :class:`Dims`.

    ``k``/``v``: a contiguous cache ``[B, K, S, D]`` / ``[L, B, K, S, D]``, or (with ``block_tables``) pools
    ``[P, K, page_size, D]`` / ``[L, P, K, page_size, D]`` (arrays, or stand-ins of a quantized cache's values).
    Concrete ``q_starts``, ``lengths``, ``counts``, tables and ``layer`` are range-checked; traced ones cannot be
    (the kernel clamps them in bounds).
    """
    paged = block_tables is not None
    axes = "[P, K, page_size, D]" if paged else "[B, K, S, D]"
    needs = "needs a cache with a leading layer axis"
    (tokens, num_heads, head_dim), (first, kv_heads, rows, _) = checks.check_kv(
        q, k, v, layer, q_axes="[T, N, D]", axes=axes, layer_needs=needs
    )
    if not takes_head_dim(head_dim):
        raise ValueError(f"head_dim={head_dim} is not supported; expected a multiple of 16 in [16, {MAX_HEAD_DIM}]")
    checks.check_window_softcap(window, softcap)
    batch = getattr(q_starts, "shape", (None,))[0] if paged else first
    if paged and (batch is None or getattr(q_starts, "ndim", None) != 1):
        raise ValueError(f"q_starts must be int[B], got {getattr(q_starts, 'shape', None)}")
    step = (("q_starts", q_starts), ("lengths", lengths), ("counts", counts))
    values = [checks.check_int_vector(name, x, batch) for name, x in step]
    if paged and rows & (rows - 1):
        raise ValueError(f"page_size={rows} must be a power of two")
    max_len = block_tables.shape[1] * rows if paged and getattr(block_tables, "ndim", 0) == 2 else rows
    bound = f"M * page_size = {max_len}" if paged else f"S={max_len}"
    if paged:
        checks.check_block_tables(block_tables, batch, first, rows, *_reads(values[1], values[2], window))
    _check_step(*values, tokens, max_len, bound)
    return Dims(tokens, num_heads, kv_heads, head_dim, batch, max_len)
