"""Q6_K products on the int8 tensor cores: ``pallas_kernels.qmatmul_imma``'s form for GGUF's 6-bit K-quant.

A Q6_K value is ``d * sub * (q - 32)``, ``q`` six bits (four in the nibbles, two in the crumbs), one int8
sub-scale ``sub`` for each 16 values (``sub_scales_low`` the first 16 of a 32-block, ``_high`` the next) and one
``d`` a 256-value super-block. The activations are rounded to int8 per super-block as for Q4_K. A 32-block's codes
``q`` (0..63) are built four bytes at a time by PTX from its 16 nibble bytes and 8 crumb bytes, in *part order*:
position ``4c + 2p + a`` holds value ``16p + 8a + c`` (``c`` < 8), so each half-block ``p`` is one int8 K = 32
dot against an activation row holding its 16 values and zeros at the other half's positions. The two dots take
their sub-scales into one int32 sum a super-block (``|sum| <= 16 * 127 * 63 * 128 * 16 < 2**31``), converted
once and scaled by ``xs * d``. The ``- 32`` offset, ``-32 * d * sub * (xs * the half-block's code sum)``, is a
product over ``K / 16`` values that XLA computes beside the kernel. Exact integer arithmetic on the rounded
activations, as for Q4_K.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels.qmatmul_imma_launch import (
    SUPER,
    ImmaConfig,
    offsets,
    product,
    program_tile,
    round_super_blocks,
    scaled,
)

# q of four bytes from a nibble word ($1) and the crumb word ($2): the nibbles' low (or high) four bits, the crumbs'
# two bits at a shift, moved to bits 4-5 of each byte (masks keep every byte apart: no carries)
_Q_ASM = "{{ .reg .b32 n, c; {nib} and.b32 n, n, 0x0F0F0F0F; shr.b32 c, $2, {shift}; and.b32 c, c, 0x03030303; shl.b32 c, c, 4; or.b32 $0, n, c; }}"  # noqa: E501
_LOW, _HIGH = "mov.b32 n, $1;", "shr.b32 n, $1, 4;"


def codes(nib, crumbs, high: bool, shift: int, emulate: bool):
    """``q`` int8 ``[bn, 8]``: the low (or ``high``) nibbles of ``nib`` (uint8 ``[bn, 8]``) with the crumbs'
    two bits at ``shift`` above them."""
    if emulate:
        n, c = nib.astype(jnp.int32), crumbs.astype(jnp.int32)
        n = lax.shift_right_logical(n, 4) if high else n & 15
        return (n | ((lax.shift_right_logical(c, shift) & 3) << 4)).astype(jnp.int8)
    asm = _Q_ASM.format(nib=_HIGH if high else _LOW, shift=shift)
    (out,) = backend.triton_module().elementwise_inline_asm(
        asm,
        args=[lax.bitcast_convert_type(nib, jnp.int8), lax.bitcast_convert_type(crumbs, jnp.int8)],
        constraints="=r,r,r",
        pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(nib.shape, jnp.int8)],
    )
    return out


def part_order(codes_):
    """Int8 ``codes [M, K]`` as the kernel's dots take them, ``[M, 2K]``: for each 32-block two rows of 32 in part
    order (position ``4c + 2p + a`` holds value ``16p + 8a + c``), the first holding half-block 0's values and
    zeros at half-block 1's positions, the second the reverse."""
    m, k = codes_.shape
    part = jnp.transpose(codes_.reshape(m, k // 32, 2, 2, 8), (0, 1, 4, 2, 3))  # [M, blocks, c, p, a]
    keep = lambda p: jnp.where(lax.broadcasted_iota(jnp.int32, part.shape, 3) == p, part, 0)
    return jnp.stack([keep(0), keep(1)], axis=2).reshape(m, 2 * k)  # [M, blocks, row, c, p, a]


def round_activations(x):
    """``(codes, xs, half_sums)``: the codes in :func:`part_order` (``[M, 2K]`` int8), the super-blocks' scales
    ``[M, K / 256]``, and each 16-value half-block's code sum times its scale ``[M, K / 16]``."""
    m, k = x.shape
    rounded, xs = round_super_blocks(x)
    sums = rounded.astype(jnp.int32).reshape(m, k // SUPER, SUPER // 16, 16).sum(axis=-1) * xs[..., None]
    return part_order(rounded.reshape(m, k)), xs, sums.reshape(m, k // 16)


def _kernel(x_ref, xs_ref, nib_ref, crumb_ref, low_ref, high_ref, d_ref, o_ref, *, config, steps, emulate):
    bm, bn = config.block_m, config.block_n
    rows, cols, s = program_tile(config, x_ref.shape[0])
    pick = lax.broadcasted_iota(jnp.int32, (8, bn), 0)

    def body(step, acc):
        sb = s * steps + step
        subs = [ref[cols, pl.ds(pl.multiple_of(sb * 8, 8), 8)].astype(jnp.int32).T for ref in (low_ref, high_ref)]
        total = jnp.zeros((bm, bn), jnp.int32)
        for b in range(SUPER // 32):
            blk = sb * 8 + b
            crumbs = crumb_ref[cols, pl.ds(pl.multiple_of(blk * 8, 8), 8)]  # [bn, 8]
            nib = [nib_ref[cols, pl.ds(pl.multiple_of(blk * 16 + 8 * a, 8), 8)] for a in range(2)]
            # q of value 16p + 8a + c: nibble half p of packed column 8a + c, crumb bits at 2 * (2p + a)
            q = [[codes(nib[a], crumbs, p == 1, 2 * (2 * p + a), emulate) for p in range(2)] for a in range(2)]
            # stacks along the last axis only (Triton's join): [bn, c, p] per a, then [bn, c, p, a]
            w = jnp.stack([jnp.stack(q[0], axis=-1), jnp.stack(q[1], axis=-1)], axis=-1).reshape(bn, 32)
            for p in range(2):  # the half-blocks: one dot each, its own sub-scale
                at = pl.multiple_of((blk * 2 + p) * 32, 32)
                dot = lax.dot_general(
                    x_ref[rows, pl.ds(at, 32)], w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
                )
                total = total + dot * jnp.sum(jnp.where(pick == b, subs[p], 0), axis=0, keepdims=True)
        return scaled(acc, total, xs_ref, d_ref, rows, cols, sb, bn)

    o_ref[s, rows, cols] = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def imma_q6_k(x, planes, *, config: ImmaConfig, interpret: bool):
    """``x [M, K] @ W.T`` for a Q6_K matrix (checked by ``qmatmul_imma.qmatmul_imma``, which calls this)."""
    k = x.shape[1]
    nibbles, crumbs, low, high, d = planes
    n = nibbles.shape[0]
    codes_, xs, sums = round_activations(x)
    out = product(_kernel, codes_, xs, (nibbles, crumbs, low, high, d), n, k, config, interpret, "q6_k")
    # the -32 offset: sum over the half-blocks of (xs * code sum) * (32 * d * sub)
    subs = jnp.stack([low, high], axis=2).reshape(n, k // 16).astype(jnp.float32)  # [N, K/16], value order
    return out - offsets(sums, jnp.repeat(d.astype(jnp.float32), SUPER // 16, axis=1) * subs * 32.0)
