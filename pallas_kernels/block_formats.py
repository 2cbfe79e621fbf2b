"""GGUF block formats of weight matrices as GPU-friendly planes: the layout, its checks and its dequantization.

A quantized matrix multiplies activations ``x [M, K]`` into ``[M, N]``; it is held as ``N`` rows (output
features) of ``K`` reduction values, quantized in blocks along ``K`` as in a GGUF file, and repacked at load from
GGUF's array of interleaved blocks into separate planes (structure of arrays), each ``[N, ...]`` with ``K`` along
its last axis, so a kernel tile of ``bn`` rows by ``bk`` packed columns reads each plane as one 2-D window:

=======  =====  ====================================================================================
format   parts  planes (name dtype [shape]) and the value of an element
=======  =====  ====================================================================================
Q8_0     1      codes int8 [N, K]; scales f16 [N, K/32].             value = code * scale
Q4_0     2      nibbles uint8 [N, K/2]; scales f16 [N, K/32].        value = (nibble - 8) * scale
Q4_1     2      nibbles uint8 [N, K/2]; scales, mins f16 [N, K/32].  value = nibble * scale + min
Q4_K     2      nibbles uint8 [N, K/2]; sub_scales, sub_mins uint8 [N, K/32] (6-bit);
                d, dmin f16 [N, K/256].                              value = d*sub_scale*nibble - dmin*sub_min
Q6_K     2      nibbles uint8 [N, K/2] (low 4 bits); crumbs uint8 [N, K/4] (high 2 bits);
                sub_scales_low, sub_scales_high int8 [N, K/32];
                d f16 [N, K/256].                                    value = d * sub_scale * (6-bit - 32)
=======  =====  ====================================================================================

Nibbles (``parts == 2``) keep GGUF's Q4_0 order for every 4-bit format: packed column ``16 b + j`` holds
element ``32 b + j`` in its low nibble and element ``32 b + 16 + j`` in its high one (Q4_K is repacked to it).
A kernel therefore never interleaves nibbles: the activations are split once per call into the two halves of
each 32-block (:func:`split_parts`: ``[parts, M, K / parts]``) and part ``p`` of ``x`` multiplies the
nibbles ``p`` (low, high). Q6_K keeps its values' low 4 bits that way and their high 2 bits in ``crumbs``: byte
``8 b + j`` holds, from its low bits up, those of values ``32 b + j``, ``+ 8``, ``+ 16``, ``+ 24``; its 16-value
sub-scales split by part (``sub_scales_low`` for values ``32 b .. + 15``, ``_high`` for the next 16). Every plane
of a format covers ``group`` packed columns per entry (codes and nibbles 1, crumbs 2, Q8_0 scales 32, 4-bit and
Q6_K sub-scales 16, the K-quants' d 128), so a tile ``bk`` packed columns wide (a multiple of ``max_group``) reads
``bk / group`` entries of each plane. Every format takes its file's bits per weight (Q4_K: 4.625 for 4.5).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import int_codes


class Plane(NamedTuple):
    name: str
    dtype: np.dtype
    group: int  # packed columns per entry


class BlockFormat(NamedTuple):
    name: str
    block: int  # values per GGUF block along K (K must be a multiple)
    parts: int  # values per packed column: 2 for nibbles
    planes: tuple[Plane, ...]
    bits: float  # bits per weight as held here (planes' bytes * 8 / values)

    @property
    def max_group(self) -> int:
        return max(p.group for p in self.planes)


_U8, _I8, _F16 = np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float16)
CONVERT = "bits"  # how Q8_0 codes become float32 in the tiles (pallas_kernels.int_codes.METHODS)
NIBBLE_CONVERT = "cvt"  # how the 4-bit formats' nibbles do (int_codes.nibbles_to_f32; the same values either way)
FORMATS = {
    "Q8_0": BlockFormat("Q8_0", 32, 1, (Plane("codes", _I8, 1), Plane("scales", _F16, 32)), 8.5),
    "Q4_0": BlockFormat("Q4_0", 32, 2, (Plane("nibbles", _U8, 1), Plane("scales", _F16, 16)), 4.5),
    "Q4_1": BlockFormat(
        "Q4_1", 32, 2, (Plane("nibbles", _U8, 1), Plane("scales", _F16, 16), Plane("mins", _F16, 16)), 5.0
    ),
    "Q4_K": BlockFormat(
        "Q4_K",
        256,
        2,
        (
            Plane("nibbles", _U8, 1),
            Plane("sub_scales", _U8, 16),
            Plane("sub_mins", _U8, 16),
            Plane("d", _F16, 128),
            Plane("dmin", _F16, 128),
        ),
        4.625,
    ),
    "Q6_K": BlockFormat(
        "Q6_K",
        256,
        2,
        (
            Plane("nibbles", _U8, 1),
            Plane("crumbs", _U8, 2),
            Plane("sub_scales_low", _I8, 16),
            Plane("sub_scales_high", _I8, 16),
            Plane("d", _F16, 128),
        ),
        6.5625,
    ),
}


def block_format(fmt: str) -> BlockFormat:
    """The ``BlockFormat`` named ``fmt``, or a ``ValueError`` listing the known ones."""
    if fmt not in FORMATS:
        raise ValueError(f"weight format {fmt!r} is not one of {tuple(FORMATS)}")
    return FORMATS[fmt]


def plane_shapes(fmt: str, n: int, k: int) -> tuple[tuple[int, int], ...]:
    """Shapes of the planes of an ``N x K`` matrix in ``fmt`` (``K`` a multiple of the format's block)."""
    spec = block_format(fmt)
    if k <= 0 or k % spec.block:
        raise ValueError(f"K={k} must be a positive multiple of {spec.block} (the {fmt} block)")
    return tuple((n, k // spec.parts // p.group) for p in spec.planes)


def check_planes(fmt: str, planes) -> tuple[int, int]:
    """Validate ``planes`` (a sequence of arrays) as one ``fmt`` matrix; return ``(N, K)``."""
    spec = block_format(fmt)
    if not isinstance(planes, (tuple, list)) or len(planes) != len(spec.planes):
        names = [p.name for p in spec.planes]
        raise ValueError(f"{fmt} takes {len(spec.planes)} planes {names}, got {type(planes).__name__} {planes!r:.80}")
    first = planes[0]
    if getattr(first, "ndim", 0) != 2:
        raise ValueError(
            f"{fmt} {spec.planes[0].name} must be [N, K/{spec.parts}], got {getattr(first, 'shape', None)}"
        )
    n, k = first.shape[0], first.shape[1] * spec.parts
    want = plane_shapes(fmt, n, k)
    for plane, spec_plane, shape in zip(planes, spec.planes, want, strict=True):
        if getattr(plane, "dtype", None) != spec_plane.dtype or tuple(plane.shape) != shape:
            got = (getattr(plane, "dtype", type(plane).__name__), tuple(getattr(plane, "shape", ())))
            raise ValueError(
                f"{fmt} plane {spec_plane.name!r} is {got[0]}{list(got[1])}, expected {spec_plane.dtype}{list(shape)} "
                f"for N={n}, K={k}"
            )
    return n, k


# ----------------------------------------------------------------------------------------------- tiles
def _grouped(t, per_group, group: int, offset=None):
    """``t [R, W]`` times ``per_group [R, W / group]`` broadcast over each group (plus ``offset`` alike)."""
    r, w = t.shape
    out = t.reshape(r, w // group, group) * per_group[:, :, None]
    if offset is not None:
        out = out + offset[:, :, None]
    return out.reshape(r, w)


NIBBLE_FORMATS = ("Q4_0", "Q4_1", "Q4_K")  # a 32-block's value: (nibble - bias) * scale + offset


def dequantize_tile(fmt: str, tiles) -> tuple:
    """The ``parts`` float32 tiles ``[R, W]`` of a window of ``W`` packed columns, from the planes' windows
    ``tiles`` (each ``[R, W / group]``). Shared by the kernels (on register tiles) and the reference."""
    f32 = jnp.float32
    if fmt == "Q8_0":
        codes, scales = tiles
        return (_grouped(int_codes.int8_to_f32(codes, CONVERT), scales.astype(f32), 32),)
    nibbles = tiles[0].astype(jnp.int32)
    if fmt == "Q6_K":
        return _q6_k_tile(nibbles, *tiles[1:])
    if fmt not in NIBBLE_FORMATS:
        raise ValueError(f"weight format {fmt!r} is not one of {tuple(FORMATS)}")
    bias, scale, offset = _block_terms(fmt, [t.astype(f32) for t in tiles[1:]])  # [R, W / 16] each
    parts = int_codes.nibbles_to_f32(nibbles, 0.0 if bias is None else bias, NIBBLE_CONVERT)
    return tuple(_grouped(q, scale if factor == 1.0 else scale * factor, 16, offset) for q, factor in parts)


def _block_terms(fmt: str, planes) -> tuple:
    """``(bias, scale, offset)`` of a nibble format's 32-blocks from its float32 per-group planes (a block's
    value: ``(nibble - bias) * scale + offset``; bias a constant or None, offset ``[R, blocks]`` or None)."""
    if fmt == "Q4_0":
        return 8.0, planes[0], None
    if fmt == "Q4_1":
        return None, *planes
    sub, sub_min, d, dmin = planes  # Q4_K
    return None, _grouped(sub, d, 8), -_grouped(sub_min, dmin, 8)


def _q6_k_tile(nibbles, crumbs, sub_low, sub_high, d):
    """Q6_K's two parts ``[R, W]`` (see the module docstring for the crumbs' bit order)."""
    f32 = jnp.float32
    r, w = nibbles.shape
    c = crumbs.astype(jnp.int32).reshape(r, w // 16, 1, 8)  # the 8 crumb bytes of each 16 packed columns
    pair = 2 * lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1), 2)  # columns j and j + 8 of a group: shifts 0, 2
    parts = []
    for p, (four, sub) in enumerate(((nibbles & 15, sub_low), (lax.shift_right_logical(nibbles, 4), sub_high))):
        two = (lax.shift_right_logical(c, pair + 4 * p) & 3).reshape(r, w)  # part p: shifts 0/2, or 4/6
        scale = _grouped(sub.astype(f32), d.astype(f32), 8)  # [R, W / 16]
        parts.append(_grouped((four + 16 * two - 32).astype(f32), scale, 16))
    return tuple(parts)


def split_parts(x, fmt: str):
    """``x [M, K]`` as ``[parts, M, K / parts]``: for nibble formats the first and second 16 values of each
    32-block, the order of the nibbles' low and high halves; ``x[None]`` otherwise."""
    parts = block_format(fmt).parts
    if parts == 1:
        return x[None]
    m, k = x.shape
    return x.reshape(m, k // 32, 2, 16).transpose(2, 0, 1, 3).reshape(2, m, k // 2)  # (P, M, K/P)


def dequantize(planes, fmt: str, dtype=jnp.float32):
    """The ``[N, K]`` matrix ``planes`` hold, as ``dtype`` (computed in float32 with :func:`dequantize_tile`'s
    arithmetic: its values bit for bit where the compiler contracts both alike, as on a CPU)."""
    n, k = check_planes(fmt, planes)
    if fmt in NIBBLE_FORMATS:  # one broadcast expression: no halves stacked (one elementwise pass for XLA)
        nibbles = planes[0].astype(jnp.int32).reshape(n, k // 32, 1, 16)
        shift = 4 * lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1), 2)  # a block's low 16 values, then its high 16
        q = (lax.shift_right_logical(nibbles, shift) & 15).astype(jnp.float32)  # (N, K/32, 2, 16)
        bias, scale, offset = _block_terms(fmt, [p.astype(jnp.float32) for p in planes[1:]])  # [N, K/32] each
        values = (q if bias is None else q - bias) * scale[:, :, None, None]
        if offset is not None:
            values = values + offset[:, :, None, None]
        return values.reshape(n, k).astype(dtype)
    parts = dequantize_tile(fmt, planes)  # each [N, K / P]
    if len(parts) == 1:
        return parts[0].astype(dtype)
    halves = jnp.stack([p.reshape(n, k // 32, 16) for p in parts], axis=2)  # (N, K/32, 2, 16)
    return halves.reshape(n, k).astype(dtype)


def qmatmul_reference(x, planes, fmt: str, dequantize_fn=None):
    """``x [M, K] @ W.T -> [M, N]`` in float32 for the ``[N, K]`` matrix ``W`` in ``planes``: the matrix
    dequantized in float32 and rounded to ``x.dtype`` (by :func:`dequantize`, or ``dequantize_fn`` of the same
    signature: ``pallas_kernels.dequantize_weights``' kernel), multiplied at full precision with float32
    accumulation."""
    _, k = check_planes(fmt, planes)
    check_activations(x, k, fmt)
    w = (dequantize_fn or dequantize)(planes, fmt, x.dtype)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    dims = (((1,), (1,)), ((), ()))
    return lax.dot_general(x, w, dims, precision=precision, preferred_element_type=jnp.float32)


ACTIVATION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def check_activations(x, k: int, fmt: str) -> None:
    if getattr(x, "ndim", None) != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, K={k}] for this {fmt} matrix, got shape {getattr(x, 'shape', None)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be one of {[str(d) for d in ACTIVATION_DTYPES]}, got {x.dtype}")
