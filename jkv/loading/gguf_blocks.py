"""GGUF's quantized blocks repacked into the planes of ``pallas_kernels.block_formats`` (NumPy, at load).

A GGUF matrix of ``N`` rows by ``K`` values is ``uint8 [N, K / block * block_bytes]``: each row a run of blocks,
each block its scales then its packed values (the byte layouts are GGML's, read from the ``gguf`` package's
constants and llama.cpp's ``ggml-common.h`` definitions). ``repack`` splits the blocks into planes; Q4_K's nibbles
move (GGUF packs 64 values per 32 bytes there, the planes 32 per 16 bytes, as Q4_0), and Q6_K's 6-bit values are
regrouped into the planes' nibbles and crumbs.
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.block_formats import FORMATS, block_format, plane_shapes

BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q6_K": 210}


def _f16(raw: np.ndarray) -> np.ndarray:
    """``[..., 2]`` bytes as float16 ``[...]`` (little-endian, as GGUF stores them)."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float16)


def _q4k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of eight 6-bit sub-block scales and eight 6-bit mins ``[..., 12]`` -> two ``[..., 8]``.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 alike; scales and mins 4-7 keep their low
    4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in the top bits of bytes 0-7."""
    s = scales.astype(np.uint8)
    lo_sc, lo_m, rest = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_sc & 63, (rest & 15) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 63, (rest >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, mn


def repack(raw: np.ndarray, fmt: str, n: int, k: int) -> tuple[np.ndarray, ...]:
    """The planes of the ``N x K`` GGUF matrix ``raw`` (its ``uint8`` bytes, ``N`` rows) in format ``fmt``."""
    spec = block_format(fmt)
    nb = k // spec.block
    size = BLOCK_BYTES[fmt]
    raw = np.asarray(raw, np.uint8)
    if k % spec.block or raw.size != n * nb * size:
        raise ValueError(f"{fmt} data of {raw.size} bytes is not a {n} x {k} matrix ({nb} blocks of {size} bytes)")
    b = raw.reshape(n, nb, size)
    if fmt == "Q8_0":
        planes = (b[..., 2:].view(np.int8).reshape(n, k), _f16(b[..., 0:2]))
    elif fmt == "Q4_0":
        planes = (b[..., 2:].reshape(n, k // 2), _f16(b[..., 0:2]))
    elif fmt == "Q4_1":
        planes = (b[..., 4:].reshape(n, k // 2), _f16(b[..., 0:2]), _f16(b[..., 2:4]))
    elif fmt == "Q4_K":
        sc, mn = _q4k_scales(b[..., 4:16])
        qs = b[..., 16:].reshape(n, nb, 4, 1, 32)  # 4 chunks of 64 values: low nibbles 0-31, high 32-63
        values = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(n, nb, 8, 32)  # 8 sub-blocks of 32
        nibbles = (values[..., :16] | (values[..., 16:] << 4)).reshape(n, k // 2)
        planes = (nibbles, sc.reshape(n, nb * 8), mn.reshape(n, nb * 8), _f16(b[..., 0:2]), _f16(b[..., 2:4]))
    elif fmt == "Q6_K":
        ql = b[..., 0:128].reshape(n, nb, 2, 1, 64)  # two halves of 128 values
        qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
        low = np.concatenate([ql & 15, ql >> 4], axis=3).reshape(n, nb, 2, 4, 32)  # quarter t: values 32t..
        high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3
        values = (low | (high << 4)).reshape(n, k // 32, 32)  # 6-bit, in order
        nibbles = ((values[..., :16] & 15) | ((values[..., 16:] & 15) << 4)).reshape(n, k // 2)
        top = (values >> 4).reshape(n, k // 32, 4, 8)  # values 32b + 8t + j
        crumbs = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(n, k // 4)
        sub = b[..., 192:208].view(np.int8).reshape(n, k // 16)
        planes = (nibbles, crumbs, sub[:, 0::2], sub[:, 1::2], _f16(b[..., 208:210]))
    else:
        raise ValueError(f"weight format {fmt!r} is not one of {tuple(FORMATS)}")
    planes = tuple(np.ascontiguousarray(p) for p in planes)
    assert tuple(p.shape for p in planes) == plane_shapes(fmt, n, k)
    return planes
