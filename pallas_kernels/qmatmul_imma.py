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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, qmatmul_imma_q6k
from pallas_kernels.block_formats import check_planes
from pallas_kernels.qmatmul_imma_launch import (  # noqa: F401  (the launch's names: callers take them from here)
    SUPER,
    ImmaConfig,
    block_n_for,
    check_config,
    imma_config,
    offsets,
    product,
    program_tile,
    round_super_blocks,
    scaled,
)

FORMATS = ("Q4_K", "Q6_K")


def pair_order(x):
    """``x [M, K]`` with each 32-block's values reordered as the kernel's weight tiles hold them: position
    ``2c + h`` holds value ``16h + c`` (the low nibble of packed column ``c`` beside its high one)."""
    m, k = x.shape
    return jnp.swapaxes(x.reshape(m, k // 32, 2, 16), 2, 3).reshape(m, k)


def round_activations(x):
    """``x [M, K]`` as the kernel takes it: ``(codes, xs, block_sums)``: int8 codes ``[M, K]`` in
    :func:`pair_order`, rounded per super-block (:func:`round_super_blocks`), and each 32-block's code sum times
    its scale ``[M, K / 32]`` (float32: what the sub-mins multiply)."""
    m, k = x.shape
    codes, xs = round_super_blocks(x)
    sums = codes.astype(jnp.int32).reshape(m, k // SUPER, SUPER // 32, 32).sum(axis=-1) * xs[..., None]
    return pair_order(codes.reshape(m, k)), xs, sums.reshape(m, k // 32)


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
    rows, cols, s = program_tile(config, x_ref.shape[0])
    pick = lax.broadcasted_iota(jnp.int32, (8, bn), 0)

    def body(step, acc):
        sb = s * steps + step  # the super-block
        # its eight sub-scales in one load, [8, bn]; block b's row picked by a masked sum (no per-block byte loads)
        subs = sub_ref[cols, pl.ds(pl.multiple_of(sb * 8, 8), 8)].astype(jnp.int32).T
        total = jnp.zeros((bm, bn), jnp.int32)
        for b in range(SUPER // 32):  # its eight 32-blocks
            blk = sb * 8 + b
            low, high = nibbles(nib_ref[cols, pl.ds(pl.multiple_of(blk * 16, 16), 16)], emulate)  # [bn, 16] each
            w = jnp.stack([low, high], axis=-1).reshape(bn, 32)  # position 2c + h: value 16h + c
            x = x_ref[rows, pl.ds(pl.multiple_of(blk * 32, 32), 32)]  # [bm, 32] int8, pair order
            dot = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
            scale = jnp.sum(jnp.where(pick == b, subs, 0), axis=0, keepdims=True)  # [1, bn]
            total = total + dot * scale
        return scaled(acc, total, xs_ref, d_ref, rows, cols, sb, bn)

    o_ref[s, rows, cols] = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _imma(x, planes, *, config: ImmaConfig, interpret: bool):
    k = x.shape[1]
    nibbles, sub_scales, sub_mins, d, dmin = planes
    n = nibbles.shape[0]
    codes, xs, sums = round_activations(x)
    out = product(_kernel, codes, xs, (nibbles, sub_scales, d), n, k, config, interpret, "q4_k")
    # the sub-mins' term: sum over the 32-blocks of (xs * code sum) * (-dmin * sub_min)
    return out - offsets(sums, jnp.repeat(dmin.astype(jnp.float32), 8, axis=1) * sub_mins.astype(jnp.float32))


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
        return qmatmul_imma_q6k.imma_q6_k(x, planes, config=config, interpret=interpret)
    return _imma(x, planes, config=config, interpret=interpret)
