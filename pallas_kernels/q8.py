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
from pallas_kernels.decode_attention import DecodeConfig, combine_splits, group_rows

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
    inputs, in_specs = [codes, scales], [bf16_kernel._whole(codes.shape), bf16_kernel._whole(scales.shape)]
    aliases = {}
    if poison:  # the output starts as NaN: whatever the kernel fails to write stays NaN
        aliases[len(inputs)] = 0
        inputs.append(jnp.full(out_shape.shape, jnp.nan, dtype))
        in_specs.append(bf16_kernel._whole(out_shape.shape))
    kernel = functools.partial(_dequant_kernel, num_poison=len(aliases), block_rows=block_rows)
    return backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=4,
        num_stages=1,
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=in_specs,
        out_specs=bf16_kernel._whole(out_shape.shape),
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
        block_rows = min(DEQUANT_BLOCK_ROWS, bf16_kernel._pow2_floor(rows))
    elif not bf16_kernel._is_int(block_rows) or block_rows < 1 or block_rows & (block_rows - 1) or block_rows > rows:
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


def _dot(a, b, trans_b=False):
    """``a @ b`` (``a @ b.T`` with ``trans_b``) accumulated in float32; default precision (tf32 for float32 on
    the GPU lowering, exact float32 in interpret mode)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _q8_decode_kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    q_ref,  # [Gp, D]: this program's query tile
    k_ref,  # [L, B, K, S, D] int8: the whole cache; the program reads its own (layer, b, kv head) slab
    k_scale_ref,  # [L, B, K, S, D // 32]
    v_ref,  # [L, B, K, S, D] int8
    v_scale_ref,  # [L, B, K, S, D // 32]
    # (poison inputs, aliased to the outputs and never read), then outputs:
    # o [Gp, D] (one split), or acc [Gp, D], m [Gp], l [Gp]
    *refs,
    num_poison: int,
    block_k: int,
    num_splits: int,
    scale: float,
    dot_dtype,
):
    out_refs = refs[num_poison:]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_layers, _, _, max_len, head_dim = k_ref.shape
    chunks = head_dim // QBLOCK
    rows = q_ref.shape[0]
    # Lengths and layer were validated on the host when concrete; the clamps only keep traced values in bounds.
    n = jnp.clip(lengths_ref[b], 0, max_len)
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)

    num_blocks = pl.cdiv(n, block_k)
    per_split = pl.cdiv(num_blocks, num_splits)
    lo = j * per_split
    hi = jnp.minimum(lo + per_split, num_blocks)
    n_full = n // block_k  # blocks whose every position is valid

    q = [q_ref[:, pl.ds(c * QBLOCK, QBLOCK)].astype(dot_dtype) for c in range(chunks)]  # chunks of [Gp, 32]

    def attend(carry, start, valid):
        m, denom, acc = carry  # running max [Gp], sum [Gp], chunks of [Gp, 32]; float32
        keys = pl.ds(start, block_k)
        s = jnp.zeros((rows, block_k), jnp.float32)
        for c in range(chunks):
            codes = k_ref[layer, b, h, keys, pl.ds(c * QBLOCK, QBLOCK)]  # [bk, 32] int8
            k_scale = k_scale_ref[layer, b, h, keys, c].astype(jnp.float32) * scale  # [bk]
            s += _dot(q[c], codes.astype(dot_dtype), trans_b=True) * k_scale[None, :]  # [Gp, bk]
        if valid is not None:  # unused positions may hold NaN scales: where(), never a multiply, masks them
            s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
        p = jnp.exp(s - m_new[:, None])  # [Gp, bk]
        new_acc = []
        for c in range(chunks):
            v_scale = v_scale_ref[layer, b, h, keys, c].astype(jnp.float32)  # [bk]
            if valid is not None:
                v_scale = jnp.where(valid, v_scale, 0.0)
            codes = v_ref[layer, b, h, keys, pl.ds(c * QBLOCK, QBLOCK)]  # [bk, 32] int8
            pv = _dot((p * v_scale[None, :]).astype(dot_dtype), codes.astype(dot_dtype))  # [Gp, 32]
            new_acc.append(acc[c] * alpha[:, None] + pv)
        return m_new, denom * alpha + jnp.sum(p, axis=1), tuple(new_acc)

    def full_block(i, carry):
        return attend(carry, pl.multiple_of(i * block_k, block_k), None)

    def tail_block(carry):
        start = n_full * block_k
        window = jnp.minimum(start, max_len - block_k)  # slide back so the load stays inside S
        pos = window + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        return attend(carry, window, (pos >= start) & (pos < n))

    carry = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        tuple(jnp.zeros((rows, QBLOCK), jnp.float32) for _ in range(chunks)),
    )
    carry = lax.fori_loop(lo, jnp.minimum(hi, n_full), full_block, carry)
    has_tail = (lo <= n_full) & (n_full < hi)
    m, denom, acc = lax.cond(has_tail, tail_block, lambda c: c, carry)

    if num_splits == 1:
        o_ref = out_refs[0]
        inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)  # length 0: zeros
        for c in range(chunks):
            o_ref[:, pl.ds(c * QBLOCK, QBLOCK)] = (acc[c] * inv[:, None]).astype(o_ref.dtype)
    else:
        acc_ref, m_ref, l_ref = out_refs[:3]
        for c in range(chunks):
            acc_ref[:, pl.ds(c * QBLOCK, QBLOCK)] = acc[c]
        m_ref[...] = m
        l_ref[...] = denom


def dot_dtype_for(q_dtype) -> jnp.dtype:
    """Operand dtype of the kernel's products: a 16-bit query keeps its dtype; float32 runs as tf32 on GPU."""
    q_dtype = jnp.dtype(q_dtype)
    return q_dtype if q_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.dtype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret", "poison"))
def _decode(q, k, k_scale, v, v_scale, lengths, layer, *, scale, config: DecodeConfig, interpret, poison):
    # q [B, N, D]; k, v int8[L, B, K, S, D]; scales [L, B, K, S, D // 32]; lengths int32[B]; layer int32[1]
    _, batch, kv_heads, _, head_dim = k.shape
    group = q.shape[1] // kv_heads
    rows = group_rows(group)
    splits = config.num_splits
    qg = q.reshape(batch, kv_heads, group, head_dim)  # (B, K, G, D)
    if rows != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))  # (B, K, Gp, D)

    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, rows, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),  # acc
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),  # m
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),  # l
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
        ]
    whole = bf16_kernel._whole
    inputs = [lengths, layer, qg, k, k_scale, v, v_scale]
    in_specs = [
        whole(lengths.shape),
        whole(layer.shape),
        pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0)),
        whole(k.shape),
        whole(k_scale.shape),
        whole(v.shape),
        whole(v_scale.shape),
    ]
    aliases = {}
    if poison:  # NaN-filled buffers become the outputs: whatever the kernel fails to write stays NaN
        for i, (shape, spec) in enumerate(zip(out_shape, out_specs, strict=True)):
            aliases[len(inputs)] = i
            inputs.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
            in_specs.append(spec)

    kernel = functools.partial(
        _q8_decode_kernel,
        num_poison=len(aliases),
        block_k=config.block_k,
        num_splits=splits,
        scale=scale,
        dot_dtype=dot_dtype_for(q.dtype),
    )
    outs = backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        grid=(batch, kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        name="jkv_q8_decode_attention",
    )(*inputs)
    out = outs[0] if splits == 1 else combine_splits(outs[1], outs[2], outs[0])  # (B, K, Gp, D)
    return out[:, :, :group].reshape(q.shape).astype(q.dtype)


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


def decode_config(batch: int, num_kv_heads: int, max_len: int, head_dim: int) -> DecodeConfig:
    """The bf16 kernel's heuristic at one byte per value: a 32 KiB block of codes (256 keys at D = 128)."""
    return bf16_kernel.decode_config(batch, num_kv_heads, max_len, head_dim, jnp.int8)


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
    poison: bool = False,
) -> Float[Array, "B N D"]:
    """Decode attention over a Q8 cache: one query per sequence over its first ``lengths[b]`` positions.

    Arguments as for ``pallas_kernels.decode_attention.decode_attention``, with each of K and V given as codes
    and scales (one layer ``[B, K, S, ...]`` or a whole ``[L, B, K, S, ...]`` cache with ``layer``). The
    products run in ``q``'s dtype when it is bfloat16 or float16, in tf32 (GPU) or float32 (interpret) for a
    float32 ``q``; softmax and accumulation in float32.
    """
    b, _, kh, s, d = check_args(q, k, k_scale, v, v_scale, lengths, layer)
    interpret = backend.resolve_interpret(interpret)
    if scale is None:
        scale = d**-0.5
    elif not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python number, got {scale!r}")
    config = bf16_kernel._resolve_config(
        decode_config(b, kh, s, d),
        s,
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
    return _decode(
        q, k, k_scale, v, v_scale, lengths, layer, scale=float(scale), config=config, interpret=interpret, poison=poison
    )


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
