"""The ``"units"`` formulation of ``quantized_matmul``'s small-M kernel: register tiles of two dimensions only.

A K step of ``bk`` packed columns is walked as a static loop of **units**: the narrowest run of packed columns that
shares every per-group plane entry (Q8_0: 32, the 4-bit formats: 16, Q6_K: 8, its crumb bytes). A unit reads each
code plane as one 2-D window ``[bn, U]`` and each per-group plane as one column ``[bn]`` (a scalar index), so a
scale reaches its codes by ``expand_dims`` and a broadcast; there is no ``[R, W / g, g]`` reshape, no gather and no
3-D product. Row ``r`` of ``x`` multiplies every unit into one ``[bn, U]`` float32 accumulator (elementwise FMAs),
reduced over its ``U`` columns once, after the K loop, instead of a cross-lane reduction every step.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_formats import block_format

UNIT = {"Q8_0": 32, "Q4_0": 16, "Q4_1": 16, "Q4_K": 16, "Q6_K": 8}  # packed columns sharing every plane entry


def unit_width(fmt: str) -> int:
    block_format(fmt)  # names the known formats if fmt is not one
    return UNIT[fmt]


def _column(ref, cols, c0, group: int):
    """The entry of a per-group plane covering packed column ``c0`` for each of the ``cols`` rows: ``[bn]``."""
    return ref[cols, lax.div(c0, group)].astype(jnp.float32)


def dequantize_codes(fmt: str, codes, entry, crumbs=None) -> tuple:
    """The ``parts`` float32 tiles of a window of packed columns: ``codes`` the code plane's window, ``entry(i)``
    plane ``i``'s entries broadcast against it; Q6_K's ``crumbs()``: its crumb bytes (int32) and their shift (0 or
    2), each broadcast against the codes. Shared by the units and dot_expand paths (their reads differ)."""
    f32 = jnp.float32
    if fmt == "Q8_0":
        return (codes.astype(f32) * entry(1),)
    nibbles = codes.astype(jnp.int32)
    fours = (nibbles & 15, lax.shift_right_logical(nibbles, 4))
    if fmt == "Q4_0":
        return tuple((q.astype(f32) - 8.0) * entry(1) for q in fours)
    if fmt == "Q4_1":
        return tuple(q.astype(f32) * entry(1) + entry(2) for q in fours)
    if fmt == "Q4_K":
        scale, shift = entry(1) * entry(3), -(entry(2) * entry(4))
        return tuple(q.astype(f32) * scale + shift for q in fours)
    # Q6_K: a value is its nibble plus 16 times its crumb (2 bits), less 32 (the bytes are non-negative: the
    # arithmetic shift is the logical one)
    bits, half = crumbs()
    d = entry(4)
    return tuple(
        (four + 16 * ((bits >> (half + 4 * p)) & 3) - 32).astype(f32) * (entry(2 + p) * d)
        for p, four in enumerate(fours)
    )


def dequantize_unit(fmt: str, plane_refs, cols, c0) -> tuple:
    """The ``parts`` float32 tiles ``[bn, U]`` of the unit of packed columns ``c0 .. c0 + U - 1`` (``c0`` a
    multiple of ``U``), read from the planes' refs."""
    width = UNIT[fmt]
    groups = [p.group for p in block_format(fmt).planes]
    entry = lambda i: _column(plane_refs[i], cols, c0, groups[i])[:, None]  # [bn, 1], broadcast along the unit

    def crumbs():  # the unit's 8 crumb bytes serve columns 16 b + j and 16 b + 8 + j alike, shifted by 0 or 2 bits
        window = pl.ds(pl.multiple_of(lax.div(c0, 16) * 8, 8), width)
        return plane_refs[1][cols, window].astype(jnp.int32), 2 * lax.rem(lax.div(c0, 8), 2)

    return dequantize_codes(fmt, plane_refs[0][cols, pl.ds(c0, width)], entry, crumbs)


def units_step(fmt: str, x_ref, plane_refs, accs, *, rows0, cols, k0, block_k: int, block_m: int):
    """``accs`` (one ``[bn, U]`` float32 accumulator per row of the block) after the K step at packed column
    ``k0``: each unit dequantized once, multiplied into every row's accumulator."""
    width = UNIT[fmt]
    accs = list(accs)
    for u in range(block_k // width):
        c0 = pl.multiple_of(k0 + u * width, width)
        for p, w in enumerate(dequantize_unit(fmt, plane_refs, cols, c0)):
            for r in range(block_m):
                x = x_ref[p, rows0 + r, pl.ds(c0, width)].astype(jnp.float32)  # [U]
                accs[r] = accs[r] + w * x[None, :]
    return tuple(accs)


def units_finish(o_ref, accs, *, split, rows0, cols) -> None:
    """Each row's accumulator reduced over its unit's columns, stored to the float32 partials."""
    for r, acc in enumerate(accs):
        o_ref[split, rows0 + r, cols] = jnp.sum(acc, axis=1)
