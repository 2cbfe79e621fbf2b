"""The ``"dot_expand"`` tile of ``quantized_matmul``: a ``[bn, bk]`` weight tile dequantized with 2-D tensors only.

Each per-group plane is read already expanded to the tile's shape: the pointer of element ``(r, c)`` is its
row's entry for packed column ``k0 + c`` (``(k0 + c) // group``), so neighbouring columns read the same address
and the scale meets its codes elementwise, with no ``[R, W / g, g]`` reshape (whose layouts Triton converts through
shared memory) and no broadcast along a third axis. Q6_K's crumbs are read the same way, byte ``8 b + c % 8`` of
packed column ``16 b + c % 16``, shifted by ``2 * (c % 16 // 8)`` bits.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.block_formats import block_format
from pallas_kernels.qmatmul_units import dequantize_codes


def expanded_tiles(fmt: str, plane_refs, n0, bn: int, k0, bk: int) -> tuple:
    """The ``parts`` float32 tiles ``[bn, bk]`` of rows ``n0 ..`` and packed columns ``k0 ..`` (``k0`` a multiple
    of the format's widest group)."""
    f32 = jnp.float32
    rows = (n0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0)) + jnp.zeros((1, bk), jnp.int32)  # [bn, bk]
    col = lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # packed column within the tile
    at = lambda ref, idx: ref[rows, idx + jnp.zeros((bn, 1), jnp.int32)]  # a [bn, bk] gather of one plane
    groups = [p.group for p in block_format(fmt).planes]
    c = k0 + col
    entry = lambda i: at(plane_refs[i], lax.div(c, groups[i])).astype(f32)

    def crumbs():  # Q6_K: byte 8 b + c % 8 of packed column 16 b + c % 16, shifted by 2 * (c % 16 // 8) bits
        return at(plane_refs[1], lax.div(c, 16) * 8 + lax.rem(c, 8)).astype(jnp.int32), 2 * lax.div(lax.rem(c, 16), 8)

    return dequantize_codes(fmt, at(plane_refs[0], c), entry, crumbs)
