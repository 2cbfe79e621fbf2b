"""GQA decode attention (T = 1) over an FP8 cache, contiguous or paged, dequantizing inside its K/V loads.

The FP8 format (``pallas_kernels.formats.quantize_fp8``): float8_e4m3fn values ``[..., D]`` and one float32 scale
per position and kv head, ``[..., 1]``; a value is ``e4m3 * scale``. A contiguous cache is ``[L, B, K, S, D]``
values with ``[L, B, K, S, 1]`` scales for K and for V; paged pools are ``[L, P, K, page_size, D]`` and
``[L, P, K, page_size, 1]``, read through the block table.

The kernels are the Q8 ones (``pallas_kernels.decode_q8``'s body, ``pallas_kernels.paged_q8``'s page views and
launch; split-K partials merged by ``common.merge_partials``) with one scale chunk of ``D`` values: the products
are the bf16 kernel's, the e4m3 tile cast exactly to the product dtype (float16 under a bf16 query: one conversion
per two values, where bf16 takes several; ``q8_tiles.dot_dtype_for``), the K scales applied to the scores and
the V scales to the probabilities. Each K/V byte is read once: ``D + 4`` bytes per
position and head instead of ``2 * D`` for bf16. Positions past a sequence's length may hold anything, NaN
included.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from pallas_kernels import common, decode_q8, paged_q8
from pallas_kernels.common import DecodeConfig
from pallas_kernels.decode_q8 import QuantFormat
from pallas_kernels.multi_token_args import check_fp8_pair
from pallas_kernels.paged import PagedConfig


def fp8_decode_config(
    batch: int, num_kv_heads: int, max_len: int, head_dim: int, block_k: int | None = None
) -> DecodeConfig:
    """Launch parameters: the bf16 kernel's keys per step (``common.choose_block_k`` for 2-byte values: the tile
    the products take is a bf16 one), then the Q8 kernel's splits, warps and stages for that block
    (``decode_q8.q8_decode_config``, without its small-head launch: 2-warp programs made FP8 at 9/3/64 slower on an
    H100, docs/BENCHMARKS.md); ``block_k`` fixes the keys per step (the paged kernel's whole pages)."""
    if block_k is None:
        block_k = common.choose_block_k(max_len, head_dim, 2)
    return decode_q8.q8_decode_config(batch, num_kv_heads, max_len, head_dim, block_k=block_k, small_heads=False)


# Base-2 softmax always (the "exp2" loop form): as the bf16 kernel's; for FP8 it also takes registers off the loop
# (bench/decode_ir.py), where Q8's vperm form would lose occupancy to it.
FP8 = QuantFormat(check_fp8_pair, fp8_decode_config, ("exp2",))


def paged_fp8_config(batch: int, num_kv_heads: int, max_pages: int, page_size: int, head_dim: int) -> PagedConfig:
    """Defaults: :func:`fp8_decode_config`'s block of keys rounded to whole pages, and its launch for that block."""
    return paged_q8.paged_q8_config(batch, num_kv_heads, max_pages, page_size, head_dim, FP8)


def check_args(q, k, k_scale, v, v_scale, lengths, layer=None) -> tuple[int, int, int, int, int]:
    """Validate :func:`fp8_decode_attention`'s arguments (and its reference's); return ``(B, N, K, S, D)``."""
    return decode_q8.check_args(q, k, k_scale, v, v_scale, lengths, layer, check_pair=check_fp8_pair)


def check_paged_args(q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_tables, lengths, layer=None,
                     window=None) -> tuple[int, int, int, int, int, int]:  # fmt: skip
    """Validate :func:`paged_fp8_decode_attention`'s arguments (and its reference's); return
    ``(B, N, K, P, page_size, D)``."""
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    return paged_q8.check_args(q, *pools, block_tables, lengths, layer, window, check_pair=check_fp8_pair)


def fp8_decode_attention(
    q: Float[Array, "B N D"], k: Float[Array, "*L B K S D"], k_scale: Float[Array, "*L B K S 1"],
    v: Float[Array, "*L B K S D"], v_scale: Float[Array, "*L B K S 1"], lengths: Int[Array, " B"], *, layer=None,
    scale: float | None = None, window: int | None = None, softcap: float | None = None,
    interpret: bool | None = None, block_k: int | None = None, num_splits: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, fused_merge: bool | None = None,
) -> Float[Array, "B N D"]:  # fmt: skip
    """Decode attention over an FP8 cache: one query per sequence over its first ``lengths[b]`` positions.

    Arguments as for ``pallas_kernels.decode.decode_attention``, with each of K and V given as e4m3 values and
    float32 scales (one layer ``[B, K, S, ...]`` or a whole ``[L, B, K, S, ...]`` cache with ``layer``, an int or
    a traced int32 scalar). Products in ``q``'s dtype (bfloat16 / float16; tf32 on a GPU, float32 in interpret
    mode for a float32 ``q``), softmax and accumulation in float32. ``window`` and ``softcap`` (static) as the
    bf16 kernel's; the launch arguments override :func:`fp8_decode_config` (``fused_merge`` as the bf16 kernel's).
    """
    overrides = dict(block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                     fused_merge=fused_merge)  # fmt: skip
    settings = dict(layer=layer, scale=scale, window=window, softcap=softcap, interpret=interpret)
    return decode_q8.run(FP8, q, (k, k_scale, v, v_scale), lengths, **settings, **overrides)


def paged_fp8_decode_attention(
    q: Float[Array, "B N D"], k_pages: Float[Array, "*L P K page D"], k_scale_pages: Float[Array, "*L P K page 1"],
    v_pages: Float[Array, "*L P K page D"], v_scale_pages: Float[Array, "*L P K page 1"],
    block_tables: Int[Array, "B M"], lengths: Int[Array, " B"], *, layer=None, scale: float | None = None,
    window: int | None = None, softcap: float | None = None, interpret: bool | None = None,
    pages_per_block: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, preload: bool | None = None, fused_merge: bool | None = None,
) -> Float[Array, "B N D"]:  # fmt: skip
    """:func:`fp8_decode_attention` over FP8 pages (value and scale pools) through ``block_tables``, as
    ``pallas_kernels.paged.paged_decode_attention`` reads bf16 pages (entries < 0 name no page; a ring's released
    pages before the ``window``); the launch arguments override :func:`paged_fp8_config`."""
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    overrides = dict(pages_per_block=pages_per_block, num_splits=num_splits, num_warps=num_warps,
                     num_stages=num_stages, preload=preload, fused_merge=fused_merge)  # fmt: skip
    settings = dict(layer=layer, scale=scale, window=window, softcap=softcap, interpret=interpret)
    return paged_q8.run(FP8, q, pools, block_tables, lengths, **settings, **overrides)
