"""Multi-token causal attention over Q8 and FP8 caches, contiguous and paged: ``pallas_kernels.multi_token``'s
kernel with the dequantization inside its products.

* Q8: int8 codes ``[..., D]`` and one float16/float32 scale per 32 values along ``D`` (``[..., D // 32]``); the
  scores of each 32-value chunk are weighted by its K scales, the probabilities by each chunk's V scales.
* FP8: float8_e4m3fn values ``[..., D]`` and one float32 scale per position and kv head (``[..., 1]``), applied
  to the scores and to the probabilities.

Codes and e4m3 values enter the products exactly (they fit bf16, f16 and tf32); the products run in ``q``'s dtype
(bf16 / f16; float32 for a float32 ``q``, tf32 on the GPU), softmax and accumulation in float32. A cache is read
in its stored basis: the caller of a Hadamard-rotated Q8 cache rotates ``q`` and the output.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int, Int8

from pallas_kernels.checks import check_pairs, check_q8_pair
from pallas_kernels.multi_token import FP8, Q8, run
from pallas_kernels.multi_token_args import MultiTokenConfig, check_args, check_fp8_pair


def _quantized(fmt, check, q, pools, block_tables, q_starts, lengths, counts, **options):
    k_vals, v_vals = check_pairs(check, *pools)
    keys = ("layer", "window", "softcap")
    dims = check_args(
        q, k_vals, v_vals, q_starts, lengths, counts, block_tables=block_tables, **{n: options[n] for n in keys}
    )
    return run(q, pools, block_tables, q_starts, lengths, counts, dims, fmt=fmt, **options)


def q8_multi_token_attention(
    q: Float[Array, "T N D"],
    k: Int8[Array, "*L B K S D"],
    k_scale: Float[Array, "*L B K S D//32"],
    v: Int8[Array, "*L B K S D"],
    v_scale: Float[Array, "*L B K S D//32"],
    q_starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    counts: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    config: MultiTokenConfig | None = None,
    interpret: bool | None = None,
) -> Float[Array, "T N D"]:
    """``multi_token.multi_token_attention`` over a Q8 cache: codes ``[*L, B, K, S, D]`` and float16/float32
    scales ``[*L, B, K, S, D // 32]`` for each of K and V, dequantized inside the products."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap, config=config, interpret=interpret)
    return _quantized(Q8, check_q8_pair, q, (k, k_scale, v, v_scale), None, q_starts, lengths, counts, **options)


def fp8_multi_token_attention(
    q: Float[Array, "T N D"],
    k: Float[Array, "*L B K S D"],
    k_scale: Float[Array, "*L B K S 1"],
    v: Float[Array, "*L B K S D"],
    v_scale: Float[Array, "*L B K S 1"],
    q_starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    counts: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    config: MultiTokenConfig | None = None,
    interpret: bool | None = None,
) -> Float[Array, "T N D"]:
    """``multi_token.multi_token_attention`` over an FP8 cache: float8_e4m3fn values ``[*L, B, K, S, D]`` and
    float32 scales ``[*L, B, K, S, 1]`` for each of K and V, dequantized inside the products."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap, config=config, interpret=interpret)
    return _quantized(FP8, check_fp8_pair, q, (k, k_scale, v, v_scale), None, q_starts, lengths, counts, **options)


def paged_q8_multi_token_attention(
    q: Float[Array, "T N D"],
    k_pages: Int8[Array, "*L P K page D"],
    k_scale_pages: Float[Array, "*L P K page D//32"],
    v_pages: Int8[Array, "*L P K page D"],
    v_scale_pages: Float[Array, "*L P K page D//32"],
    block_tables: Int[Array, "B M"],
    q_starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    counts: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    config: MultiTokenConfig | None = None,
    interpret: bool | None = None,
) -> Float[Array, "T N D"]:
    """:func:`q8_multi_token_attention` over Q8 pages (codes and scale pools), through the block table."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap, config=config, interpret=interpret)
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    return _quantized(Q8, check_q8_pair, q, pools, block_tables, q_starts, lengths, counts, **options)


def paged_fp8_multi_token_attention(
    q: Float[Array, "T N D"],
    k_pages: Float[Array, "*L P K page D"],
    k_scale_pages: Float[Array, "*L P K page 1"],
    v_pages: Float[Array, "*L P K page D"],
    v_scale_pages: Float[Array, "*L P K page 1"],
    block_tables: Int[Array, "B M"],
    q_starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    counts: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    config: MultiTokenConfig | None = None,
    interpret: bool | None = None,
) -> Float[Array, "T N D"]:
    """:func:`fp8_multi_token_attention` over FP8 pages (values and scale pools), through the table."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap, config=config, interpret=interpret)
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    return _quantized(FP8, check_fp8_pair, q, pools, block_tables, q_starts, lengths, counts, **options)
