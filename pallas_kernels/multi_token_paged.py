"""Multi-token causal attention over paged caches: ``pallas_kernels.multi_token``'s kernel reading pools
``[L, P, K, page_size, X]`` through the block table (``multi_token.PagedBlocks``); pages are never gathered in XLA.

Position ``s`` of sequence ``b`` is row ``s % page_size`` of page ``block_tables[b, s // page_size]``. Entries
only need to name a page where a query reads (from the first query's window start to the last query's
position); the others (< 0, or stale) are never read through.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from pallas_kernels.multi_token import PLAIN, run
from pallas_kernels.multi_token_args import MultiTokenConfig, check_args


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
