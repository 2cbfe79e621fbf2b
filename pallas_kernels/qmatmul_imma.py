"""K-quant products on the int8 tensor cores, the super-block's sub-blocks summed as integers (Q4_K here; Q6_K in
``pallas_kernels.qmatmul_imma_q6k``).

The dot path (``quantized_matmul``) dequantizes every weight to the activations' dtype before the tensor cores:
at 17-127 rows its Q4_K products spend more on that than on their bytes (docs/BENCHMARKS.md, "The row layout's dot
kernel at 64 rows"). Here the activations are rounded to int8 once per call, one float32 scale per 256-value
super-block (``xs = max|x| / 127``, as GGUF's q8_K blocks), and the weights' nibbles go to the tensor cores as
they are. A super-block's eight 32-blocks each give an int32 product ``[bm, bn]`` (one K = 32 integer dot: the
block's low nibbles beside its high ones, the activations laid out to match by :func:`round_activations`), which
its 6-bit sub-scale multiplies into one int32 sum; that sum is converted once and scaled by ``xs * d``. The
sub-mins' term, ``-dmin * sum_j sub_min_j * (xs * sum of block j's codes)``, is a product over ``K / 32`` values
that XLA computes beside the kernel (:func:`qmatmul_imma`). The nibbles are split four bytes at a time by PTX
(:func:`nibbles`; Triton's int8 ops work byte by byte). Exact integer arithmetic on the rounded activations,
so the result is not ``qmatmul_reference``'s: each activation moves by at most half its super-block's step.

Bounds: ``|code| <= 127``, a nibble <= 15 and 32 of them a block give ``|dot| <= 60,960``; times a sub-scale
(<= 63) and eight blocks, ``<= 30.7e6 < 2**31``: no int32 overflow.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, common
from pallas_kernels.block_formats import check_planes

FORMATS = ("Q4_K", "Q6_K")
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


def pair_order(x):
    """``x [M, K]`` with each 32-block's values reordered as the kernel's weight tiles hold them: position
    ``2c + h`` holds value ``16h + c`` (the low nibble of packed column ``c`` beside its high one)."""
    m, k = x.shape
    return jnp.swapaxes(x.reshape(m, k // 32, 2, 16), 2, 3).reshape(m, k)


def round_super_blocks(x):
    """``x [M, K]`` rounded to nearest (halves up) with one scale a 256-value super-block: ``(codes, xs)``, codes
    float32 ``[M, K / 256, 256]`` (integers in [-127, 127]) and ``xs [M, K / 256]`` (``max|x| / 127``; 0 for a
    zero super-block)."""
    m, k = x.shape
    x = x.astype(jnp.float32).reshape(m, k // SUPER, SUPER)
    peak = jnp.max(jnp.abs(x), axis=-1)
    inv = jnp.where(peak > 0, 127.0 / jnp.where(peak > 0, peak, 1.0), 0.0)
    return jnp.clip(jnp.floor(x * inv[..., None] + 0.5), -127.0, 127.0), peak * (1.0 / 127.0)


def round_activations(x):
    """``x [M, K]`` as the kernel takes it: ``(codes, xs, block_sums)``: int8 codes ``[M, K]`` in
    :func:`pair_order`, rounded per super-block (:func:`round_super_blocks`), and each 32-block's code sum times
    its scale ``[M, K / 32]`` (float32: what the sub-mins multiply)."""
    m, k = x.shape
    codes, xs = round_super_blocks(x)
    sums = codes.reshape(m, k // SUPER, SUPER // 32, 32).sum(axis=-1) * xs[..., None]
    codes = pair_order(codes.reshape(m, k).astype(jnp.int8))
    return codes, xs, sums.reshape(m, k // 32)


LOW_ASM = "and.b32 $0, $1, 0x0F0F0F0F;"  # four bytes' low nibbles at once
HIGH_ASM = "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }"


def nibbles(packed, emulate: bool):
    """The low and high nibbles of a uint8 tile, as int8 tiles of its shape: in four-byte words by PTX (the bytes
    as loaded, no per-byte work), by shifts in interpret mode."""
    if emulate:
        wide = packed.astype(jnp.int32)
        return (wide & 15).astype(jnp.int8), lax.shift_right_logical(wide, 4).astype(jnp.int8)
    as_int8 = lax.bitcast_convert_type(packed, jnp.int8)
    asm = lambda code: backend.triton_module().elementwise_inline_asm(
        code,
        args=[as_int8],
        constraints="=r,r",
        pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, jnp.int8)],
    )[0]
    return asm(LOW_ASM), asm(HIGH_ASM)


def _kernel(x_ref, xs_ref, nib_ref, sub_ref, d_ref, o_ref, *, config: ImmaConfig, steps: int, emulate: bool):
    bm, bn = config.block_m, config.block_n
    m_total = x_ref.shape[0]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row0 = jnp.minimum(i * bm, m_total - bm)
    rows, cols = pl.ds(row0, bm), pl.ds(pl.multiple_of(j * bn, bn), bn)

    def body(step, acc):
        sb = s * steps + step  # the super-block
        # its eight sub-scales in one load, [8, bn]; block b's row picked by a masked sum (no per-block byte loads)
        subs = sub_ref[cols, pl.ds(pl.multiple_of(sb * 8, 8), 8)].astype(jnp.int32).T
        pick = lax.broadcasted_iota(jnp.int32, (8, bn), 0)
        total = jnp.zeros((bm, bn), jnp.int32)
        for b in range(SUPER // 32):  # its eight 32-blocks
            blk = sb * 8 + b
            low, high = nibbles(nib_ref[cols, pl.ds(pl.multiple_of(blk * 16, 16), 16)], emulate)  # [bn, 16] each
            w = jnp.stack([low, high], axis=-1).reshape(bn, 32)  # position 2c + h: value 16h + c
            x = x_ref[rows, pl.ds(pl.multiple_of(blk * 32, 32), 32)]  # [bm, 32] int8, pair order
            dot = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
            scale = jnp.sum(jnp.where(pick == b, subs, 0), axis=0, keepdims=True)  # [1, bn]
            total = total + dot * scale
        xs = xs_ref[rows, pl.ds(sb, 1)]  # [bm, 1]
        d = d_ref[cols, pl.ds(sb, 1)].astype(jnp.float32).reshape(1, bn)
        return acc + total.astype(jnp.float32) * (xs * d)

    o_ref[s, rows, cols] = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))


def launch(kernel, inputs, n: int, rows: int, config: ImmaConfig, interpret: bool, name: str):
    """The kernel over its grid (row blocks, column blocks, K splits), the splits' partials summed: ``[rows, n]``."""
    out = common.whole_call(
        kernel,
        inputs,
        jax.ShapeDtypeStruct((config.num_splits, rows, n), jnp.float32),
        grid=(pl.cdiv(rows, config.block_m), n // config.block_n, config.num_splits),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        interpret=interpret,
        name=f"jkv_qmatmul_imma_{name}",
    )
    return out.sum(axis=0) if config.num_splits > 1 else out[0]


def pad_rows(a, rows: int):
    """``a`` with zero rows appended up to ``rows``."""
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, 0))) if rows > a.shape[0] else a


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _imma(x, planes, *, config: ImmaConfig, interpret: bool):
    m, k = x.shape
    nibbles, sub_scales, sub_mins, d, dmin = planes
    n = nibbles.shape[0]
    codes, xs, sums = round_activations(x)
    rows = max(m, config.block_m)
    pad = functools.partial(pad_rows, rows=rows)
    kernel = functools.partial(_kernel, config=config, steps=k // SUPER // config.num_splits, emulate=interpret)
    product = launch(kernel, [pad(codes), pad(xs), nibbles, sub_scales, d], n, rows, config, interpret, "q4_k")[:m]
    # the sub-mins' term: sum over the 32-blocks of (xs * code sum) * (-dmin * sub_min)
    mins = jnp.repeat(dmin.astype(jnp.float32), 8, axis=1) * sub_mins.astype(jnp.float32)  # [N, K/32]
    offsets = lax.dot_general(sums, mins, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)
    return product - offsets


def qmatmul_imma(x, planes, fmt: str = "Q4_K", *, config: ImmaConfig | None = None, interpret: bool | None = None):
    """``x [M, K] @ W.T -> [M, N]`` (float32) for a Q4_K or Q6_K matrix ``planes`` (``block_formats``' row
    layout), on the int8 tensor cores with the activations rounded per super-block (see the module docstring;
    Q6_K: ``pallas_kernels.qmatmul_imma_q6k``)."""
    if fmt not in FORMATS:
        raise ValueError(f"the int8 tensor-core product takes {FORMATS}, not {fmt!r}")
    planes = tuple(planes)
    n, k = check_planes(fmt, planes)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}] for this matrix, got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point, got {x.dtype}")
    m = x.shape[0]
    if m == 0:
        return jnp.zeros((0, n), jnp.float32)
    config = check_config(imma_config(m, n, k) if config is None else ImmaConfig(*config), n, k)
    interpret = backend.resolve_interpret(interpret)
    if fmt == "Q6_K":
        from pallas_kernels.qmatmul_imma_q6k import imma_q6_k

        return imma_q6_k(x, planes, config=config, interpret=interpret)
    return _imma(x, planes, config=config, interpret=interpret)
