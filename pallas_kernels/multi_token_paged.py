"""Multi-token causal attention over paged caches: ``pallas_kernels.multi_token``'s kernel reading pools
``[L, P, K, page_size, X]`` through the block table (``multi_token.PagedBlocks``); pages are never gathered in XLA.

Position ``s`` of sequence ``b`` is row ``s % page_size`` of page ``block_tables[b, s // page_size]``. Entries
only need to name a page where a query reads (from the first query's window start to the last query's
position); the others (< 0, or stale) are never read through.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int, Int8

from pallas_kernels.multi_token import FP8, PLAIN, Q8, run
from pallas_kernels.multi_token_args import MultiTokenConfig, check_args, check_fp8_pair, check_pairs, check_q8_pair


def paged_multi_token_attention(
    q: Float[Array, "T N D"],
    k_pages: Float[Array, "*L P K page D"],
    v_pages: Float[Array, "*L P K page D"],
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
    """``multi_token.multi_token_attention`` over paged pools (bf16 / f16 / f32), ``[P, K, page_size, D]`` or
    ``[L, P, K, page_size, D]`` with ``layer``, read through ``block_tables int[B, M]``."""
    options = dict(layer=layer, window=window, softcap=softcap)
    dims = check_args(q, k_pages, v_pages, q_starts, lengths, counts, block_tables=block_tables, **options)
    return run(q, (k_pages, v_pages), block_tables, q_starts, lengths, counts, dims, fmt=PLAIN, scale=scale,
               config=config, interpret=interpret, **options)  # fmt: skip


def _quantized(fmt, check, q, pools, block_tables, q_starts, lengths, counts, **options):
    k_vals, v_vals = check_pairs(check, *pools)
    keys = ("layer", "window", "softcap")
    dims = check_args(
        q, k_vals, v_vals, q_starts, lengths, counts, block_tables=block_tables, **{n: options[n] for n in keys}
    )
    return run(q, pools, block_tables, q_starts, lengths, counts, dims, fmt=fmt, **options)


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
    """``multi_token.q8_multi_token_attention`` over Q8 pages (codes and scale pools), through the block table."""
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
    """``multi_token.fp8_multi_token_attention`` over FP8 pages (values and scale pools), through the table."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap, config=config, interpret=interpret)
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    return _quantized(FP8, check_fp8_pair, q, pools, block_tables, q_starts, lengths, counts, **options)
