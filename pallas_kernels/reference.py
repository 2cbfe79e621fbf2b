"""Every kernel's pure-``jnp`` reference, with the kernel's signature (launch arguments accepted and ignored) and
its argument checks. Computed in float32 at the highest matmul precision; positions past ``lengths[b]`` may hold
anything, NaN included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Int8

from pallas_kernels import checks, common, decode, decode_fp8, decode_q8, dequantize, formats, paged, paged_q8
from pallas_kernels.checks import check_pairs, check_q8_pair
from pallas_kernels.multi_token_args import check_args as check_multi_token
from pallas_kernels.multi_token_args import check_fp8_pair


def combine_splits(
    m: Float[Array, "... P G"], denom: Float[Array, "... P G"], acc: Float[Array, "... P G D"]
) -> Float[Array, "... G D"]:
    """Merge split-K partials over axis P: running maxima ``m``, softmax denominators ``denom`` (sums of
    ``exp(s - m)``) and unnormalised outputs ``acc`` (sums of ``exp(s - m) * v``).

    A split that saw no position has ``m = -inf, denom = 0, acc = 0`` and drops out; when every split is empty
    (length 0) the result is zero. Computed in float32.
    """
    m, denom, acc = (x.astype(jnp.float32) for x in (m, denom, acc))
    m_max = jnp.max(m, axis=-2, keepdims=True)  # (..., 1, G)
    weight = jnp.exp(m - jnp.where(jnp.isfinite(m_max), m_max, 0.0))  # (..., P, G); exp(-inf) = 0
    total = jnp.sum(weight * denom, axis=-2)  # (..., G)
    out = jnp.sum(weight[..., None] * acc, axis=-3)  # (..., G, D)
    return out * jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)[..., None]


def merge_partials_reference(acc, m, denom=None, *, splits: int, dtype, interpret=None):
    """``common.merge_partials`` in plain ``jnp``."""
    del interpret
    if denom is None:
        m, denom = m[..., 0], m[..., 1]
    return combine_splits(*(x[:, :splits] for x in (m, denom, acc))).astype(dtype)


def decode_attention_reference(
    q: Float[Array, "B N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    **launch,
) -> Float[Array, "B N D"]:
    """``decode.decode_attention`` (and ``decode_mgpu.decode_attention_mgpu``, ``dispatch.decode_attention_auto``)."""
    del launch
    *_, s, _ = checks.check_args(q, k, v, lengths, layer, chunked=True)
    checks.check_window_softcap(window, softcap)
    if k.ndim == 5:
        k, v = k[layer], v[layer]
    lengths = jnp.asarray(lengths)
    pos = jnp.arange(s)[None, :]
    valid = pos < lengths[:, None]  # (B, S)
    if window is not None:
        valid &= pos >= lengths[:, None] - window
    kz, vz = (jnp.where(valid[:, None, :, None], x.astype(jnp.float32), 0.0) for x in (k, v))
    return _attend_rows(q, kz, vz, valid, scale=scale, softcap=softcap)


def _attend_rows(q, k, v, valid, *, scale, softcap):
    """Query row ``r`` of ``q [R, N, D]`` attends to the positions ``valid [R, S]`` of its own ``k``, ``v``
    ``[R, K, S, D]`` (float32, zero where not valid) at the highest precision; a row with none gives zeros."""
    r, n, d = q.shape
    hi = lax.Precision.HIGHEST
    qg = q.astype(jnp.float32).reshape(r, k.shape[1], n // k.shape[1], d)  # (R, K, G, D)
    scale = d**-0.5 if scale is None else scale
    scores = common.softcapped(jnp.einsum("rkgd,rksd->rkgs", qg, k, precision=hi) * scale, softcap)
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))  # (R, K, G, S); masked positions give 0
    out = jnp.einsum("rkgs,rksd->rkgd", p, v, precision=hi)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = out * jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out.reshape(r, n, d).astype(q.dtype)


def decode_attention_append_reference(
    q: Float[Array, "B N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    lengths: Int[Array, " B"],
    k_new: Float[Array, "B K D"],
    v_new: Float[Array, "B K D"],
    *,
    append=None,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    **launch,
) -> tuple[Float[Array, "B N D"], Float[Array, "*L B K S D"], Float[Array, "*L B K S D"]]:
    """``decode.decode_attention_append``: an XLA scatter of the new rows, then the attention reference."""
    del launch
    b, *_ = decode.check_append_args(q, k, v, lengths, k_new, v_new, append, layer)
    append = jnp.ones((b,), jnp.int32) if append is None else jnp.asarray(append).astype(jnp.int32)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    k, v = decode.write_rows(k, v, k_new, v_new, lengths, append, layer)
    return decode_attention_reference(q, k, v, lengths, layer=layer, scale=scale, window=window, softcap=softcap), k, v


def gather_pages(pages: Array, block_tables: Array) -> Array:
    """``[P, K, page_size, D]`` pages in table order: contiguous ``[B, K, M * page_size, D]`` (entries < 0 read
    page 0, for the caller to mask)."""
    x = pages[jnp.clip(block_tables, 0, pages.shape[0] - 1)]  # (B, M, K, page_size, D)
    b, m, kh, ps, d = x.shape
    return x.swapaxes(1, 2).reshape(b, kh, m * ps, d)


def paged_decode_attention_reference(
    q: Float[Array, "B N D"],
    k_pages: Float[Array, "*L P K page D"],
    v_pages: Float[Array, "*L P K page D"],
    block_tables: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    **launch,
) -> Float[Array, "B N D"]:
    """``paged.paged_decode_attention``: gather the pages into a contiguous cache (an XLA gather of every table
    entry) and run the contiguous reference."""
    del launch
    paged.check_args(q, k_pages, v_pages, block_tables, lengths, layer, window, chunked=True)
    if k_pages.ndim == 5:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    k, v = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    return decode_attention_reference(q, k, v, lengths, scale=scale, window=window, softcap=softcap)


def dequantize_q8_reference(
    codes: Int8[Array, "... D"], scales: Float[Array, "... D//32"], *, dtype=jnp.bfloat16, **launch
) -> Float[Array, "... D"]:
    """``dequantize.dequantize_q8``: codes times their block's scale, in float32, as ``dtype``."""
    del launch
    checks.check_q8("dequantize", codes, scales)
    blocks = codes.astype(jnp.float32).reshape(*codes.shape[:-1], -1, decode_q8.QBLOCK)  # (..., D/32, 32)
    out = blocks * scales.astype(jnp.float32)[..., None]
    return out.reshape(codes.shape).astype(dequantize.out_dtype(dtype))


def q8_decode_attention_reference(
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
    **launch,
) -> Float[Array, "B N D"]:
    """``decode_q8.q8_decode_attention``: dequantize to float32, then the bf16 kernel's reference."""
    del launch
    decode_q8.check_args(q, k, k_scale, v, v_scale, lengths, layer)
    return _quantized_decode("q8", q, (k, k_scale, v, v_scale), None, lengths, layer, scale, window, softcap)


def paged_q8_decode_attention_reference(
    q: Float[Array, "B N D"],
    k_pages: Int8[Array, "*L P K page D"],
    k_scale_pages: Float[Array, "*L P K page D//32"],
    v_pages: Int8[Array, "*L P K page D"],
    v_scale_pages: Float[Array, "*L P K page D//32"],
    block_tables: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    **launch,
) -> Float[Array, "B N D"]:
    """``paged_q8.paged_q8_decode_attention``: gather the pages (codes and scales), dequantize to float32 and run
    the contiguous reference."""
    del launch
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    paged_q8.check_args(q, *pools, block_tables, lengths, layer, window)
    return _quantized_decode("q8", q, pools, block_tables, lengths, layer, scale, window, softcap)


def fp8_decode_attention_reference(
    q, k, k_scale, v, v_scale, lengths, *, layer=None, scale=None, window=None, softcap=None, **launch
):
    """``decode_fp8.fp8_decode_attention``: dequantize to float32, then the bf16 kernel's reference."""
    del launch
    decode_fp8.check_args(q, k, k_scale, v, v_scale, lengths, layer)
    return _quantized_decode("fp8", q, (k, k_scale, v, v_scale), None, lengths, layer, scale, window, softcap)


def paged_fp8_decode_attention_reference(
    q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_tables, lengths, *, layer=None, scale=None,
    window=None, softcap=None, **launch,
):  # fmt: skip
    """``decode_fp8.paged_fp8_decode_attention``: gather the pages (values and scales), dequantize to float32 and
    run the contiguous reference."""
    del launch
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    decode_fp8.check_paged_args(q, *pools, block_tables, lengths, layer, window)
    return _quantized_decode("fp8", q, pools, block_tables, lengths, layer, scale, window, softcap)


def _quantized_decode(fmt, q, arrays, block_tables, lengths, layer, scale, window, softcap):
    """A checked Q8 / FP8 decode call's reference: ``layer``'s arrays (pages gathered through ``block_tables``
    when given), dequantized to float32, then :func:`decode_attention_reference`."""
    if arrays[0].ndim == 5:
        arrays = tuple(x[layer] for x in arrays)
    if block_tables is not None:
        arrays = tuple(gather_pages(x, block_tables) for x in arrays)
    k, k_scale, v, v_scale = arrays
    if fmt == "q8":
        k, v = (dequantize_q8_reference(x, s, dtype=jnp.float32) for x, s in ((k, k_scale), (v, v_scale)))
    else:
        k, v = formats.dequantize_fp8(k, k_scale, jnp.float32), formats.dequantize_fp8(v, v_scale, jnp.float32)
    return decode_attention_reference(q, k, v, lengths, scale=scale, window=window, softcap=softcap)


def _multi_token(q, k, v, q_starts, lengths, counts, *, scale, window, softcap):
    """The multi-token step over one layer's values ``k, v [B, K, S, D]`` (float32): each query row gathers its
    sequence's keys (``[T, K, S, D]``: a test oracle, not a prefill path). NaN outside the positions some query
    of a sequence reads never reaches the output."""
    t = q.shape[0]
    s = k.shape[2]
    rows = jnp.arange(t)
    inside = (rows[None, :] >= q_starts[:, None]) & (rows[None, :] < (q_starts + counts)[:, None])  # (B, T)
    owned, owner = inside.any(axis=0), jnp.argmax(inside, axis=0)
    pos = lengths[owner] + rows - q_starts[owner]  # (T,)
    first = jnp.zeros_like(lengths) if window is None else jnp.maximum(lengths - window + 1, 0)
    at = jnp.arange(s)
    readable = (at[None, :] >= first[:, None]) & (at[None, :] < (lengths + counts)[:, None])  # (B, S)
    k, v = (jnp.where(readable[:, None, :, None], x.astype(jnp.float32), 0.0) for x in (k, v))
    valid = owned[:, None] & (at[None, :] <= pos[:, None])  # (T, S)
    if window is not None:
        valid &= at[None, :] > pos[:, None] - window
    return _attend_rows(q, k[owner], v[owner], valid, scale=scale, softcap=softcap)


@functools.partial(jax.jit, static_argnames=("fmt", "scale", "window", "softcap"))
def _multi_token_values(q, arrays, block_tables, layer, q_starts, lengths, counts, *, fmt, scale, window, softcap):
    """One layer's K and V values (pages gathered, quantized ones decoded to float32), then the step: compiled
    once rather than run op by op."""
    if arrays[0].ndim == 5:
        arrays = tuple(x[layer] for x in arrays)
    if block_tables is not None:
        arrays = tuple(gather_pages(x, block_tables) for x in arrays)
    if fmt != "plain":
        decode_fn = formats.dequantize_q8 if fmt == "q8" else formats.dequantize_fp8
        k, k_scale, v, v_scale = arrays
        arrays = decode_fn(k, k_scale, jnp.float32), decode_fn(v, v_scale, jnp.float32)
    return _multi_token(q, *arrays, q_starts, lengths, counts, scale=scale, window=window, softcap=softcap)


def _multi_token_reference(fmt, q, arrays, block_tables, q_starts, lengths, counts, layer, scale, window, softcap):
    checks = dict(layer=layer, window=window, softcap=softcap, block_tables=block_tables)
    if fmt == "plain":
        check_multi_token(q, *arrays, q_starts, lengths, counts, **checks)
    else:
        pair_check = check_q8_pair if fmt == "q8" else check_fp8_pair
        check_multi_token(q, *check_pairs(pair_check, *arrays), q_starts, lengths, counts, **checks)
    ints = lambda x: None if x is None else jnp.asarray(x).astype(jnp.int32)
    step = (ints(block_tables), ints(0 if layer is None else layer), ints(q_starts), ints(lengths), ints(counts))
    options = dict(fmt=fmt, scale=None if scale is None else float(scale), window=window, softcap=softcap)
    return _multi_token_values(q, tuple(arrays), *step, **options)


def multi_token_attention_reference(
    q, k, v, q_starts, lengths, counts, *, layer=None, scale=None, window=None, softcap=None, **launch
):
    """``multi_token.multi_token_attention`` in plain ``jnp``."""
    del launch
    args = (q_starts, lengths, counts, layer, scale, window, softcap)
    return _multi_token_reference("plain", q, (k, v), None, *args)


def paged_multi_token_attention_reference(
    q, k_pages, v_pages, block_tables, q_starts, lengths, counts, *, layer=None, scale=None, window=None,
    softcap=None, **launch,
):  # fmt: skip
    """``multi_token_paged.paged_multi_token_attention``: the pages gathered in XLA, then as contiguous."""
    del launch
    args = (q_starts, lengths, counts, layer, scale, window, softcap)
    return _multi_token_reference("plain", q, (k_pages, v_pages), block_tables, *args)


def q8_multi_token_attention_reference(
    q, k, k_scale, v, v_scale, q_starts, lengths, counts, *, layer=None, scale=None, window=None, softcap=None,
    **launch,
):  # fmt: skip
    """``multi_token_quant.q8_multi_token_attention``: dequantized to float32, then as Plain."""
    del launch
    args = (q_starts, lengths, counts, layer, scale, window, softcap)
    return _multi_token_reference("q8", q, (k, k_scale, v, v_scale), None, *args)


def fp8_multi_token_attention_reference(
    q, k, k_scale, v, v_scale, q_starts, lengths, counts, *, layer=None, scale=None, window=None, softcap=None,
    **launch,
):  # fmt: skip
    """``multi_token_quant.fp8_multi_token_attention``: dequantized to float32, then as Plain."""
    del launch
    args = (q_starts, lengths, counts, layer, scale, window, softcap)
    return _multi_token_reference("fp8", q, (k, k_scale, v, v_scale), None, *args)


def paged_q8_multi_token_attention_reference(
    q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_tables, q_starts, lengths, counts, *, layer=None,
    scale=None, window=None, softcap=None, **launch,
):  # fmt: skip
    """``multi_token_quant.paged_q8_multi_token_attention``: pages gathered, dequantized, then as Plain."""
    del launch
    args = (q_starts, lengths, counts, layer, scale, window, softcap)
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    return _multi_token_reference("q8", q, pools, block_tables, *args)


def paged_fp8_multi_token_attention_reference(
    q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_tables, q_starts, lengths, counts, *, layer=None,
    scale=None, window=None, softcap=None, **launch,
):  # fmt: skip
    """``multi_token_quant.paged_fp8_multi_token_attention``: pages gathered, dequantized, then as Plain."""
    del launch
    args = (q_starts, lengths, counts, layer, scale, window, softcap)
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    return _multi_token_reference("fp8", q, pools, block_tables, *args)


def residual_rms_norm_reference(x, y, weight, *, eps: float, dtype=jnp.float32, **launch):
    """``rms_norm.residual_rms_norm``: the same three outputs in plain JAX."""
    del launch
    s = x.astype(jnp.float32) if y is None else x.astype(jnp.float32) + y.astype(jnp.float32)
    scale = lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + eps)
    return s, (s * weight.astype(jnp.float32)).astype(dtype), scale
