"""What the int8 tensor-core products (``qmatmul_imma`` for Q4_K, ``qmatmul_imma_q6k`` for Q6_K) share: their
launch parameters and rule, the activations' rounding per 256-value super-block, the launch over the grid, and
the pieces of a kernel body both take."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, common, int_codes
from pallas_kernels.quantized_matmul import common_pad_rows

SUPER = 256  # values a super-block holds (its d, dmin and eight sub-blocks)
MIN_BLOCK_N = 16  # the narrowest column block of a tensor-core tile


class ImmaConfig(NamedTuple):
    block_m: int  # rows a program (a power of two, at least 16)
    block_n: int  # output columns a program (a power of two dividing N)
    num_splits: int  # programs sharing one output block's super-blocks (dividing them)
    num_warps: int
    num_stages: int


def imma_config(m: int, n: int, k: int) -> ImmaConfig:
    """The launch for ``x [m, k]`` times an ``n x k`` K-quant matrix: column blocks of up to 64 (:func:`block_n_for`),
    rows rounded up to a power of two (16 to 128), K split so that about two programs a multiprocessor run (an
    estimate, not yet measured)."""
    bm = min(128, max(common.MIN_BLOCK, common.pow2_ceil(m)))
    bn = block_n_for(n)
    if bn is None:
        raise ValueError(f"the int8 tensor-core product takes N a multiple of {MIN_BLOCK_N}, got N={n}")
    blocks = pl.cdiv(m, bm) * (n // bn)
    supers = k // SUPER
    want = max(1, -(-2 * backend.num_multiprocessors() // blocks))
    splits = min(d for d in range(min(want, supers), supers + 1) if supers % d == 0)
    return ImmaConfig(bm, bn, splits, 4 if bm <= 64 else 8, 2)


def block_n_for(n: int) -> int | None:
    """The widest column block (at most 64, a power of two) that tiles ``n`` columns; None below ``MIN_BLOCK_N``."""
    bn = 64
    while n % bn:
        bn //= 2
    return bn if bn >= MIN_BLOCK_N else None


def check_config(config: ImmaConfig, n: int, k: int) -> ImmaConfig:
    """``config`` if it launches on an ``n x k`` matrix (blocks tile N, splits divide the super-blocks, the row
    block a power of two of at least 16), else ValueError naming what does not fit."""
    pow2 = lambda v: v > 0 and v & (v - 1) == 0
    if not (pow2(config.block_m) and config.block_m >= common.MIN_BLOCK and pow2(config.block_n)):
        raise ValueError(f"{config}: block_m must be a power of two >= {common.MIN_BLOCK}, block_n a power of two")
    if n % config.block_n or config.num_splits < 1 or (k // SUPER) % config.num_splits:
        raise ValueError(f"{config} does not tile N={n} by block_n or K / {SUPER}={k // SUPER} by num_splits")
    return config


def round_super_blocks(x):
    """``x [M, K]`` rounded to int8 with one scale a 256-value super-block, by the rule of the dp4a path's
    activations (``int_codes.round_rows``): ``(codes, xs)``, codes int8 ``[M, K / 256, 256]`` and
    ``xs [M, K / 256]`` (``max|x| / 127``; 0 for a zero super-block)."""
    m, k = x.shape
    return int_codes.round_rows(x.astype(jnp.float32).reshape(m, k // SUPER, SUPER))


def product(kernel, codes, xs, planes, n: int, k: int, config: ImmaConfig, interpret: bool, name: str):
    """A kernel's ``[M, N]`` product over its grid (row blocks, column blocks, K splits; the splits' partials
    summed): the activations' ``codes`` and scales ``xs`` padded to a row block, then the weight ``planes``;
    ``kernel`` takes ``config``, ``steps`` (super-blocks a split) and ``emulate``."""
    m = codes.shape[0]
    rows = max(m, config.block_m)
    out = common.whole_call(
        functools.partial(kernel, config=config, steps=k // SUPER // config.num_splits, emulate=interpret),
        [common_pad_rows(codes, rows), common_pad_rows(xs, rows), *planes],
        jax.ShapeDtypeStruct((config.num_splits, rows, n), jnp.float32),
        grid=(pl.cdiv(rows, config.block_m), n // config.block_n, config.num_splits),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        interpret=interpret,
        name=f"jkv_qmatmul_imma_{name}",
    )
    return (out.sum(axis=0) if config.num_splits > 1 else out[0])[:m]


def offsets(sums, entries):
    """``sums [M, G] @ entries [N, G].T`` in float32 at full precision: a format's offset term over ``G`` groups."""
    return lax.dot_general(sums, entries, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)


def scaled(acc, total, xs_ref, d_ref, rows, cols, sb, bn: int):
    """``acc`` plus a super-block ``sb``'s int32 ``total`` converted once and scaled by ``xs * d``."""
    xs = xs_ref[rows, pl.ds(sb, 1)]  # [bm, 1]
    d = d_ref[cols, pl.ds(sb, 1)].astype(jnp.float32).reshape(1, bn)
    return acc + total.astype(jnp.float32) * (xs * d)


def program_tile(config: ImmaConfig, total_rows: int):
    """This program's ``(rows, cols, split)``: its row block (the last one slides back to end at the rows) and
    column block as ``pl.ds``, and its K split."""
    bm, bn = config.block_m, config.block_n
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    return pl.ds(jnp.minimum(i * bm, total_rows - bm), bm), pl.ds(pl.multiple_of(j * bn, bn), bn), s
