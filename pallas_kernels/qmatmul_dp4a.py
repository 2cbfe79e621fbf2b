"""The ``"dp4a"`` formulation of ``quantized_matmul``'s small-M kernel: integer dot products of int8 activations.

The activations are rounded once per call (XLA, ``M x K`` work) to int8 per 32-block of ``K`` with one float32 scale
per block (``scale = max|x| / 127``, round to nearest, halves up), as fast GGUF matrix-vector kernels do, with the
sums the offsets take (:func:`quantize_activations`). The codes are packed four to an int32 word in ``K``'s order;
the weights' code planes are read as int32 words too (a bitcast). Block ``b``'s part ``p`` (the first or second 16
values of a nibble format, as ``block_formats.split_parts`` splits ``x``) is activation words ``8b + 4p`` on, and
pairs with the words of the weights' packed columns of block ``b``.

A K step walks **units** of one 32-block (Q8_0: 8 words of codes in two windows of 4, the 4-bit formats: 4 words
holding both nibbles, Q6_K: two windows of 2 words, as its crumb bytes pair with them), each window a 2-D read
``[bn, words]`` of the codes, and PTX ``dp4a.s32.s32`` multiplies four bytes of weights by four bytes of
activations into an int32 per word (the 4-bit formats: the low nibbles ``w & 0x0F0F0F0F`` with part 0's word,
the high ``(w >> 4) & 0x0F0F0F0F`` with part 1's, into one sum, as one activation scale covers the 32-block).
A window's row lies in one thread (16 bytes, a warp per 32 rows), so its words' sums add up to the block's
integer sum in registers (no shuffle, no shared memory); converted to float32, it meets the block's ``weight
scale * activation scale`` (``[bn]`` columns) in one ``[bn]`` float32 accumulator per row. Integer offsets
(Q4_0's ``-8``, Q6_K's ``-32``) add ``offset * sum(activation codes)`` of the block (Q6_K: of each part) to the
integer sum; float offsets (Q4_1's mins, Q4_K's ``-dmin * sub_min``) multiply the block's sum of the rounded
activations (``scale * sum(codes)``, so the offset term matches what the integer part multiplies) into the same
accumulator. Interpret mode (no PTX) emulates ``dp4a`` with shifts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, int_codes
from pallas_kernels.block_formats import block_format

# Words per window, 16 bytes where a unit allows (a window row per thread: a 16-byte load, its words summed in the
# thread, the [bn] scale columns in the tile's own row layout); Q8_0's unit is two windows, Q6_K's two of 8 bytes.
WORDS = {"Q8_0": 4, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q6_K": 2}
FLOAT_OFFSETS = ("Q4_1", "Q4_K")  # formats whose offsets take the activations' block sums
INT_OFFSET = {"Q4_0": -8, "Q6_K": -32}  # integer offsets of the codes: they take the sums of the activation codes
DP4A_ASM = "dp4a.s32.s32 $0, $1, $2, $3;"
LOW_NIBBLES = 0x0F0F0F0F


def quantize_activations(x, fmt: str):
    """``x [M, K]`` rounded to int8 per 32-block: ``(words, factors)``, ``words`` int32 ``[M, K / 4]`` (the codes
    four to a word in ``K``'s order, the first code in the low byte: block ``b``'s 32 codes are words ``8b`` to
    ``8b + 7``, a nibble format's part ``p`` the four from ``8b + 4p``) and ``factors`` a tuple of float32
    ``[M, K / 32]``: each block's scale, then for Q4_1 / Q4_K its sum of the rounded activations, for Q4_0 the sum
    of its codes, for Q6_K the sums of the codes of each part (its first and second 16; integers, exact). Kept
    apart and in ``K``'s order, they are what XLA computes them as: no transpose into parts, no stacked copy (each
    of those was a launch of its own in a decode step)."""
    m, k = x.shape
    # halves round up: the rule a Triton kernel can state (qmatmul_act, this function's one-launch form)
    codes, scale = int_codes.round_rows(x.astype(jnp.float32).reshape(m, k // 32, 32))  # [M, K/32, 32], [M, K/32]
    words = lax.bitcast_convert_type(codes.reshape(m, k // 4, 4), jnp.int32)  # (M, K / 4)
    return words, block_factors(codes.astype(jnp.int32), scale, fmt)


def block_factors(codes, scale, fmt: str) -> tuple:
    """The factors of :func:`quantize_activations` from the blocks' codes (int32 ``[..., 32]``) and scales
    (``[...]``): the scale, then the sums ``fmt``'s offsets take. Masks, not slices, pick a part's codes, so a
    Triton kernel states it too (``qmatmul_act``)."""
    first = lax.broadcasted_iota(jnp.int32, codes.shape, codes.ndim - 1) < 16  # a block's part 0
    code_sum = lambda keep: jnp.sum(jnp.where(keep, codes, 0), axis=-1).astype(jnp.float32)
    if fmt in FLOAT_OFFSETS:
        return scale, scale * jnp.sum(codes, axis=-1).astype(jnp.float32)
    if fmt == "Q4_0":
        return scale, jnp.sum(codes, axis=-1).astype(jnp.float32)
    if fmt == "Q6_K":
        return scale, code_sum(first), code_sum(~first)
    return (scale,)


def weight_words(planes, fmt: str) -> tuple:
    """``planes`` with the byte planes the kernel reads as words (codes or nibbles; Q6_K's crumbs) bitcast to int32
    ``[N, bytes / 4]``, the first byte lowest (planes already int32 are kept). XLA may copy rather than view a
    bitcast that changes the element size: make the words once, before the calls (``qmatmul_words``)."""
    spec = block_format(fmt)
    as_words = lambda p: lax.bitcast_convert_type(p.reshape(p.shape[0], -1, 4), jnp.int32)
    words = lambda p, plane: plane.group <= 2 and p.dtype != jnp.int32
    return tuple(as_words(p) if words(p, plane) else p for p, plane in zip(planes, spec.planes, strict=True))


def interleave(word_planes, fmt: str) -> tuple:
    """Word planes (:func:`weight_words`) laid out for coalesced reads: the code words as ``[K_words / 4, N, 4]``
    (each row's 16-byte windows of one K position side by side, so a warp's window loads read consecutive bytes)
    and the per-group planes K-major ``[entries, N]``. Formats with 16-byte windows only (not Q6_K)."""
    if WORDS.get(fmt) != 4:
        raise ValueError(f"interleaved word planes take formats with 16-byte windows, not {fmt}")
    codes, *entries = word_planes
    n, kw = codes.shape
    return (jnp.transpose(codes.reshape(n, kw // 4, 4), (1, 0, 2)), *(jnp.transpose(e) for e in entries))


def deinterleave(planes, fmt: str) -> tuple:
    """The word planes (:func:`weight_words`) of planes laid out by :func:`interleave` (its inverse)."""
    if WORDS.get(fmt) != 4:
        raise ValueError(f"interleaved word planes take formats with 16-byte windows, not {fmt}")
    codes, *entries = planes
    windows, n, _ = codes.shape
    return (jnp.transpose(codes, (1, 0, 2)).reshape(n, 4 * windows), *(jnp.transpose(e) for e in entries))


def byte_planes(word_planes, fmt: str) -> tuple:
    """The format's own planes from word planes (the inverse of :func:`weight_words`)."""
    out = []
    for p, plane in zip(word_planes, block_format(fmt).planes, strict=True):
        if p.dtype == jnp.int32 and jnp.dtype(plane.dtype).itemsize == 1:
            p = lax.bitcast_convert_type(p, plane.dtype).reshape(p.shape[0], -1)
        out.append(p)
    return tuple(out)


def byte_shapes(planes, fmt: str, interleaved: bool = False) -> list:
    """The byte planes' shapes and dtypes (``ShapeDtypeStruct``) of planes whose byte planes are words (and, with
    ``interleaved``, laid out by :func:`interleave`)."""
    if interleaved:
        codes, *entries = planes
        windows, n, _ = codes.shape
        planes = (
            jax.ShapeDtypeStruct((n, 4 * windows), jnp.int32),
            *(jax.ShapeDtypeStruct(e.shape[::-1], e.dtype) for e in entries),
        )
    spec = block_format(fmt)
    out = []
    for p, plane in zip(planes, spec.planes, strict=True):
        words = plane.group <= 2 and getattr(p, "dtype", None) == jnp.int32 and getattr(p, "ndim", 0) == 2
        shape = (p.shape[0], 4 * p.shape[1]) if words else p.shape
        out.append(jax.ShapeDtypeStruct(shape, plane.dtype if words else p.dtype))
    return out


def dp4a_emulated(a, b, c):
    """``c`` plus the dot product of the four signed bytes of ``a`` and of ``b`` (int32, wrapping), with shifts."""
    byte = lambda w, i: lax.shift_right_arithmetic(lax.shift_left(w, jnp.int32(24 - 8 * i)), jnp.int32(24))
    return c + sum(byte(a, i) * byte(b, i) for i in range(4))


def dp4a(a, b, c, *, emulate: bool):
    """PTX ``dp4a.s32.s32`` on int32 tensors of one shape (:func:`dp4a_emulated` in interpret mode)."""
    if emulate:
        return dp4a_emulated(a, b, c)
    (out,) = backend.triton_module().elementwise_inline_asm(
        DP4A_ASM,
        args=[a, b, c],
        constraints="=r,r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)],
    )
    return out


def _unit_loads(fmt: str, plane_refs, cols, index, interleaved: bool = False) -> tuple:
    """The unit's weight-side reads as loaded (so that a step's reads can be issued a step ahead): ``(entries,
    words)``, ``entries`` each per-group plane's ``[bn]`` entries, ``words`` the code windows ``[bn, WORDS]``
    (Q6_K: its two nibble windows, then its crumb words); ``index(g)``: the unit's entry of a plane of ``g``
    packed columns an entry. ``interleaved``: planes laid out by :func:`interleave`."""
    spec = block_format(fmt)
    per_group = [(ref, p.group) for ref, p in zip(plane_refs, spec.planes, strict=True) if p.group > 2]
    width, spans = WORDS[fmt], range(0, 8 // spec.parts, WORDS[fmt])
    if interleaved:  # window w of every row side by side: [bn, 4] words from consecutive bytes
        entries = tuple(ref[index(g), cols] for ref, g in per_group)
        return entries, tuple(plane_refs[0][index(16) + at // 4, cols, :] for at in spans)
    entries = tuple(ref[cols, index(g)] for ref, g in per_group)
    w0 = index(4)
    words = tuple(plane_refs[0][cols, pl.ds(w0 + at, width)] for at in spans)
    if fmt == "Q6_K":
        words += (plane_refs[1][cols, pl.ds(index(8), 2)],)
    return entries, words


def _weight_factors(fmt: str, entries) -> tuple:
    """The unit's per-part weight scales and its float offset (``[bn]`` each; no offset: None)."""
    e = [v.astype(jnp.float32) for v in entries]
    if fmt in ("Q8_0", "Q4_0"):
        return (e[0],), None
    if fmt == "Q4_1":
        return (e[0],), e[1]
    if fmt == "Q4_K":  # sub-scale, sub-min, d, dmin
        return (e[0] * e[2],), -(e[1] * e[3])
    return (e[0] * e[2], e[1] * e[2]), None  # Q6_K: a sub-scale per part, d


def _unit_codes(fmt: str, words) -> list:
    """The unit's code tiles per window: ``[(window offset in words, (part codes...))]``, each ``[bn, WORDS]``
    int32 of non-negative bytes (signed for Q8_0), one per part."""
    if fmt == "Q8_0":
        return [(WORDS[fmt] * i, (w,)) for i, w in enumerate(words)]
    nibbles = lambda w: (w & LOW_NIBBLES, lax.shift_right_arithmetic(w, 4) & LOW_NIBBLES)
    if fmt != "Q6_K":
        return [(0, nibbles(words[0]))]
    # Q6_K: the block's two crumb words serve nibble words 0-1 (crumb shift 0) and 2-3 (shift 2) alike; part 1's
    # crumbs sit 4 bits above part 0's, each moved to bits 4-5 of its byte
    crumbs, out = words[2], []
    for h in range(2):
        low, high = nibbles(words[h])
        low = low | (lax.shift_left(crumbs, 4 - 2 * h) & 0x30303030)
        high = high | (lax.shift_right_arithmetic(crumbs, 2 * h) & 0x30303030)
        out.append((2 * h, (low, high)))
    return out


def _integer_sum(codes, xs, out, *, emulate: bool):
    """``out + sum_p dot(codes[p], xs[p])`` per word: ``[bn, WORDS]`` int32 from the parts' code tiles and the
    row's activation words ``[WORDS]``, chained through ``dp4a``'s third operand (``out`` None: from zero)."""
    out = jnp.zeros(codes[0].shape, jnp.int32) if out is None else out
    for q, x in zip(codes, xs, strict=True):
        out = dp4a(q, jnp.broadcast_to(x[None, :], q.shape), out, emulate=emulate)
    return out


def _unit_index(k0, u: int, per_unit: int):
    """``index(g)``: the entry of packed column ``k0 + u * per_unit`` in a plane of ``g`` packed columns an entry
    (``k0`` a multiple of ``g``): a static offset from the step's, so the addresses are the step's plus constants."""
    return lambda g: lax.div(k0, g) + u * per_unit // g


def step_loads(fmt: str, plane_refs, *, cols, k0, block_k: int, interleaved: bool = False) -> tuple:
    """The weight-side reads of the K step at packed column ``k0``: one :func:`_unit_loads` per unit."""
    per_unit = 32 // block_format(fmt).parts  # packed columns of one 32-block
    return tuple(
        _unit_loads(fmt, plane_refs, cols, _unit_index(k0, u, per_unit), interleaved)
        for u in range(block_k // per_unit)
    )


def dp4a_step(fmt: str, xw_ref, xf_refs, loads, accs, *, rows0, k0, emulate: bool):
    """``accs`` (one ``[bn]`` float32 accumulator per row) after the K step at packed column ``k0``, whose
    weight-side reads are ``loads`` (:func:`step_loads`); ``xw_ref`` / ``xf_refs``: the activations' words and
    factors (:func:`quantize_activations`)."""
    parts = block_format(fmt).parts
    per_unit = 32 // parts
    width = WORDS[fmt]
    accs = list(accs)
    for u, (entries, words) in enumerate(loads):
        block = _unit_index(k0, u, per_unit)(per_unit)  # the unit's 32-block: the activation words 8 * block on
        scales, offset = _weight_factors(fmt, entries)
        windows = _unit_codes(fmt, words)
        for r in range(len(accs)):
            row = rows0 + r
            x_scale = xf_refs[0][row, block]
            sums = [None] * len(scales)  # the block's integer sums per word, one per scale, over its windows
            for at, codes in windows:  # part p's words of the block: from 8 * block + p * 8 / parts
                xs = [xw_ref[row, pl.ds(8 * block + p * (8 // parts) + at, width)] for p in range(parts)]
                if len(scales) == 1:  # one scale over the block: both parts into one sum
                    sums = [_integer_sum(codes, xs, sums[0], emulate=emulate)]
                else:  # Q6_K: a scale per part
                    sums = [
                        _integer_sum((q,), (x,), t, emulate=emulate) for q, x, t in zip(codes, xs, sums, strict=True)
                    ]
            for i, (s, words_sum) in enumerate(zip(scales, sums, strict=True)):
                total = jnp.sum(words_sum, axis=1).astype(jnp.float32)  # a row's words lie in one thread; < 2^24
                if fmt in INT_OFFSET:  # dot(q + o, x) = dot(q, x) + o * sum(x): the codes' sum of the block or part
                    total = total + INT_OFFSET[fmt] * xf_refs[1 + i][row, block]
                accs[r] = accs[r] + total * (s * x_scale)
            if offset is not None:
                accs[r] = accs[r] + offset * xf_refs[1][row, block]
    return tuple(accs)


def dp4a_program(
    fmt: str,
    xw_ref,
    xf_refs,
    plane_refs,
    o_ref,
    *,
    rows0,
    cols,
    split,
    steps: int,
    block_k: int,
    block_m: int,
    block_n: int,
    emulate: bool,
    prefetch: bool,
    interleaved: bool = False,
) -> None:
    """One program's share: its ``steps`` K steps from split ``split``, each row's sum stored to the partials.
    ``prefetch``: each step's weight-side reads issued during the step before (carried in the loop), so a step
    does not wait a memory latency for them. ``interleaved``: planes laid out by :func:`interleave`."""
    k0 = lambda step: pl.multiple_of((split * steps + step) * block_k, block_k)
    loads = lambda step: step_loads(fmt, plane_refs, cols=cols, k0=k0(step), block_k=block_k, interleaved=interleaved)
    compute = lambda step, now, accs: dp4a_step(
        fmt, xw_ref, xf_refs, now, accs, rows0=rows0, k0=k0(step), emulate=emulate
    )
    accs = tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(block_m))
    if prefetch:

        def body(step, carry):
            accs, now = carry
            ahead = loads(jnp.minimum(step + 1, steps - 1))  # issued before this step's arithmetic
            return compute(step, now, accs), ahead

        accs, _ = lax.fori_loop(0, steps, body, (accs, loads(0)))
    else:
        accs = lax.fori_loop(0, steps, lambda step, accs: compute(step, loads(step), accs), accs)
    for r, acc in enumerate(accs):
        o_ref[split, rows0 + r, cols] = acc
