"""Decode attention over Q8 pages: int8 code pools ``[L, P, K, page_size, D]`` and scale pools
``[L, P, K, page_size, D // 32]``, read through the block table by ``pallas_kernels.decode_q8``'s kernel body (its
fused dequant) over four ``pallas_kernels.paged`` views that share one block's page indices: the codes and the
scales of a block come from the same pages, so the table is read once per block. FP8 pages (e4m3 values, one
float32 scale per row: ``pallas_kernels.decode_fp8``) run the same kernel through :func:`run`.
"""

from __future__ import annotations

import functools

import jax
from jaxtyping import Array, Float, Int, Int8

from pallas_kernels import checks, common, decode_q8, paged
from pallas_kernels.common import MIN_BLOCK
from pallas_kernels.decode_q8 import QuantFormat
from pallas_kernels.paged import BlockAddresses, PagedConfig, PagedView

# Pipeline stages the block table's loads take ahead of the K/V loads (table -> K/V -> products) when they are read
# inside the loop: at the contiguous kernel's three stages Triton then gives these kernels' K/V one shared-memory
# buffer, at five two, as the contiguous kernel has (bench/decode_ir.py counts; on an H100 paged Q8 went from 1.27x
# to 1.02x the contiguous Q8 kernel's time: docs/BENCHMARKS.md, "Paged Q8 with five stages"). Preloaded entries
# (``PagedConfig.preload``) take none: three stages already give two buffers.
TABLE_STAGES = 2


def paged_q8_config(
    batch: int, num_kv_heads: int, max_pages: int, page_size: int, head_dim: int, fmt: QuantFormat = decode_q8.Q8
) -> PagedConfig:
    """Defaults: the contiguous kernel's block of keys (``fmt.config``: ``decode_q8.q8_decode_config``) rounded
    to whole pages, and its splits and warps for that block; its stages, plus :data:`TABLE_STAGES` where the table
    is read inside the loop, so the K/V loads keep the contiguous kernel's buffers."""
    max_len = max_pages * page_size
    base = fmt.config(batch, num_kv_heads, max_len, head_dim)
    ppb = max(1, base.block_k // page_size, MIN_BLOCK // page_size)
    config = fmt.config(batch, num_kv_heads, max_len, head_dim, block_k=ppb * page_size)
    preload = paged.preload_entries(max_pages, ppb, config.num_splits, page_size) > 0
    stages = config.num_stages + (0 if preload else TABLE_STAGES)  # fmt.config's stages already fit
    return PagedConfig(ppb, config.num_splits, config.num_warps, stages, preload)


def _paged_q8_kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    tables_ref,  # [B, Mp] int32: Mp = M padded to a multiple of pages_per_block
    q_ref,  # [B, N, D]
    k_ref,  # [L, P, K, page_size, D] int8: the whole pool
    k_scale_ref,  # [L, P, K, page_size, D // 32]
    v_ref,  # [L, P, K, page_size, D] int8
    v_scale_ref,  # [L, P, K, page_size, D // 32]
    # outputs: as in pallas_kernels.decode_q8
    *refs,
    preload: int,
    **params,
):
    addresses = BlockAddresses(tables_ref, lengths_ref, k_ref.shape[1], k_ref.shape[3], params["window"])
    if preload:
        addresses.preload(preload, params["block_k"], params["num_splits"])
    views = [PagedView(ref, addresses) for ref in (k_ref, k_scale_ref, v_ref, v_scale_ref)]
    decode_q8.decode_kernel(lengths_ref, layer_ref, q_ref, *views, *refs, **params)


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "interpret", "form"))
def _paged_q8(
    q, k, k_scale, v, v_scale, tables, lengths, layer, *, scale, config, interpret, window=None, softcap=None,
    form="default",
):  # fmt: skip
    # q [B, N, D]; k, v int8 or float8_e4m3fn [L, P, K, page_size, D]; scales [L, P, K, page_size, D // chunk]
    # (Q8: chunk 32; FP8: D); tables int32[B, M]; lengths int32[B]; layer int32[1]
    kv_heads, page_size, head_dim = k.shape[2:]
    max_pages = tables.shape[1]
    splits, ppb = config.num_splits, config.pages_per_block
    tables = paged.pad_tables(tables, ppb)
    fused = common.fuses_merge(config)
    out_shape = common.split_out_shape(q, splits, fused, kv_heads)
    inputs = [lengths, layer, tables, q, k, k_scale, v, v_scale]
    group, chunk = q.shape[1] // kv_heads, head_dim // k_scale.shape[-1]
    block_k = ppb * page_size
    options = decode_q8.kernel_options(
        q.dtype, group, head_dim, block_k, splits, scale, window, softcap, chunk, form, config.num_warps, k.dtype
    )
    preload = paged.preload_entries(max_pages, ppb, splits, page_size) if config.preload else 0
    kernel = functools.partial(_paged_q8_kernel, preload=preload, **options, fused_merge=fused, interpret=interpret)
    grid = (q.shape[0], kv_heads, splits)
    name = f"jkv_paged_{decode_q8.format_name(k.dtype)}_attention"
    return common.launch_split_kernel(kernel, inputs, out_shape, {}, grid, config, interpret, name, q.dtype)


def check_args(
    q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_tables, lengths, layer=None, window=None,
    check_pair=checks.check_q8_pair,
):  # fmt: skip
    """Validate the arguments of :func:`paged_q8_decode_attention` (and its reference's; FP8's with its
    ``check_pair``); return ``(B, N, K, P, page_size, D)``."""
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    values = checks.check_pairs(check_pair, *pools, names=("k_pages", "v_pages"))
    return paged.check_args(q, *values, block_tables, lengths, layer, window, chunked=True)


def paged_q8_decode_attention(
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
    interpret: bool | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    preload: bool | None = None,
    fused_merge: bool | None = None,
) -> Float[Array, "B N D"]:
    """Decode attention over Q8 pages: ``pallas_kernels.paged.paged_decode_attention`` with each of K and V given
    as code and scale pools, dequantized inside the loads as ``pallas_kernels.decode_q8.q8_decode_attention``
    does; the launch arguments override :func:`paged_q8_config`. Products in ``q``'s dtype (bfloat16 / float16;
    tf32 on GPU for float32), softmax and accumulation in float32; ``window`` and ``softcap`` as the paged
    kernel's (``fused_merge`` too)."""
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    overrides = dict(pages_per_block=pages_per_block, num_splits=num_splits, num_warps=num_warps,
                     num_stages=num_stages, preload=preload, fused_merge=fused_merge)  # fmt: skip
    settings = dict(layer=layer, scale=scale, window=window, softcap=softcap, interpret=interpret)
    return run(decode_q8.Q8, q, pools, block_tables, lengths, **settings, **overrides)


def run(fmt: QuantFormat, q, pools, block_tables, lengths, *, layer, scale, window, softcap, interpret, **overrides):
    """A paged Q8 / FP8 decode call: ``pools`` (k, k_scale, v, v_scale) checked as ``fmt``'s pairs, the launch
    :func:`paged_q8_config`'s defaults for ``fmt`` with ``overrides`` (``paged.resolve_config``) on top."""
    checks.check_window_softcap(window, softcap)
    b, _, kh, _, page_size, d = check_args(q, *pools, block_tables, lengths, layer, window, fmt.check_pair)
    default = paged_q8_config(b, kh, paged.reach_pages(block_tables, page_size, window), page_size, d, fmt)
    settings = dict(scale=scale, window=window, softcap=softcap, interpret=interpret)
    fn = functools.partial(_paged_q8, form=fmt.form())  # LOOP_FORM read per call
    return paged.launch(fn, q, pools, block_tables, lengths, layer, default, 1, **settings, **overrides)
