"""GQA decode attention over a Q8 (or FP8) cache that dequantizes inside its K/V loads.

The Q8 format: int8 codes ``[..., D]`` and one scale (float16 or float32) per 32 consecutive values along
``D``, ``[..., D // 32]``; a value is ``code * scale``. A Q8 cache is ``int8[L, B, K, S, D]`` codes with
``[L, B, K, S, D // 32]`` scales, for K and for V.

:func:`q8_decode_attention` is the bf16 decode kernel's algorithm (``pallas_kernels.decode``: one program per
``(b, kv head, split)``, the whole cache indexed in place so ``layer`` may be traced, loops bounded by each
sequence's length, split-K partials merged by ``merge_partials``) over Q8 K/V, with the dequantization folded
into the two matrix products instead of a dequantized copy of the cache. Each product takes a whole ``[bk, D]``
code tile: the query is made block diagonal (row ``c * Gs + g`` holds query ``g``'s chunk ``c`` of 32 values and
zeros elsewhere), so one product gives every chunk's partial scores ``[D/32 * Gs, bk]``, which the K scales
weight and sum; the probabilities times each chunk's V scales form the left operand of the value product, whose
chunk ``c`` columns are kept from row block ``c``.

Codes enter the tensor-core products exactly (int8 fits bf16, f16 and tf32 mantissas) and scales multiply the
float32 results, so the only roundings are those of ``q`` and ``p`` to the product dtype, as in the bf16 kernel.
Each K/V byte is read once: the kernel moves ``D + D // 32 * scale_bytes`` bytes per position and head instead of
``2 * D`` for bf16.

The body takes the values per scale (``chunk``) from the arrays' shapes: 32 for Q8, the whole head for FP8
(float8_e4m3fn values, one float32 scale per position and kv head: ``pallas_kernels.decode_fp8``), where the wide
products are the plain ones (one chunk: the bf16 kernel's products with the scales on scores and probabilities).
:func:`run` is the public functions' launch for either format (:class:`QuantFormat`).

The loop's arithmetic comes in forms (``LOOP_FORMS``, ``+``-joined parts of ``FLAGS``; the public functions read
``LOOP_FORM`` per call, ``vperm`` unless set): ``vperm`` reorders the value tile's columns
(``q8_tiles.permute_columns``, undone once on the output) so each thread reads adjacent codes of a row in one word,
where the default form reads the int8 tile a byte at a time (the product wants it along keys, which ``ldmatrix``
cannot transpose for 8-bit values); ``srot`` orders the wide row blocks' chunks (``q8_tiles.lane_chunk_bits``) so a
thread's scales are adjacent; ``dsum`` keeps the softmax denominator per key column, summed once after the loop
instead of across the warps every block; ``exp2`` keeps scores in base-2 units (``log2(e)`` folded into the key
scales' factor), ``exp2`` being the bare hardware exponential; ``iq8`` (Q8 codes only) rounds each query chunk to
int8 with its own scale (``int_codes.round_rows``) so the scores' products multiply int8 by int8 into exact int32
sums: no key code is converted to floats, at the cost of the query's rounding; ``pad`` reads a head_dim that is not a
power of two as one tile of the next power of two with the columns past it masked (the loop of that head_dim for
fewer bytes) and ``parts`` in power-of-two column parts (``q8_tiles.ColumnPart``); with neither, Q8 codes are padded
up to ``PAD_MAX_COLUMNS`` columns and FP8 values where a part would be 16 columns. Codes and the roundings of ``q`` and
``p`` to the product dtype are those of the default in every form but ``iq8``; ``srot`` and ``dsum`` sum in another
order and ``exp2`` differs in float32 rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, Int8

from pallas_kernels import backend, checks, common, decode_walk, int_codes, q8_tiles
from pallas_kernels.common import LOG2E, MIN_BLOCK, DecodeConfig

QBLOCK = checks.Q8_BLOCK  # values per scale
# Launch rules fitted to sweeps on the GPU (docs/notes/kernel_rules.md, "Q8"): keys per step, warps, stages,
# and the fewest keys a split walks where fewer (b, kv head) programs than multiprocessors run.
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 3
SPLIT_KEYS = 128
# Heads of at most SMALL_HEAD_DIM columns (SmolLM2's 64): blocks of SMALL_HEAD_BLOCK_K keys (as many bytes a block as
# BLOCK_K keys of 128 columns) in programs of SMALL_HEAD_WARPS warps, and where fewer (b, kv head) programs than
# multiprocessors run, as many warps a multiprocessor as the 4-warp rule's two programs: measured against the 4-warp
# launch and torch cuDNN in docs/BENCHMARKS.md, "Launch sweeps at head_dim 64 and 1 x 4096"
SMALL_HEAD_DIM = 64
SMALL_HEAD_BLOCK_K = 128
SMALL_HEAD_WARPS = 2
# Forms of the loop's arithmetic (the module docstring; decode_kernel's ``form``), compared by bench/decode_ir.py
# (per-block instruction counts, CPU) and bench/bench_q8_loop.py (GPU time). LOOP_FORM: the public functions'.
# "iq8" forms are listed before the last, which stays all four of the bitwise-neutral and float forms.
LOOP_FORMS = ("default", "vperm", "srot", "dsum", "exp2", "iq8", "vperm+iq8", "vperm+pad", "vperm+parts",
              "vperm+srot", "vperm+srot+dsum", "vperm+srot+dsum+exp2")  # fmt: skip
LOOP_FORM = "vperm"  # bitwise the default's output; faster on the H100 and the H200 (docs/BENCHMARKS.md)
FLAGS = frozenset({"vperm", "srot", "dsum", "exp2", "iq8", "pad", "parts"})
# Q8 codes at a head_dim that is not a power of two read as one padded tile where that tile is at most this wide
# (96 -> 128), in power-of-two parts past it (160, 224): the loop's counted instructions a key and the H100's times
# (docs/BENCHMARKS.md, "The pad form on the GPU")
PAD_MAX_COLUMNS = 128


# ----------------------------------------------------------------------------------------------- validation


def check_args(
    q, k, k_scale, v, v_scale, lengths, layer=None, check_pair=checks.check_q8_pair
) -> tuple[int, int, int, int, int]:
    """Validate :func:`q8_decode_attention`'s arguments (and its reference's; FP8's with its ``check_pair``);
    return ``(B, N, K, S, D)``: the pairs, then shapes, GQA, head_dim, lengths and layer as for the bf16 kernel
    on stand-ins of the values."""
    return checks.check_args(q, *checks.check_pairs(check_pair, k, k_scale, v, v_scale), lengths, layer, chunked=True)


# ----------------------------------------------------------------------------------------------- kernel


def decode_kernel(
    # inputs (the paged kernel passes views of its pools that read through the block table for k/v and scales)
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    q_ref,  # [B, N, D]
    k_ref,  # [L, B, K, S, D] int8: the whole cache; the program reads its own (layer, b, kv head) slab
    k_scale_ref,  # [L, B, K, S, D // 32]
    v_ref,  # [L, B, K, S, D] int8
    v_scale_ref,  # [L, B, K, S, D // 32]
    # outputs (after a zeroed count with ``fused_merge``): as ``decode.decode_kernel``'s
    *out_refs,
    group: int,
    rows: int,
    block_k: int,
    num_splits: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    dot_dtype,
    chunk: int = QBLOCK,  # values per scale: 32 (Q8) or D (FP8: one chunk, plain products)
    form: str = "default",  # LOOP_FORMS: "+"-joined
    num_warps: int = NUM_WARPS,  # the launch's (the "vperm" form's column order follows it)
    fused_merge: bool = False,
    interpret: bool = False,
):
    out_refs = out_refs[fused_merge:]  # the count's output is its input's buffer
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_len, head_dim = k_ref.shape[3:]
    split = dict(block_k=block_k, num_splits=num_splits, window=window)
    n, layer, start, first, lo, hi = decode_walk.program_range(lengths_ref, layer_ref, b, j, k_ref.shape, **split)
    n_full = n // block_k  # blocks whose every position is valid

    flags = set(form.split("+")) - {"default"}
    if flags - FLAGS:
        raise ValueError(f"form={form!r}: unknown parts {sorted(flags - FLAGS)} (known: {sorted(FLAGS)})")
    # A head_dim that is not a power of two is read in power-of-two column parts ("parts"; 160: 128 + 32), each
    # with its own wide products; their scores are summed and each accumulates its own output columns. With "pad"
    # it is read as one tile of the next power of two instead, the columns past it masked (zeros; their scales
    # too). Unless a flag says: pad Q8 codes up to PAD_MAX_COLUMNS (96), and, as the bf16 kernels do, where a part
    # would be 16 columns (FP8 at 80, 48).
    if {"pad", "parts"} <= flags:
        raise ValueError(f"form={form!r}: 'pad' and 'parts' exclude each other")
    q8_pads = k_ref.dtype == jnp.int8 and common.pow2_ceil(head_dim) <= PAD_MAX_COLUMNS
    pad = True if "pad" in flags else False if "parts" in flags else (q8_pads or None)
    slices = common.column_tiles(head_dim, pad=pad)
    io_cols = [pl.ds(0, head_dim) if isinstance(c, slice) else c for c in slices]
    tiles = [decode_walk.query_tile(q_ref, b, h, group=group, rows=rows, cols=c) for c in io_cols]
    head_rows, row_ok = tiles[0][:2]
    qs = [t[2] for t in tiles]
    # FP8 values under float16 products (q8_tiles.dot_dtype_for): the query brought into float16's range by a power
    # of two (exact), given back in the key scales' factor
    f16_fp8 = dot_dtype == jnp.float16 and k_ref.dtype != jnp.int8
    qs_in, q_up = qs, 1.0
    if f16_fp8 and qs[0].dtype != jnp.float16:
        peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x.astype(jnp.float32))) for x in qs])
        q_down, q_up = q8_tiles.f16_headroom(peak)
        qs = [x.astype(jnp.float32) * q_down for x in qs]
    qs = [x.astype(dot_dtype) for x in qs]
    # Row c * rows + g of a part's wide query holds query g's chunk c (sigma(c) with "srot") and zeros elsewhere
    # (block diagonal), so one product with the part's whole [bk, W] code tile gives every chunk's partial scores:
    # [R, bk]. With one chunk (FP8) every wide tile is the plain one.
    parts = [q8_tiles.ColumnPart(c, head_dim, chunk, rows, "srot" in flags) for c in slices]
    q_wides = [part.block_diagonal(x) for part, x in zip(parts, qs, strict=True)]  # [R, W] each
    int_q = "iq8" in flags and k_ref.dtype == jnp.int8  # FP8 values keep their float products
    if int_q:  # each wide row (a query's chunk) rounded to int8 once: the scores' products run on int8 codes
        q32 = [x.astype(jnp.float32) for x in qs_in]
        q_ints = [int_codes.round_rows(part.block_diagonal(x)) for part, x in zip(parts, q32, strict=True)]
    one_scale = chunk >= head_dim  # FP8: one scale a position for all the parts

    def scale_tile(ref, valid, keys, part):  # [chunks, bk] float32
        tile = decode_walk.block_tile(ref, valid, (layer, b, h, keys), part.scale_cols)
        return part.chunk_order(tile.T.astype(jnp.float32))

    # With "exp2" the scores are kept in base-2 units (times log2(e), folded into the key scales' factor where
    # no softcap comes between) and exponentiated by exp2; the running max returns to natural units at the end.
    base2 = "exp2" in flags
    score_factor = (scale * LOG2E if base2 and softcap is None else scale) * q_up

    def scores_of(keys, valid):
        total = None
        for i, part in enumerate(parts):
            codes = decode_walk.block_tile(k_ref, valid, (layer, b, h, keys), part.cols)  # [bk, W] int8 (or e4m3)
            if int_q:  # exact int32 sums of code products, then each wide row's unit
                q_codes, q_unit = q_ints[i]
                dims = (((1,), (1,)), ((), ()))
                prod = lax.dot_general(q_codes, codes, dims, preferred_element_type=jnp.int32)
                prod = prod.astype(jnp.float32) * q_unit[:, None]
            else:
                prod = common.dot(q_wides[i], codes.astype(dot_dtype), trans_b=True)  # [R, bk] float32
            if one_scale and len(parts) > 1:  # the scale once, on the parts' sum
                total = prod if total is None else total + prod
                continue
            k_scale = scale_tile(k_scale_ref, valid, keys, part) * score_factor
            if part.chunks == 1:
                s = prod * k_scale
            else:
                s = jnp.sum(prod.reshape(part.chunks, rows, block_k) * k_scale[:, None, :], axis=0)  # [rows, bk]
            total = s if total is None else total + s
        if one_scale and len(parts) > 1:
            total = total * (scale_tile(k_scale_ref, valid, keys, parts[0]) * score_factor)
        return total

    def values_of(p, keys, valid):
        out = []
        for part in parts:
            v_scale = scale_tile(v_scale_ref, valid, keys, part)  # [chunks, bk]
            if valid is not None:
                v_scale = jnp.where(valid[None, :], v_scale, 0.0)
            top = 1.0
            if f16_fp8:  # the block's largest scale as 1: p * scale in float16's range whatever the magnitudes
                top = jnp.max(v_scale)
                top = jnp.where(top > 0, top, 1.0)
                v_scale = v_scale * (1.0 / top)
            # Row c * rows + g: query g's probabilities times chunk c's value scales; its product with the part's
            # code tile is right in chunk c's columns (the rest is dropped once, at the end).
            wide = p * v_scale if part.chunks == 1 else (p[None] * v_scale[:, None, :]).reshape(part.wide_rows, -1)
            wide = wide.astype(dot_dtype)
            values = decode_walk.block_tile(v_ref, valid, (layer, b, h, keys), part.cols)  # [bk, W]
            if "vperm" in flags:
                values = q8_tiles.permute_columns(values, 8 * num_warps)
            values = values.astype(dot_dtype)
            if valid is not None and jnp.issubdtype(v_ref.dtype, jnp.floating):  # e4m3 may hold NaN (int8 cannot)
                values = jnp.where(valid[:, None], values, jnp.zeros_like(values))
            out.append(common.dot(wide, values) * top)  # [R, W]
        return out

    def attend(carry, start, valid):
        m, denom, accs = carry  # running max [rows], sum [rows], outputs [R, W] (one a part); float32
        keys = pl.ds(start, block_k)
        s = common.softcapped(scores_of(keys, valid), softcap)
        if base2 and softcap is not None:
            s = s * LOG2E
        if valid is not None:  # unused positions may hold NaN scales: where(), never a multiply, masks them
            s = jnp.where(valid[None, :], s, -jnp.inf)
        exp = jnp.exp2 if base2 else jnp.exp
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = exp(m - m_new)  # 0 on the first block (m = -inf)
        p = exp(s - m_new[:, None])  # [rows, bk]
        pvs = values_of(p, keys, valid)
        accs = tuple(a * part.widen(alpha)[:, None] + pv for a, part, pv in zip(accs, parts, pvs, strict=True))
        if "dsum" in flags:  # per key column: summed once, after the loop (no reduction across warps per block)
            return m_new, denom * alpha[:, None] + p, accs
        return m_new, denom * alpha + jnp.sum(p, axis=1), accs

    bounds = dict(n=n, n_full=n_full, start=start, first=first, lo=lo, hi=hi)
    if "dsum" in flags:
        bounds["denom_shape"] = (rows, block_k)
    shapes = [(part.wide_rows, part.width) for part in parts]
    (m, denom, accs), _ = decode_walk.walk(
        attend, rows, shapes, block_k=block_k, max_len=max_len, window=window, **bounds
    )
    if "dsum" in flags:
        denom = jnp.sum(denom, axis=1)
    if base2:
        m = m * (1 / LOG2E)
    if "vperm" in flags:
        accs = [q8_tiles.permute_columns(a, 8 * num_warps, inverse=True) for a in accs]
    accs = [part.own_chunks(a) for part, a in zip(parts, accs, strict=True)]  # each row block's own chunk
    decode_walk.store(out_refs, accs, m, denom, b, j, head_rows, io_cols, row_ok, group=group, rows=rows,
                      num_splits=num_splits)  # fmt: skip
    if fused_merge:
        common.merge_when_last(out_refs, b, h, group=group, num_splits=num_splits, interpret=interpret)


def kernel_options(
    q_dtype, group: int, head_dim: int, block_k: int, num_splits: int, scale: float, window=None, softcap=None,
    chunk: int = QBLOCK, form: str = "default", num_warps: int = NUM_WARPS, values_dtype=jnp.int8,
) -> dict:  # fmt: skip
    """The static arguments of :func:`decode_kernel` (shared with the paged kernel) for ``chunk`` values per scale."""
    return dict(
        group=group,
        rows=q8_tiles.wide_rows(group, q8_tiles.head_chunks(head_dim, chunk)),
        block_k=block_k,
        num_splits=num_splits,
        scale=scale,
        window=window,
        softcap=None if softcap is None else float(softcap),
        dot_dtype=q8_tiles.dot_dtype_for(q_dtype, values_dtype),
        chunk=chunk,
        form=form,
        num_warps=num_warps,
    )


def format_name(values_dtype) -> str:
    """``"q8"`` for int8 codes, ``"fp8"`` for e4m3 values: the kernels' names."""
    return "q8" if values_dtype == jnp.int8 else "fp8"


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "interpret", "form"))
def _decode(
    q, k, k_scale, v, v_scale, lengths, layer, *, scale, config: DecodeConfig, interpret, window=None, softcap=None,
    form="default",
):  # fmt: skip
    # q [B, N, D]; k, v int8 or float8_e4m3fn [L, B, K, S, D]; scales [L, B, K, S, D // chunk] (Q8: chunk 32;
    # FP8: D); lengths int32[B]; layer int32[1]
    _, batch, kv_heads, _, head_dim = k.shape
    group = q.shape[1] // kv_heads
    splits, fused = config.num_splits, common.fuses_merge(config)
    out_shape = common.split_out_shape(q, splits, fused, kv_heads)
    inputs = [lengths, layer, q, k, k_scale, v, v_scale]
    chunk = head_dim // k_scale.shape[-1]
    launch = (config.block_k, splits, scale, window, softcap, chunk, form, config.num_warps, k.dtype)
    options = kernel_options(q.dtype, group, head_dim, *launch)
    kernel = functools.partial(decode_kernel, **options, fused_merge=fused, interpret=interpret)
    grid = (batch, kv_heads, splits)
    name = f"jkv_{format_name(k.dtype)}_decode_attention"
    return common.launch_split_kernel(kernel, inputs, out_shape, {}, grid, config, interpret, name, q.dtype)


# ----------------------------------------------------------------------------------------------- public


def q8_decode_config(
    batch: int, num_kv_heads: int, max_len: int, head_dim: int, block_k: int | None = None, *, small_heads=True
) -> DecodeConfig:
    """Launch parameters: ``BLOCK_K`` keys per step (fewer for a shorter cache), ``NUM_WARPS``, ``NUM_STAGES``;
    at a head_dim of at most ``SMALL_HEAD_DIM`` (unless ``small_heads`` is False: the FP8 kernels, which it made
    slower), ``SMALL_HEAD_BLOCK_K`` keys and ``SMALL_HEAD_WARPS`` warps.
    Splits: with at least one (b, kv head) program per multiprocessor, the bf16 kernel's rule
    (``common.choose_num_splits`` over ``SPLIT_KEYS``-key steps); with fewer, about two programs of
    ``NUM_WARPS`` warps per multiprocessor (as many warps in smaller programs), each split at least
    ``2 * SPLIT_KEYS`` keys. ``block_k`` fixes the keys per step instead (the paged Q8 kernel's whole pages); the
    splits and stages follow it."""
    small = small_heads and head_dim <= SMALL_HEAD_DIM
    if block_k is None:
        top = SMALL_HEAD_BLOCK_K if small else BLOCK_K
        block_k = max(MIN_BLOCK, min(top, 1 << (max(max_len, 1).bit_length() - 1)))
    warps = SMALL_HEAD_WARPS if small else NUM_WARPS
    sms, programs = backend.num_multiprocessors(), batch * num_kv_heads
    split_keys = max(block_k, SPLIT_KEYS)
    if programs >= sms:
        splits = common.choose_num_splits(batch, num_kv_heads, max_len, split_keys, sms)
    else:
        most = max(1, pl.cdiv(max_len, split_keys) // 2)
        splits = max(1, min(2 * NUM_WARPS // warps * sms // programs, most))
    stages = min(NUM_STAGES, common.max_stages(block_k, head_dim, 1))
    return DecodeConfig(block_k, splits, warps, stages)


def q8_decode_attention(
    q: Float[Array, "B N D"],
    k: Int8[Array, "*L B K S D"],
    k_scale: Float[Array, "*L B K S D//32"],
    v: Int8[Array, "*L B K S D"],
    v_scale: Float[Array, "*L B K S D//32"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    interpret: bool | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fused_merge: bool | None = None,
) -> Float[Array, "B N D"]:
    """Decode attention over a Q8 cache: one query per sequence over its first ``lengths[b]`` positions.

    Arguments as for ``pallas_kernels.decode.decode_attention``, with each of K and V given as codes and scales
    (one layer ``[B, K, S, ...]`` or a whole ``[L, B, K, S, ...]`` cache with ``layer``). The products run in
    ``q``'s dtype when it is bfloat16 or float16, in tf32 (GPU) or float32 (interpret) for a float32 ``q``;
    softmax and accumulation in float32. ``window`` and ``softcap`` as ``pallas_kernels.decode.decode_attention``.
    Launch overrides as for :func:`q8_decode_config`'s fields (``fused_merge`` as the bf16 kernel's).
    """
    overrides = dict(block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                     fused_merge=fused_merge)  # fmt: skip
    settings = dict(layer=layer, scale=scale, window=window, softcap=softcap, interpret=interpret)
    return run(Q8, q, (k, k_scale, v, v_scale), lengths, **settings, **overrides)


class QuantFormat(NamedTuple):
    """What a quantized format changes in the decode calls: its pair check (``checks.check_pairs``), launch rule and the
    loop-form parts it always adds to ``LOOP_FORM`` (:meth:`form`)."""

    check_pair: Callable  # (name, values, scales) -> a stand-in of the values
    config: Callable  # (batch, kv_heads, max_len, head_dim, block_k=None) -> DecodeConfig
    flags: tuple[str, ...] = ()

    def form(self) -> str:
        """``LOOP_FORM`` (read per call) with this format's own parts added."""
        parts = LOOP_FORM.split("+")
        return "+".join(parts + [f for f in self.flags if f not in parts])


Q8 = QuantFormat(checks.check_q8_pair, q8_decode_config)


def run(fmt: QuantFormat, q, arrays, lengths, *, layer, scale, window, softcap, interpret, **overrides):
    """A contiguous Q8 / FP8 decode call: ``arrays`` (k, k_scale, v, v_scale) checked as ``fmt``'s pairs, the
    launch ``fmt.config``'s defaults with ``overrides`` (block_k, num_splits, num_warps, num_stages) on top."""
    b, _, kh, s, d = check_args(q, *arrays, lengths, layer, check_pair=fmt.check_pair)
    checks.check_window_softcap(window, softcap)
    default = fmt.config(b, kh, common.reach(s, window), d)
    interpret, scale, config = common.launch_settings(default, s, d, 1, scale, interpret, **overrides)
    cache, layer = common.whole_cache(arrays, layer, MIN_BLOCK)  # a tiny cache padded to a block
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    options = dict(scale=float(scale), window=window, softcap=softcap, config=config, interpret=interpret)
    return _decode(q, *cache, lengths, layer, **options, form=fmt.form())
