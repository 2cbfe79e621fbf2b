"""The flat multi-token attention call's arguments and its tile table (docs/attention.md; issue 20).

A call attends ``q [T, N, D]``, a flat batch of query tokens, over a cache: sequence ``b``'s ``counts[b]`` queries
are rows ``q_starts[b] ..`` at positions ``lengths[b] ..``. :func:`check_args` validates a call (shared by a kernel
and its reference); :func:`tile_table` cuts the rows into tiles of ``block_q`` tokens of one sequence (plain
``jnp``, outside the kernel) and says for each which rows it owns, at which positions, and which keys it reads.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import checks

ALIGN = 8  # rows of a TMA tile: a tile's first row of q is a multiple of this
COLUMNS = ("b", "row0", "skip", "nrows", "pos_base", "lo", "hi", "t_lo", "u_lo", "u_hi", "t_hi")
NCOL = len(COLUMNS)


def max_tiles(num_rows: int, batch: int, block_q: int) -> int:
    """A static bound on the tiles of any call: ``2B + 1`` segments (sequences and the gaps between them), each
    starting up to 7 rows early (8-row alignment) and ending in a partial tile."""
    segments = 2 * batch + 1
    return -(-(num_rows + (ALIGN - 1) * segments) // block_q) + segments


def tile_table(q_starts, lengths, counts, *, num_rows: int, block_q: int, block_k: int, window: int | None):
    """``int32[max_tiles, NCOL]``: one row per tile (columns :data:`COLUMNS`), the longest key loops first.

    ``b``: the sequence (0 for other tiles); rows ``row0 + skip .. row0 + skip + nrows - 1`` of ``q`` are the
    tile's own (``row0`` a multiple of 8; ``nrows`` 0: a dead tile); tile row ``r`` (token ``r % block_q``) sits at
    position ``pos_base + r % block_q``; keys ``lo .. hi - 1`` are read (``lo == hi``: none, a tile over rows no
    sequence owns, which stores zeros), in blocks ``t_lo .. t_hi - 1`` of which ``u_lo .. u_hi - 1`` lie inside
    every row's causal and window limits (no mask).
    """
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    q_starts, lengths, counts = i32(q_starts), i32(lengths), i32(counts)
    batch = counts.shape[0]
    live = counts > 0
    # Segments: the sequences, then the gaps between their row ranges (sorted by first row).
    first = jnp.where(live, q_starts, num_rows)
    order = jnp.argsort(first)
    ends = jnp.where(live, q_starts + counts, num_rows)[order]
    gap_s = jnp.concatenate([i32([0]), ends])
    gap_e = jnp.maximum(jnp.concatenate([first[order], i32([num_rows])]), gap_s)
    seg_s = jnp.concatenate([q_starts, gap_s])
    seg_e = jnp.concatenate([jnp.where(live, q_starts + counts, q_starts), gap_e])
    seg_pos = jnp.concatenate([lengths, jnp.zeros(batch + 1, jnp.int32)])
    seg_b = jnp.concatenate([jnp.arange(batch, dtype=jnp.int32), jnp.zeros(batch + 1, jnp.int32)])
    seg_seq = jnp.arange(2 * batch + 1) < batch
    a0 = seg_s // ALIGN * ALIGN
    n_tiles = jnp.where(seg_e > seg_s, -(-(seg_e - a0) // block_q), 0)
    tile_end = jnp.cumsum(n_tiles)
    # Tile i of the table.
    i = jnp.arange(max_tiles(num_rows, batch, block_q), dtype=jnp.int32)
    seg = jnp.minimum(jnp.searchsorted(tile_end, i, side="right", method="compare_all"), 2 * batch)  # one fusion
    alive = i < tile_end[-1]
    row0 = a0[seg] + (i - (tile_end - n_tiles)[seg]) * block_q
    row_first = jnp.maximum(seg_s[seg], row0)
    nrows = jnp.where(alive, jnp.minimum(seg_e[seg], row0 + block_q) - row_first, 0)
    skip = row_first - row0
    pos_first = seg_pos[seg] + row_first - seg_s[seg]
    is_seq = seg_seq[seg] & alive
    hi = jnp.where(is_seq, pos_first + nrows, 0)
    lo = jnp.where(is_seq, 0 if window is None else jnp.maximum(pos_first - window + 1, 0), 0)
    t_lo, t_hi = lo // block_k, -(-hi // block_k)
    w_hi = 0 if window is None else jnp.maximum(pos_first + nrows - window, 0)  # the last row's window start
    u_lo = jnp.clip(-(-w_hi // block_k), t_lo, t_hi)
    u_hi = jnp.clip((pos_first + 1) // block_k, u_lo, t_hi)
    columns = dict(b=jnp.where(is_seq, seg_b[seg], 0), row0=jnp.where(alive, row0, 0), skip=skip, nrows=nrows)
    columns.update(pos_base=pos_first - skip, lo=lo, hi=hi, t_lo=t_lo, u_lo=u_lo, u_hi=u_hi, t_hi=t_hi)
    table = jnp.stack([jnp.where(alive, columns[c], 0) if c == "skip" else columns[c] for c in COLUMNS], axis=1)
    return table[jnp.argsort(t_lo - t_hi, stable=True)]  # longest key loops first


def check_args(q, k, v, q_starts, lengths, counts, layer=None, *, window=None, softcap=None):
    """Validate a multi-token call; return ``(T, N, K, S, D)``. Concrete starts, lengths and counts are
    range-checked (positions inside ``S``, rows inside ``T``, no two sequences' rows overlapping); traced ones
    cannot be."""
    needs = "goes with a whole [L, B, K, S, D] cache and only then"
    (num_rows, num_heads, head_dim), (batch, kv_heads, max_len, _) = checks.check_kv(
        q, k, v, layer, q_axes="[T, N, D]", axes="[B, K, S, D]", layer_needs=needs, dtypes=None
    )
    if window is not None and (not checks.is_int(window) or window < 1):
        raise ValueError(f"window={window!r} must be None or an int >= 1")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"softcap={softcap!r} must be None or a positive number")
    step = (("q_starts", q_starts), ("lengths", lengths), ("counts", counts))
    starts, lens, cnts = (checks.check_int_vector(name, x, batch) for name, x in step)
    if cnts is not None and cnts.min(initial=0) < 0:
        raise ValueError(f"counts={cnts} must be >= 0")
    if lens is not None and cnts is not None and ((lens < 0) | (lens + cnts > max_len)).any():
        raise ValueError(f"lengths={lens} + counts={cnts} must lie in [0, S={max_len}]")
    if starts is not None and cnts is not None:
        own = cnts > 0
        if ((starts < 0) | (starts + cnts > num_rows))[own].any():
            raise ValueError(f"rows q_starts={starts} + counts={cnts} must lie in [0, T={num_rows}]")
        first, end = starts[own], (starts + cnts)[own]
        order = first.argsort()
        if (first[order][1:] < end[order][:-1]).any():
            raise ValueError(f"sequences' query rows overlap: q_starts={starts}, counts={cnts}")
    return num_rows, num_heads, kv_heads, max_len, head_dim
