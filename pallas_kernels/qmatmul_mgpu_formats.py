"""What the Mosaic GPU quantized matmul (``pallas_kernels.qmatmul_mgpu_kernel``) knows of each block format: the
windows of its planes a K step brings into shared memory, and the dequantization of one step's windows in
registers into the ``parts`` 16-bit tiles the MMA reads.

A step covers ``BLOCK_K`` packed columns (``block_formats``' layout: a nibble format's part ``p`` holds the first or
second 16 values of each 32-block). Every window row is at least 16 bytes (TMA's narrowest box row), which
fixes the step and, through the planes' row strides, the multiple of ``K`` a format takes. Codes and nibbles are
tiled by 32 bytes; the dequantized tiles and the activations by the format's narrowest scale group, so each group
is one tile column, loaded, scaled and stored as a static ``[BLOCK_N, group]`` slice (no reshape). A group's scale
of every row is taken out of its window by a masked row sum and broadcast along the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend

BLOCK_N = 64  # weight rows per program: a warpgroup MMA's rows
BLOCK_K = 256  # packed columns per step
CODE_TILE = 32  # code and nibble bytes per tile column


class Window(NamedTuple):
    """One plane's window of a step: ``[BLOCK_N, cols]`` from plane column ``k0 // per`` (packed column ``k0``),
    rounded down to a multiple of ``cols`` where ``aligned`` (a window then serves several steps)."""

    cols: int
    per: int  # packed columns per plane column
    tiled: bool  # codes or nibbles: tiled by CODE_TILE bytes
    aligned: bool = False

    def start(self, k0):
        col = lax.div(k0, jnp.int32(self.per))
        return pl.multiple_of(lax.div(col, jnp.int32(self.cols)) * self.cols, self.cols) if self.aligned else col


class MgpuFormat(NamedTuple):
    parts: int  # dequantized tiles per step (the activations' parts)
    group: int  # packed columns per scale group: the tiles' column width
    windows: tuple[Window, ...]  # one per plane, in the planes' order
    k_multiple: int  # K must be a multiple: whole steps, 16-byte plane rows
    dequantize: Callable[..., None]  # (windows, tiles, dtype, k0): one step's windows into the tiles


def tile_transforms(dtype, cols: int):
    """Shared-memory transforms: 8 x ``cols`` tiles, swizzled over their row's bytes."""
    plgpu = backend.mosaic_gpu_module()
    return plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(cols * jnp.dtype(dtype).itemsize)


def _load_window(window, dtype=jnp.float32):
    """A ``[BLOCK_N, c]`` scale window in the MMA register layout, as ``dtype``."""
    plgpu = backend.mosaic_gpu_module()
    return plgpu.load(window, (), layout=plgpu.Layout.WGMMA, optimized=False).astype(dtype)


def _row_picker(values):
    """``pick(j)``: column ``j`` (static or traced) of ``values [BLOCK_N, c]`` (MMA layout) as a row vector."""
    plgpu = backend.mosaic_gpu_module()
    col = plgpu.broadcasted_iota(jnp.int32, values.shape, 1, layout=plgpu.Layout.WGMMA)
    return lambda j: jnp.where(col == j, values, jnp.zeros((), values.dtype)).sum(axis=1)  # [BLOCK_N]


def _broadcast(row, cols: int):
    """A ``[BLOCK_N]`` row vector along ``cols`` columns, in the 8-bit MMA layout the codes load in."""
    plgpu = backend.mosaic_gpu_module()
    return plgpu.layout_cast(lax.broadcast_in_dim(row, (BLOCK_N, cols), [0]), plgpu.Layout.WGMMA_8BIT)


def _load_codes(codes, tile: int):
    """Tile column ``tile`` (``CODE_TILE`` bytes) of a code or nibble window, in the 8-bit MMA layout."""
    plgpu = backend.mosaic_gpu_module()
    cols = (slice(None), pl.ds(tile * CODE_TILE, CODE_TILE))
    return plgpu.load(codes, cols, layout=plgpu.Layout.WGMMA_8BIT)


def _dequantize_q8_0(windows, tiles, dtype, k0) -> None:
    """``code * scale`` (float32), one 32-column group at a time."""
    del k0  # the scale window is the step's own
    codes, scales = windows
    (tile,) = tiles
    scale = _row_picker(_load_window(scales))
    for g in range(BLOCK_K // 32):
        q = _load_codes(codes, g).astype(jnp.float32)
        tile[:, pl.ds(g * 32, 32)] = (q * _broadcast(scale(g), 32)).astype(dtype)


def _dequantize_q4_k(windows, tiles, dtype, k0) -> None:
    """``nibble * (d * sub_scale) - dmin * sub_min`` (float32) for both parts, one 16-column group at a time;
    ``d`` and ``dmin`` windows hold 8 superblocks from the multiple of 8 at or below the step's first."""
    nibbles, sub_scales, sub_mins, d, dmin = windows
    # a group's 6-bit sub-scale and sub-min taken out together: one masked row sum of sub_scale + 64 * sub_min
    packed = _load_window(sub_scales, jnp.int32) | (_load_window(sub_mins, jnp.int32) << 6)
    sub = _row_picker(packed)
    d_of, dmin_of = _row_picker(_load_window(d)), _row_picker(_load_window(dmin))
    first = lax.rem(lax.div(k0, jnp.int32(128)), jnp.int32(8))  # the step's first superblock in the d window
    supers = BLOCK_K // 128
    d_rows = [d_of(first + h) for h in range(supers)]
    dmin_rows = [dmin_of(first + h) for h in range(supers)]
    for c in range(BLOCK_K // CODE_TILE):
        q = _load_codes(nibbles, c)  # [BLOCK_N, 32] uint8: two groups
        for half in range(CODE_TILE // 16):
            g = c * (CODE_TILE // 16) + half
            h = g // (128 // 16)
            both = sub(g)
            scale = d_rows[h] * (both & 63).astype(jnp.float32)
            shift = _broadcast(dmin_rows[h] * lax.shift_right_logical(both, 6).astype(jnp.float32), 16)
            qg = q[:, half * 16 : (half + 1) * 16]
            cols = pl.ds(g * 16, 16)
            # 8-bit values take bitwise operations only: the high nibble stays 16x, its scale takes the 1/16 (exact)
            low, high16 = (qg & 15).astype(jnp.float32), (qg & 240).astype(jnp.float32)
            tiles[0][:, cols] = (low * _broadcast(scale, 16) - shift).astype(dtype)
            tiles[1][:, cols] = (high16 * _broadcast(scale * 0.0625, 16) - shift).astype(dtype)


FORMATS = {
    "Q8_0": MgpuFormat(1, 32, (Window(BLOCK_K, 1, True), Window(BLOCK_K // 32, 32, False)), 256, _dequantize_q8_0),
    "Q4_K": MgpuFormat(
        2,
        16,
        (
            Window(BLOCK_K, 1, True),
            Window(BLOCK_K // 16, 16, False),
            Window(BLOCK_K // 16, 16, False),
            Window(8, 128, False, aligned=True),
            Window(8, 128, False, aligned=True),
        ),
        2048,  # d and dmin rows of K / 256 f16 entries: 16-byte multiples (TMA's row stride)
        _dequantize_q4_k,
    ),
}
