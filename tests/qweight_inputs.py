"""Random block-quantized matrices (planes of ``pallas_kernels.block_formats``) and their float64 values, written
from the formats' definitions element by element (not through ``block_formats.dequantize_tile``)."""

import numpy as np

from pallas_kernels.block_formats import FORMATS, plane_shapes


def random_planes(rng, fmt: str, n: int, k: int) -> tuple[np.ndarray, ...]:
    """Fresh random planes: every code, nibble and crumb value, 6-bit sub-scales/mins, scales and mins of both signs."""
    out = []
    for shape, plane in zip(plane_shapes(fmt, n, k), FORMATS[fmt].planes, strict=True):
        if plane.dtype == np.float16:
            out.append((rng.standard_normal(shape) * 0.1).astype(np.float16))
        elif plane.dtype == np.int8:
            out.append(rng.integers(-128, 128, shape).astype(np.int8))
        else:
            out.append(rng.integers(0, 64 if plane.name.startswith("sub") else 256, shape).astype(np.uint8))
    return tuple(out)


def dequantize_f64(planes, fmt: str) -> np.ndarray:
    """The ``[N, K]`` float64 matrix of ``planes``."""
    p = [np.asarray(x) for x in planes]
    n = p[0].shape[0]
    f = lambda x: x.astype(np.float64)
    rep = lambda x, r: np.repeat(f(x), r, axis=1)
    if fmt == "Q8_0":
        return f(p[0]) * rep(p[1], 32)
    k = p[0].shape[1] * 2
    values = np.empty((n, k))
    cols = np.arange(k // 2)
    values[:, 32 * (cols // 16) + cols % 16] = p[0] & 15  # low nibble of packed column 16 b + j: value 32 b + j
    values[:, 32 * (cols // 16) + 16 + cols % 16] = p[0] >> 4
    if fmt == "Q4_0":
        return (values - 8) * rep(p[1], 32)
    if fmt == "Q4_1":
        return values * rep(p[1], 32) + rep(p[2], 32)
    if fmt == "Q6_K":
        crumbs = p[1].astype(np.int64)
        for t in range(4):  # crumb byte 8 b + j, bits 2t: value 32 b + 8 t + j
            e = 32 * (np.arange(k // 4) // 8) + 8 * t + np.arange(k // 4) % 8
            values[:, e] += 16 * ((crumbs >> (2 * t)) & 3)
        sub = np.empty((n, k // 16))
        sub[:, 0::2], sub[:, 1::2] = p[2], p[3]
        return (values - 32) * np.repeat(sub, 16, axis=1) * rep(p[4], 256)
    sc, mn, d, dmin = rep(p[1], 32), rep(p[2], 32), rep(p[3], 256), rep(p[4], 256)  # Q4_K
    return values * d * sc - dmin * mn


def planes_like(fmt: str, n: int, k: int, make) -> tuple:
    """``make(shape, dtype)`` for each plane of an ``N x K`` ``fmt`` matrix (zeros, ShapeDtypeStructs...)."""
    return tuple(make(s, p.dtype) for s, p in zip(plane_shapes(fmt, n, k), FORMATS[fmt].planes, strict=True))
