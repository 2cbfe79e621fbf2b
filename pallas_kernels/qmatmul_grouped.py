"""The ``"grouped"`` formulation of ``quantized_matmul``: the codes on the tensor cores, each group's scale after.

Every format's value is ``code * scale (+ offset)`` with ``scale`` and ``offset`` constant over a group of packed
columns (Q8_0: 32, the 4-bit formats and Q6_K: 16, their sub-block), and every code is a small integer (int8,
a nibble less 0 or 8, Q6_K's six bits less 32) that bf16 holds exactly. So a group's share of ``x @ W.T`` is
``scale * (x @ codes.T) + offset * sum(x)``: the codes go to the tensor cores as they are (products exact,
float32 accumulation) and the scale (a ``[bn]`` column, broadcast over the ``bm`` rows) meets the ``[bm, bn]``
product instead of the ``[bn, bk]`` tile. No tile is reshaped and no per-group plane is expanded: each code window
is a plain 2-D read (Q6_K's crumbs read as ``qmatmul_expand`` reads them), each per-group entry one column.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.block_formats import block_format

GROUP = {"Q8_0": 32, "Q4_0": 16, "Q4_1": 16, "Q4_K": 16, "Q6_K": 16}  # packed columns sharing scale and offset


def _entry(ref, cols, c0, group: int, groups_major: bool):
    """Each of the ``cols`` rows' entry for packed column ``c0``: ``[1, bn]`` float32 (a row to scale a product);
    ``groups_major``: the plane is stored ``[K / P / group, N]`` (:func:`to_groups_major`), one contiguous read."""
    if groups_major:
        return ref[pl.ds(lax.div(c0, group), 1), cols].astype(jnp.float32)
    return ref[cols, lax.div(c0, group)].astype(jnp.float32)[None, :]


ENTRY_PLANES = {"Q8_0": (1,), "Q4_0": (1,), "Q4_1": (1, 2), "Q4_K": (1, 2, 3, 4), "Q6_K": (2, 3, 4)}


def to_groups_major(planes, fmt: str) -> tuple:
    """``planes`` with every per-group plane the grouped path reads as a column (:data:`ENTRY_PLANES`) transposed
    to ``[K / P / group, N]``: the layout :func:`pallas_kernels.quantized_matmul.qmatmul_groups_major` takes."""
    block_format(fmt)
    return tuple(p.T if i in ENTRY_PLANES[fmt] else p for i, p in enumerate(planes))


def _q6_k_high(ref, cols, c0, bn: int):
    """Q6_K's high two bits of packed columns ``c0 .. c0 + 15`` (``c0`` a multiple of 16): ``[bn, 16]`` int32.
    Byte ``8 b + c % 8`` of the crumbs holds column ``16 b + c``'s bits at shift ``2 * (c // 8)`` (and the high
    part's 4 bits above)."""
    col = lax.broadcasted_iota(jnp.int32, (1, 16), 1)
    rows = cols.start + lax.broadcasted_iota(jnp.int32, (bn, 1), 0) + jnp.zeros((1, 16), jnp.int32)
    byte = lax.div(c0, 16) * 8 + lax.rem(col, 8) + jnp.zeros((bn, 1), jnp.int32)
    return ref[rows, byte].astype(jnp.int32), 2 * lax.div(col, 8)


def group_codes(fmt: str, plane_refs, cols, c0, bn: int):
    """The ``parts`` integer code tiles ``[bn, G]`` (int32) of the group at packed column ``c0``."""
    window = plane_refs[0][cols, pl.ds(c0, GROUP[fmt])].astype(jnp.int32)
    if fmt == "Q8_0":
        return (window,)
    fours = (window & 15, lax.shift_right_logical(window, 4))
    if fmt == "Q4_0":
        return tuple(q - 8 for q in fours)
    if fmt in ("Q4_1", "Q4_K"):
        return fours
    bits, shift = _q6_k_high(plane_refs[1], cols, c0, bn)
    return tuple(four + 16 * (lax.shift_right_logical(bits, shift + 4 * p) & 3) - 32 for p, four in enumerate(fours))


def group_factors(fmt: str, plane_refs, cols, c0, groups_major: bool = False):
    """Per part, the ``(scale, offset)`` rows ``[1, bn]`` float32 of the group at packed column ``c0`` (offset None
    where the format has none): value = code * scale + offset."""
    groups = [p.group for p in block_format(fmt).planes]
    entry = lambda i: _entry(plane_refs[i], cols, c0, groups[i], groups_major)
    if fmt == "Q8_0":
        return ((entry(1), None),)
    if fmt == "Q4_0":
        return ((entry(1), None),) * 2
    if fmt == "Q4_1":
        return ((entry(1), entry(2)),) * 2
    if fmt == "Q4_K":
        return ((entry(1) * entry(3), -(entry(2) * entry(4))),) * 2
    d = entry(4)
    return ((entry(2) * d, None), (entry(3) * d, None))


def has_offsets(fmt: str) -> bool:
    """Whether ``fmt``'s values carry a per-group offset (Q4_1's min, Q4_K's sub-min): the product then needs each
    group's activation sums (:func:`group_sums`)."""
    return fmt in ("Q4_1", "Q4_K")


def group_sums(xs, fmt: str):
    """``xs [P, M, K / P]`` (the split activations) summed over each group in float32: ``[P, M, K / P / G]``,
    computed once per call, outside the kernel (a cross-lane sum inside would cost every group)."""
    p, m, kp = xs.shape
    return xs.astype(jnp.float32).reshape(p, m, kp // GROUP[fmt], GROUP[fmt]).sum(axis=-1)


def step_factors(fmt: str, sums_ref, plane_refs, *, rows, cols, k0, block_k: int, groups_major: bool) -> tuple:
    """Every group's scales and offsets of the K step at packed column ``k0``, with each offset's activation sums
    (``sums_ref`` from :func:`group_sums`; None without offsets) as ``[bm, 1]``: what the kernel loads one step
    ahead (plain loads, which Triton's pipeliner leaves in place, would stall every step on memory latency)."""
    width = GROUP[fmt]
    out = []
    for u in range(block_k // width):
        c0 = pl.multiple_of(k0 + u * width, width)
        parts = []
        for p, (scale, offset) in enumerate(group_factors(fmt, plane_refs, cols, c0, groups_major)):
            sums = None if offset is None else sums_ref[p, rows, lax.div(c0, width)][:, None]
            parts.append((scale, offset, sums))
        out.append(tuple(parts))
    return tuple(out)


def grouped_step(fmt: str, x_ref, plane_refs, acc, factors, *, rows, cols, k0, block_k: int, block_n: int):
    """``acc [bm, bn]`` float32 after the K step at packed column ``k0``: per group and part, the activations
    times the integer codes on the tensor cores, scaled (and offset by the group's activation sums) in float32 by
    ``factors`` (:func:`step_factors` of this step)."""
    width = GROUP[fmt]
    dtype = x_ref.dtype
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    for u in range(block_k // width):
        c0 = pl.multiple_of(k0 + u * width, width)
        codes = group_codes(fmt, plane_refs, cols, c0, block_n)
        for p, (q, (scale, offset, sums)) in enumerate(zip(codes, factors[u], strict=True)):
            x = x_ref[p, rows, pl.ds(c0, width)]  # [bm, G]
            acc += common.dot(x, q.astype(dtype), trans_b=True, precision=precision) * scale
            if offset is not None:
                acc += sums * offset
    return acc
