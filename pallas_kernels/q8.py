"""Q8 kernels: dequantization, and GQA decode attention that dequantizes inside its K/V loads.

The Q8 format: int8 codes ``[..., D]`` and one scale (float16 or float32) per 32 consecutive values along
``D``, ``[..., D // 32]``; a value is ``code * scale``. A Q8 cache is ``int8[L, B, K, S, D]`` codes with
``[L, B, K, S, D // 32]`` scales, for K and for V.

:func:`dequantize` writes codes times scales out as a floating array, for callers that need the values.

:func:`decode_attention` is the bf16 decode kernel's algorithm (``pallas_kernels.decode_attention``: one
program per ``(b, kv head, split)``, a ``[Gp, D]`` tile of the kv head's query heads, the whole cache indexed in
place so ``layer`` may be traced, loops bounded by each sequence's length, split-K partials merged by
``combine_splits``) over Q8 K/V, with the dequantization folded into the two matrix products instead of a
dequantized copy of the cache: per 32-wide chunk ``c`` of ``D``,

    scores    = sum_c (q[:, c] @ codes_k[:, c].T) * scale_k[:, c]         # [Gp, bk], scale per key
    out[:, c] = (p * scale_v[:, c]) @ codes_v[:, c]                       # [Gp, 32], scale per value row

Codes enter the tensor-core products exactly (int8 fits bf16, f16 and tf32 mantissas) and scales multiply the
float32 results, so the only roundings are those of ``q`` and ``p`` to the product dtype, as in the bf16 kernel.
Each K/V byte is read once: the kernel moves ``D + D // 32 * scale_bytes`` bytes per position and head instead of
``2 * D`` for bf16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, Int8

from pallas_kernels import backend
from pallas_kernels import decode_attention as bf16_kernel
from pallas_kernels.decode_attention import DecodeConfig, group_rows

QBLOCK = 32  # values per scale
SCALE_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
DEQUANT_BLOCK_ROWS = 256  # rows of D values per dequant program (32 KiB of int8 codes at D = 128)


# ----------------------------------------------------------------------------------------------- validation


def check_q8(name: str, codes, scales) -> None:
    """``codes`` int8 ``[..., D]`` with ``D`` a multiple of 32 and ``scales [..., D // 32]`` of a scale dtype."""
    if getattr(codes, "dtype", None) != jnp.int8:
        raise TypeError(f"{name} codes must be int8, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if getattr(scales, "dtype", None) not in SCALE_DTYPES:
        raise TypeError(
            f"{name} scales must be float16 or float32, got {getattr(scales, 'dtype', type(scales).__name__)}"
        )
    d = codes.shape[-1] if codes.ndim else 0
    if codes.ndim == 0 or d % QBLOCK or scales.shape != (*codes.shape[:-1], d // QBLOCK):
        raise ValueError(
            f"{name}: codes.shape={codes.shape} and scales.shape={scales.shape} do not form a Q8 pair "
            f"(D a multiple of {QBLOCK}, scales of shape codes.shape[:-1] + (D // {QBLOCK},))"
        )


def _out_dtype(dtype) -> jnp.dtype:
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {dtype!r}") from e
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {dtype}")
    return dtype


# ----------------------------------------------------------------------------------------------- dequantize


def _dequant_kernel(
    # inputs
    codes_ref,  # [R, D] int8: the whole array
    scales_ref,  # [R, D // 32]
    # (poison input, aliased to the output and never read), then the output:
    # out [R, D]
    *refs,
    num_poison: int,
    block_rows: int,
):
    out_ref = refs[num_poison]
    rows, head_dim = codes_ref.shape
    # The last program's window slides back to end at R: its overlap rewrites the same values.
    start = jnp.minimum(pl.program_id(0) * block_rows, rows - block_rows)
    window = pl.ds(start, block_rows)
    for c in range(head_dim // QBLOCK):
        chunk = pl.ds(c * QBLOCK, QBLOCK)
        codes = codes_ref[window, chunk].astype(jnp.float32)  # [br, 32]
        scale = scales_ref[window, c].astype(jnp.float32)  # [br]
        out_ref[window, chunk] = (codes * scale[:, None]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("dtype", "block_rows", "interpret", "poison"))
def _dequantize(codes, scales, *, dtype, block_rows: int, interpret: bool, poison: bool):
    # codes [R, D] int8; scales [R, D // 32]
    rows, head_dim = codes.shape
    out_shape = jax.ShapeDtypeStruct((rows, head_dim), dtype)
    inputs, in_specs = [codes, scales], [_whole(codes.shape), _whole(scales.shape)]
    aliases = {}
    if poison:  # the output starts as NaN: whatever the kernel fails to write stays NaN
        aliases[len(inputs)] = 0
        inputs.append(jnp.full(out_shape.shape, jnp.nan, dtype))
        in_specs.append(_whole(out_shape.shape))
    kernel = functools.partial(_dequant_kernel, num_poison=len(aliases), block_rows=block_rows)
    return backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=4,
        num_stages=1,
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=in_specs,
        out_specs=_whole(out_shape.shape),
        out_shape=out_shape,
        input_output_aliases=aliases,
        name="jkv_q8_dequantize",
    )(*inputs)


def dequantize(
    codes: Int8[Array, "... D"],
    scales: Float[Array, "... D//32"],
    *,
    dtype=jnp.bfloat16,
    interpret: bool | None = None,
    block_rows: int | None = None,
    poison: bool = False,
) -> Float[Array, "... D"]:
    """``codes * scales`` as ``dtype`` (bfloat16, float16 or float32), computed in float32.

    Every leading axis is flattened into rows of ``D`` values (free: the arrays are contiguous); one program
    writes ``block_rows`` rows (default 256, a power of two; fewer when the array has fewer rows).
    """
    check_q8("dequantize", codes, scales)
    dtype = _out_dtype(dtype)
    interpret = backend.resolve_interpret(interpret)
    head_dim = codes.shape[-1]
    rows = int(np.prod(codes.shape[:-1]))
    if rows == 0:
        return jnp.zeros(codes.shape, dtype)
    if block_rows is None:
        block_rows = min(DEQUANT_BLOCK_ROWS, 1 << (rows.bit_length() - 1))  # largest power of two <= rows
    elif not _is_int(block_rows) or block_rows < 1 or block_rows & (block_rows - 1) or block_rows > rows:
        raise ValueError(f"{block_rows=} must be a power of two no larger than the number of rows ({rows})")
    out = _dequantize(
        codes.reshape(rows, head_dim),
        scales.reshape(rows, head_dim // QBLOCK),
        dtype=dtype,
        block_rows=int(block_rows),
        interpret=interpret,
        poison=poison,
    )
    return out.reshape(codes.shape)


def dequantize_reference(
    codes: Int8[Array, "... D"],
    scales: Float[Array, "... D//32"],
    *,
    dtype=jnp.bfloat16,
    interpret: bool | None = None,
    block_rows: int | None = None,
) -> Float[Array, "... D"]:
    """Pure-``jnp`` reference with :func:`dequantize`'s signature (launch arguments accepted and ignored)."""
    del interpret, block_rows
    check_q8("dequantize", codes, scales)
    blocks = codes.astype(jnp.float32).reshape(*codes.shape[:-1], -1, QBLOCK)  # (..., D/32, 32)
    return (blocks * scales.astype(jnp.float32)[..., None]).reshape(codes.shape).astype(_out_dtype(dtype))


# ----------------------------------------------------------------------------------------------- attention


def _dot(a, b, trans_b=False, out=jnp.float32):
    """``a @ b`` (``a @ b.T`` with ``trans_b``) accumulated in ``out`` (float32, or int32 for int8 operands);
    default precision (tf32 for float32 on the GPU lowering, exact float32 in interpret mode)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=out)


def _dequant_tile(codes, scales, dtype):
    """``[bk, D]`` int8 codes times ``[bk, D // 32]`` float32 scales, as ``dtype``."""
    bk, d = codes.shape
    blocks = codes.astype(jnp.float32).reshape(bk, d // QBLOCK, QBLOCK)  # (bk, D/32, 32)
    return (blocks * scales[:, :, None]).reshape(bk, d).astype(dtype)


def wide_rows(group: int, chunks: int) -> int:
    """Query rows per chunk in the wide products: a power of two >= ``group`` with ``chunks * rows >= 16``."""
    return max(1 << (group - 1).bit_length(), -(-bf16_kernel.MIN_BLOCK // chunks))


def decode_kernel(
    # inputs (the paged kernel passes views of its pools that read through the block table for k/v and scales)
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    q_ref,  # [B, N, D]
    k_ref,  # [L, B, K, S, D] int8: the whole cache; the program reads its own (layer, b, kv head) slab
    k_scale_ref,  # [L, B, K, S, D // 32] (or [L, B, K, D // 32, S] with scales_t)
    v_ref,  # [L, B, K, S, D] int8
    v_scale_ref,  # [L, B, K, S, D // 32] (or [L, B, K, D // 32, S] with scales_t)
    # (poison inputs, aliased to the outputs and never read), then outputs:
    # o [B, N, D] (one split), or acc [B, P, N, D], m [B, P, N], denom [B, P, N] (float32)
    *refs,
    num_poison: int,
    group: int,
    rows: int,
    block_k: int,
    num_splits: int,
    scale: float,
    dot_dtype,
    fuse: str,
    scales_t: bool,
):
    out_refs = refs[num_poison:]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_layers, _, _, max_len, head_dim = k_ref.shape
    chunks = head_dim // QBLOCK
    # Lengths and layer were validated on the host when concrete; the clamps only keep traced values in bounds.
    n = jnp.clip(lengths_ref[b], 0, max_len)
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)

    lo, hi = bf16_kernel.split_blocks(n, j, block_k, num_splits)
    n_full = n // block_k  # blocks whose every position is valid

    def scale_col(ref, keys, c):  # [bk] float32: chunk c's scale of each key
        return (ref[layer, b, h, c, keys] if scales_t else ref[layer, b, h, keys, c]).astype(jnp.float32)

    def scale_tile(ref, keys):  # [D/32, bk] float32
        t = ref[layer, b, h, :, keys] if scales_t else ref[layer, b, h, keys, :].T
        return t.astype(jnp.float32)

    # This kv head's query heads are rows h*G .. h*G+G-1 of q; the tile pads them to `rows` (masked, zeros).
    head_rows = pl.ds(h * group, rows)
    padded = rows != group
    row_ok = lambda width: lax.broadcasted_iota(jnp.int32, (rows, width), 0) < group if padded else None
    wide = fuse in WIDE
    # Column slices of D: one of 32 per chunk ("scores"), or all of D at once (the others).
    cols = [pl.ds(c * QBLOCK, QBLOCK) for c in range(chunks)] if fuse == "scores" else [pl.ds(0, head_dim)]
    width = cols[0].size
    q = [
        backend.load(q_ref.at[b, head_rows, c], mask=row_ok(width), other=0 if padded else None).astype(dot_dtype)
        for c in cols
    ]  # [rows, width] each
    if wide:
        # Row c * rows + g of the wide query holds query g's chunk c and zeros elsewhere (block diagonal), so one
        # product with a whole [bk, D] code tile gives every chunk's partial scores: [chunks * rows, bk].
        wide_rows_ = chunks * rows
        chunk_of = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim) // QBLOCK
        diag = lax.broadcasted_iota(jnp.int32, (wide_rows_, head_dim), 0) // rows == chunk_of(
            (wide_rows_, head_dim), 1
        )  # [R, D]
        q_wide = jnp.broadcast_to(q[0][None], (chunks, rows, head_dim)).reshape(wide_rows_, head_dim)
        q_wide = jnp.where(diag, q_wide, jnp.zeros_like(q_wide))
        q_scale = None
        if fuse == "int8":
            # Each (query, chunk) row to int8 with its own scale, as llama.cpp's q8_1 x q8_0 products: the K codes
            # then enter an int8 x int8 -> int32 product as they are, with no conversion.
            qf = q_wide.astype(jnp.float32)
            amax = jnp.max(jnp.abs(qf), axis=1)  # [R]
            q_scale = amax / 127.0
            inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
            q_wide = jnp.clip(jnp.floor(qf * inv[:, None] + 0.5), -127, 127).astype(jnp.int8)
            q_scale = q_scale * scale

    def widen(x):  # [rows, ...] -> [chunks * rows, ...]: row c * rows + g is x[g]
        return jnp.broadcast_to(x[None], (chunks, *x.shape)).reshape(chunks * x.shape[0], *x.shape[1:])

    def scores_of(keys, valid):
        if wide:
            codes = k_ref[layer, b, h, keys, :]  # [bk, D] int8
            if fuse == "int8":
                part = _dot(q_wide, codes, trans_b=True, out=jnp.int32).astype(jnp.float32)  # [R, bk]
                part = part * q_scale[:, None]
                k_scale = scale_tile(k_scale_ref, keys)  # [D/32, bk]
            else:
                part = _dot(q_wide, codes.astype(dot_dtype), trans_b=True)  # [R, bk] float32
                k_scale = scale_tile(k_scale_ref, keys) * scale
            return jnp.sum(part.reshape(chunks, rows, block_k) * k_scale[:, None, :], axis=0)  # [rows, bk]
        if fuse == "tiles":
            scales = (scale_tile(k_scale_ref, keys) * scale).T  # [bk, D/32]
            k = _dequant_tile(k_ref[layer, b, h, keys, :], scales, dot_dtype)  # [bk, D]
            return _dot(q[0], k, trans_b=True)  # [Gp, bk]
        s = jnp.zeros((rows, block_k), jnp.float32)
        for c, col in enumerate(cols):
            codes = k_ref[layer, b, h, keys, col]  # [bk, 32] int8
            k_scale = scale_col(k_scale_ref, keys, c) * scale  # [bk]
            s += _dot(q[c], codes.astype(dot_dtype), trans_b=True) * k_scale[None, :]  # [Gp, bk]
        return s

    def values_of(p, keys, valid):
        if wide:
            v_scale = scale_tile(v_scale_ref, keys)  # [D/32, bk]
            if valid is not None:
                v_scale = jnp.where(valid[None, :], v_scale, 0.0)
            # Row c * rows + g: query g's probabilities times chunk c's value scales; its product with the whole
            # code tile is right in chunk c's columns (the rest is dropped once, at the end).
            p_wide = (p[None] * v_scale[:, None, :]).reshape(chunks * rows, block_k).astype(dot_dtype)
            return [_dot(p_wide, v_ref[layer, b, h, keys, :].astype(dot_dtype))]  # [R, D]
        if fuse == "tiles":
            scales = scale_tile(v_scale_ref, keys).T  # [bk, D/32]
            if valid is not None:
                scales = jnp.where(valid[:, None], scales, 0.0)
            v = _dequant_tile(v_ref[layer, b, h, keys, :], scales, dot_dtype)  # [bk, D]
            return [_dot(p.astype(dot_dtype), v)]  # [Gp, D]
        out = []
        for c, col in enumerate(cols):
            v_scale = scale_col(v_scale_ref, keys, c)  # [bk]
            if valid is not None:
                v_scale = jnp.where(valid, v_scale, 0.0)
            codes = v_ref[layer, b, h, keys, col]  # [bk, 32] int8
            out.append(_dot((p * v_scale[None, :]).astype(dot_dtype), codes.astype(dot_dtype)))  # [Gp, 32]
        return out

    def attend(carry, start, valid):
        m, denom, acc = carry  # running max [rows], sum [rows], output slices [rows or R, width]; float32
        keys = pl.ds(start, block_k)
        s = scores_of(keys, valid)
        if valid is not None:  # unused positions may hold NaN scales: where(), never a multiply, masks them
            s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
        p = jnp.exp(s - m_new[:, None])  # [rows, bk]
        pv = values_of(p, keys, valid)
        acc_alpha = widen(alpha) if wide else alpha
        acc = tuple(a * acc_alpha[:, None] + x for a, x in zip(acc, pv, strict=True))
        return m_new, denom * alpha + jnp.sum(p, axis=1), acc

    def full_block(i, carry):
        return attend(carry, pl.multiple_of(i * block_k, block_k), None)

    def tail_block(carry):
        start = n_full * block_k
        window = jnp.minimum(start, max_len - block_k)  # slide back so the load stays inside S
        pos = window + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        return attend(carry, window, (pos >= start) & (pos < n))

    acc_rows = chunks * rows if wide else rows
    carry = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        tuple(jnp.zeros((acc_rows, width), jnp.float32) for _ in cols),
    )
    carry = lax.fori_loop(lo, jnp.minimum(hi, n_full), full_block, carry)
    has_tail = (lo <= n_full) & (n_full < hi)
    m, denom, acc = lax.cond(has_tail, tail_block, lambda c: c, carry)
    if wide:  # keep each row block's own chunk: [R, D] -> [rows, D]
        (a,) = acc
        acc = (jnp.sum(jnp.where(diag, a, 0.0).reshape(chunks, rows, head_dim), axis=0),)

    vec_ok = lax.broadcasted_iota(jnp.int32, (rows,), 0) < group if padded else None
    if num_splits == 1:
        (o_ref,) = out_refs
        inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)  # length 0: zeros
        for a, col in zip(acc, cols, strict=True):
            backend.store(o_ref.at[b, head_rows, col], (a * inv[:, None]).astype(o_ref.dtype), mask=row_ok(width))
    else:
        acc_ref, m_ref, denom_ref = out_refs
        for a, col in zip(acc, cols, strict=True):
            backend.store(acc_ref.at[b, j, head_rows, col], a, mask=row_ok(width))
        backend.store(m_ref.at[b, j, head_rows], m, mask=vec_ok)
        backend.store(denom_ref.at[b, j, head_rows], denom, mask=vec_ok)


def kernel_options(q_dtype, group: int, head_dim: int, block_k: int, num_splits: int, scale: float, fuse: str) -> dict:
    """The static arguments of :func:`decode_kernel` but ``num_poison`` and ``scales_t`` (shared with the paged
    Q8 kernel)."""
    rows = wide_rows(group, head_dim // QBLOCK) if fuse in WIDE else group_rows(group)
    return dict(
        group=group,
        rows=rows,
        block_k=block_k,
        num_splits=num_splits,
        scale=scale,
        dot_dtype=dot_dtype_for(q_dtype),
        fuse=fuse,
    )


def dot_dtype_for(q_dtype) -> jnp.dtype:
    """Operand dtype of the kernel's products: a 16-bit query keeps its dtype; float32 runs as tf32 on GPU."""
    q_dtype = jnp.dtype(q_dtype)
    return q_dtype if q_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.dtype(jnp.float32)


# Where the scales enter: "scores" multiplies each 32-wide chunk's partial product by its scales (codes go to
# the tensor cores as they are); "tiles" dequantizes each [bk, D] K/V tile in registers, then one product each;
# "wide" makes one product per K/V tile with a block-diagonal query (row c * Gs + g holds query g's chunk c), the
# scales folded into its [D/32 * Gs, bk] result; "int8" is "wide" with the query rounded to int8 per (row, chunk)
# and an int8 x int8 -> int32 score product (an extra rounding of q: opt-in).
FUSE = ("scores", "tiles", "wide", "int8")
WIDE = ("wide", "int8")
DEFAULT_FUSE = "wide"


@functools.partial(jax.jit, static_argnames=("scale", "config", "fuse", "interpret", "poison", "scales_t"))
def _decode(
    q, k, k_scale, v, v_scale, lengths, layer, *, scale, config: DecodeConfig, fuse, interpret, poison, scales_t=False
):
    # q [B, N, D]; k, v int8[L, B, K, S, D]; scales [L, B, K, S, D // 32] ([L, B, K, D // 32, S] with scales_t);
    # lengths int32[B]; layer int32[1]
    _, batch, kv_heads, _, head_dim = k.shape
    num_heads = q.shape[1]
    group = num_heads // kv_heads
    splits = config.num_splits
    out_shape = bf16_kernel.split_out_shape(q, splits, config.merge)
    inputs = [lengths, layer, q, k, k_scale, v, v_scale]
    num_in = len(inputs)
    if poison:  # NaN-filled buffers become the outputs: whatever the kernel fails to write stays NaN
        inputs += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
    kernel = functools.partial(
        decode_kernel,
        num_poison=len(inputs) - num_in,
        **kernel_options(q.dtype, group, head_dim, config.block_k, splits, scale, fuse),
        scales_t=scales_t,
    )
    aliases = {num_in + i: i for i in range(len(inputs) - num_in)}
    grid = (batch, kv_heads, splits)
    return bf16_kernel.launch_split_kernel(
        kernel, inputs, out_shape, aliases, grid, config, interpret, "jkv_q8_decode_attention", splits > 1, q.dtype
    )


def check_args(q, k, k_scale, v, v_scale, lengths, layer=None) -> tuple[int, int, int, int, int]:
    """Validate :func:`decode_attention`'s arguments; return ``(B, N, K, S, D)``."""
    check_q8("k", k, k_scale)
    check_q8("v", v, v_scale)
    if v.shape != k.shape or v_scale.dtype != k_scale.dtype:
        raise ValueError(
            f"k and v must have the same shape and scale dtype, got {k.shape}/{k_scale.dtype} and "
            f"{v.shape}/{v_scale.dtype}"
        )
    # Shapes, GQA, head_dim, lengths and layer as for the bf16 kernel, on stand-ins of the dequantized cache.
    stand_in = jax.ShapeDtypeStruct(k.shape, jnp.bfloat16)
    return bf16_kernel.check_args(q, stand_in, stand_in, lengths, layer)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _whole(shape):
    """A BlockSpec that hands the kernel the whole array, whatever the program."""
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _resolve_config(default: DecodeConfig, max_len: int, head_dim: int, **overrides) -> DecodeConfig:
    """The default with the caller's launch overrides, validated as the bf16 kernel validates them; stages are
    capped so the resident int8 K/V blocks fit the bf16 kernel's shared-memory budget."""
    bf16_kernel.check_launch_overrides(**overrides)
    block_k = overrides["block_k"]
    top = max(max_len, bf16_kernel.MIN_BLOCK)
    if block_k is not None and (block_k < bf16_kernel.MIN_BLOCK or block_k & (block_k - 1) or block_k > top):
        raise ValueError(f"{block_k=} must be a power of two in [{bf16_kernel.MIN_BLOCK}, max(S, 16)={top}]")
    config = default._replace(**{k: int(v) for k, v in overrides.items() if v is not None})
    return config._replace(num_stages=min(config.num_stages, bf16_kernel.max_stages(config.block_k, head_dim, 1)))


# Launch parameters from sweeps on an H100 at B x T = 32 x 4096 (N=32, K=8, D=128; docs/quant.md). "wide": 64 keys,
# 4 warps, 3 stages: 105 us (32 keys, 2 warps: 106 us; 128 keys, 4 warps: 120 us). The per-chunk "scores" fusion
# it replaced was best at 32 keys, 2 warps (139 us), "tiles" at 128 keys, 4 warps (146 us).
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 3
# Splits, fitted to the H100 measurements of docs/BENCHMARKS.md ("Q8 cache"; best split count of each shape, three
# runs): with at least one (b, kv head) program per multiprocessor, the bf16 kernel's rule (about four programs per
# multiprocessor: 3 splits at 32 x 4096, 2 at 64 x 8192, each ~4 % faster than half as many); with fewer, about
# two programs per multiprocessor, rounded down (4 splits at 8 x 16384: 96-103 us against 110-113 us with the bf16
# rule's 9 and 117-120 us with 5; 33 at 1 x 32768: 34.5 us against 40 us with 66), each split at least 256 keys.
SPLIT_KEYS = 128


def decode_config(
    batch: int, num_kv_heads: int, max_len: int, head_dim: int, block_k: int | None = None
) -> DecodeConfig:
    """Launch parameters: ``BLOCK_K`` keys per step (fewer for a shorter cache), ``NUM_WARPS``, ``NUM_STAGES``;
    splits as the comment above ``SPLIT_KEYS`` says. ``block_k`` fixes the keys per step instead (the paged Q8
    kernel's whole pages); the splits and stages follow it."""
    if block_k is None:
        block_k = max(bf16_kernel.MIN_BLOCK, min(BLOCK_K, 1 << (max(max_len, 1).bit_length() - 1)))
    sms, programs = backend.num_multiprocessors(), batch * num_kv_heads
    split_keys = max(block_k, SPLIT_KEYS)
    if programs >= sms:
        splits = bf16_kernel.choose_num_splits(batch, num_kv_heads, max_len, split_keys, sms)
    else:
        most = max(1, pl.cdiv(max_len, split_keys) // 2)
        splits = max(1, min(2 * sms // programs, most))
    default = bf16_kernel.decode_config(batch, num_kv_heads, max_len, head_dim, jnp.bfloat16)
    stages = min(NUM_STAGES, bf16_kernel.max_stages(block_k, head_dim, 1))
    return default._replace(block_k=block_k, num_splits=splits, num_warps=NUM_WARPS, num_stages=stages)


def decode_attention(
    q: Float[Array, "B N D"],
    k: Int8[Array, "*L B K S D"],
    k_scale: Float[Array, "*L B K S D//32"],
    v: Int8[Array, "*L B K S D"],
    v_scale: Float[Array, "*L B K S D//32"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    interpret: bool | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fuse: str | None = None,
    poison: bool = False,
) -> Float[Array, "B N D"]:
    """Decode attention over a Q8 cache: one query per sequence over its first ``lengths[b]`` positions.

    Arguments as for ``pallas_kernels.decode_attention.decode_attention``, with each of K and V given as codes
    and scales (one layer ``[B, K, S, ...]`` or a whole ``[L, B, K, S, ...]`` cache with ``layer``). The
    products run in ``q``'s dtype when it is bfloat16 or float16, in tf32 (GPU) or float32 (interpret) for a
    float32 ``q``; softmax and accumulation in float32. ``fuse`` picks where the scales enter (``FUSE``; default
    ``DEFAULT_FUSE``).
    """
    b, _, kh, s, d = check_args(q, k, k_scale, v, v_scale, lengths, layer)
    interpret = backend.resolve_interpret(interpret)
    scale = bf16_kernel.softmax_scale(scale, d)
    fuse = DEFAULT_FUSE if fuse is None else fuse
    if fuse not in FUSE:
        raise ValueError(f"fuse={fuse!r} is not one of {FUSE}")
    config = _resolve_config(
        decode_config(b, kh, s, d),
        s,
        d,
        block_k=block_k,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if k.ndim == 4:
        k, k_scale, v, v_scale, layer = k[None], k_scale[None], v[None], v_scale[None], 0  # free reshapes
    if s < bf16_kernel.MIN_BLOCK:  # a tiny cache: pad it to one whole block (copies at most 15 positions per slab)
        pad = [(0, 0)] * 3 + [(0, bf16_kernel.MIN_BLOCK - s), (0, 0)]
        k, k_scale, v, v_scale = (jnp.pad(x, pad) for x in (k, k_scale, v, v_scale))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    options = dict(scale=float(scale), config=config, fuse=fuse, interpret=interpret, poison=poison)
    return _decode(q, k, k_scale, v, v_scale, lengths, layer, **options)


def decode_attention_reference(
    q: Float[Array, "B N D"],
    k: Int8[Array, "*L B K S D"],
    k_scale: Float[Array, "*L B K S D//32"],
    v: Int8[Array, "*L B K S D"],
    v_scale: Float[Array, "*L B K S D//32"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    interpret: bool | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
) -> Float[Array, "B N D"]:
    """Pure-``jnp`` reference with the kernel's signature: dequantize to float32, then the bf16 kernel's
    reference attention (float32, highest precision). Launch arguments are accepted and ignored."""
    del interpret, block_k, num_splits
    check_args(q, k, k_scale, v, v_scale, lengths, layer)
    if k.ndim == 5:
        k, k_scale, v, v_scale = k[layer], k_scale[layer], v[layer], v_scale[layer]
    k = dequantize_reference(k, k_scale, dtype=jnp.float32)
    v = dequantize_reference(v, v_scale, dtype=jnp.float32)
    return bf16_kernel.decode_attention_reference(q, k, v, lengths, scale=scale)
