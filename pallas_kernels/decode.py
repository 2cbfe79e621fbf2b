"""Single-query GQA decode attention over a contiguous KV cache, split over the sequence (flash-decoding).

Shapes: ``q [B, N, D]``; ``k``, ``v`` either one layer ``[B, K, S, D]`` or the whole cache ``[L, B, K, S, D]``
with a ``layer`` index (a Python int or a traced int32 scalar); ``lengths int[B]`` counts the valid leading
positions of each sequence (0 gives a zero output). Query head ``n`` reads kv head ``n // G`` with ``G = N // K``.
Softmax runs in float32; the output has ``q.dtype``.

The kernel (Triton lowering on GPU, interpret mode elsewhere; see ``pallas_kernels.backend``):

* softmax in base 2: the scores times ``log2(e)``, exponentiated by ``exp2`` (the bare hardware exponential);
* one program per ``(b, kv head, split)``; the ``G`` query heads of the kv head form one ``[Gp, D]`` tile
  (``Gp`` = ``G`` padded to a power of two >= 16, Triton's smallest dot; the padding rows are masked loads of
  zeros and are never stored), so each K/V byte is read once;
* the cache is passed whole and each program indexes its own ``(layer, b, kv head)`` slab, so a 5-D cache is
  never sliced in XLA (no copy of a layer) and ``layer`` may be traced;
* split ``j`` of sequence ``b`` walks its share of the ``cdiv(lengths[b], block_k)`` blocks in a loop whose trip
  count comes from the length, so blocks past a sequence's length are never read; full blocks run unmasked,
  the last partial block runs once, masked (its load window slides back to stay inside ``S``);
* with a ``window`` the blocks start at the one holding ``max(n - window, 0)`` (blocks wholly before the window
  are never read) and that first block runs masked; a ``softcap`` caps the scaled scores, ``c * tanh(s / c)``;
* several splits leave partials that ``pallas_kernels.common.merge_partials`` merges; with one split the kernel
  normalises and writes the output itself;
* a head_dim that is not a power of two (a multiple of 16 up to 256: Phi-3's 96) is read in power-of-two column
  chunks (``common.column_slices``: 96 = 64 + 32), each chunk's products summed into the scores and accumulated
  into its own output columns; at a power of two the kernel is the one-chunk case. One whose chunks would include
  16 columns (80, 48) is read as one tile of the next power of two, the columns past it masked
  (``common.column_tiles``).

:func:`decode_attention_append` is the same kernel with a decode step's cache write folded in. The kernel body
is also the paged kernel's (``pallas_kernels.paged`` runs it over a page view of its pools). Block size, splits,
warps and stages come from ``pallas_kernels.common.decode_config`` and can be overridden per call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import backend, checks, common, decode_walk
from pallas_kernels.common import LOG2E, MIN_BLOCK, DecodeConfig

# ----------------------------------------------------------------------------------------------- kernel


def decode_kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    q_ref,  # [B, N, D]
    k_ref,  # [L, B, K, S, D]: the whole cache (or a page view of it); the program reads its (layer, b, h) slab
    v_ref,  # [L, B, K, S, D]
    # with ``append``: append [B] int32 (1: position lengths[b] - 1 comes from k_new/v_new and is written),
    # k_new [B, K, D], v_new [B, K, D] (``packed``: none; q is [B, K * (G + 2), D], each kv head's G query rows,
    # then its new key and value rows); with ``fused_merge`` a zeroed count [B, K] int32; then the outputs:
    # o [B, N, D] (one split); or acc [B, P, N, D], m [B, P, N], denom [B, P, N] (float32 partials), with
    # ``fused_merge`` then o and the count (aliased to its input); with ``append``, last, k and v (aliased to the
    # inputs k and v)
    *refs,
    append: bool = False,
    packed: bool = False,
    fused_merge: bool = False,
    interpret: bool = False,
    group: int,
    rows: int,
    block_k: int,
    num_splits: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    precision,
):
    stride = group + 2 if packed else None  # q rows a kv head takes in the packed layout
    if append and packed:
        append_ref, refs = refs[0], refs[1:]
    elif append:
        append_ref, k_new_ref, v_new_ref = refs[:3]
        refs = refs[3:]
    out_refs = refs[fused_merge:]  # the count's input is its output's buffer: the kernel uses the output
    if append:
        out_refs, (k_out_ref, v_out_ref) = out_refs[:-2], out_refs[-2:]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_len, head_dim = k_ref.shape[3:]
    # Columns in power-of-two chunks (Triton's tiles): one for a power-of-two head_dim, else widest first (96: 64
    # then 32); each chunk's products are summed into the scores and accumulated into its own output columns. A
    # head_dim with a 16-column chunk (80, 48) is read as one padded tile instead (common.column_tiles).
    col_chunks = common.column_tiles(head_dim)
    split = dict(block_k=block_k, num_splits=num_splits, window=window)
    n, layer, start, first, lo, hi = decode_walk.program_range(lengths_ref, layer_ref, b, j, k_ref.shape, **split)
    if append:
        # The block holding the new position n - 1 always runs as the (masked) tail, where the new row is
        # substituted for what the cache held: the cache is read before it is written, never after.
        n_full = (n - 1) // block_k
        new_pos = jnp.where((append_ref[b] != 0) & (n > 0), n - 1, -1)
        if packed:  # this kv head's key and value rows follow its queries
            k_new = [decode_walk.read_columns(q_ref, (b, h * stride + group), at) for at in col_chunks]
            v_new = [decode_walk.read_columns(q_ref, (b, h * stride + group + 1), at) for at in col_chunks]
        else:
            k_new = [decode_walk.read_columns(k_new_ref, (b, h), at) for at in col_chunks]  # [W]
            v_new = [decode_walk.read_columns(v_new_ref, (b, h), at) for at in col_chunks]
        k_new = [row.astype(k_ref.dtype) for row in k_new]
        v_new = [row.astype(v_ref.dtype) for row in v_new]
    else:
        n_full = n // block_k  # blocks whose every position is valid

    qs = []
    for at in col_chunks:
        head_rows, row_ok, q = decode_walk.query_tile(q_ref, b, h, group=group, rows=rows, cols=at, stride=stride)
        qs.append(q.astype(k_ref.dtype))  # [Gp, W]
    # Scores in base-2 units (log2(e) folded into the scale, after the softcap where there is one), so the softmax
    # exponentials are the hardware's exp2: a third of the loop's instructions went to the precise exp's range
    # reduction (bench/decode_ir.py). The running max returns to natural units for the split merge.
    score_factor = scale * LOG2E

    def attend(carry, start, valid, new_row=None):
        m, denom, acc = carry  # [Gp], [Gp], ([Gp, W] per column chunk) float32
        keys = pl.ds(start, block_k)
        s = None
        for c, at in enumerate(col_chunks):
            k = decode_walk.block_tile(k_ref, valid, (layer, b, h, keys), at)  # [bk, W]
            if new_row is not None:
                k = jnp.where(new_row[:, None], k_new[c][None, :], k)
            part = common.dot(qs[c], k, trans_b=True, precision=precision)  # [Gp, bk]
            s = part if s is None else s + part
        s = s * score_factor if softcap is None else common.softcapped(s * scale, softcap) * LOG2E
        if valid is not None:
            s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)  # 0 on the first block (m = -inf)
        p = jnp.exp2(s - m_new[:, None])  # [Gp, bk]
        out = []
        for c, at in enumerate(col_chunks):
            v = decode_walk.block_tile(v_ref, valid, (layer, b, h, keys), at)  # [bk, W]
            if new_row is not None:
                v = jnp.where(new_row[:, None], v_new[c][None, :], v)
            if valid is not None:
                v = jnp.where(valid[:, None], v, 0)  # unused positions may hold NaN: 0 * NaN must not reach acc
            out.append(acc[c] * alpha[:, None] + common.dot(p.astype(v.dtype), v, precision=precision))
        return m_new, denom * alpha + jnp.sum(p, axis=1), tuple(out)

    bounds = dict(n=n, n_full=n_full, start=start, first=first, lo=lo, hi=hi, new_pos=new_pos if append else None)
    acc_shapes = [(rows, q.shape[1]) for q in qs]
    (m, denom, acc), has_tail = decode_walk.walk(
        attend, rows, acc_shapes, block_k=block_k, max_len=max_len, window=window, **bounds
    )
    if append:  # the program that attended over the new position writes it (one row of K and of V)

        @pl.when(has_tail & (new_pos >= 0))
        def _write():
            for c, at in enumerate(col_chunks):
                write_row(k_out_ref, (layer, b, h, pl.ds(new_pos, 1)), at, k_new[c][None, :])
                write_row(v_out_ref, (layer, b, h, pl.ds(new_pos, 1)), at, v_new[c][None, :])

    decode_walk.store(out_refs, acc, m * (1 / LOG2E), denom, b, j, head_rows, col_chunks, row_ok, group=group,
                      rows=rows, num_splits=num_splits)  # fmt: skip
    if fused_merge:
        common.merge_when_last(out_refs, b, h, group=group, num_splits=num_splits, interpret=interpret)


def write_row(ref, index, cols, row) -> None:
    """``ref[*index, cols] = row`` (``[1, W]``), the columns past the head (a padded tile) not written."""
    ok = decode_walk.column_mask(row.shape, cols, ref.shape[-1])
    if ok is None:
        ref[(*index, cols)] = row
    else:
        backend.store(ref.at[(*index, cols)], row, mask=ok)


def kernel_options(
    kv_dtype, group: int, block_k: int, num_splits: int, scale: float, window=None, softcap=None
) -> dict:
    """The static arguments of :func:`decode_kernel` but ``append`` (shared with the paged kernel); the products
    run in the cache dtype, float32 ones at the highest precision."""
    return dict(
        group=group,
        rows=common.group_rows(group),
        block_k=block_k,
        num_splits=num_splits,
        scale=scale,
        window=window,
        softcap=None if softcap is None else float(softcap),
        precision=lax.Precision.HIGHEST if kv_dtype == jnp.float32 else None,
    )


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "interpret", "packed"))
def _decode(
    q, k, v, lengths, layer, new=None, *, scale: float, config: DecodeConfig, interpret, window=None, softcap=None,
    packed: bool = False,
):  # fmt: skip
    # q [B, N, D] (packed: [B, K * (G + 2), D], each kv head's queries then its new key and value rows);
    # k, v [L, B, K, S, D]; lengths int32[B]; layer int32[1]; new: None, or (append int32[B], k_new [B, K, D],
    # v_new [B, K, D]) (packed: (append,)): then k and v are returned updated
    _, batch, kv_heads, _, _ = k.shape
    group = q.shape[1] // kv_heads - (2 if packed else 0)
    splits, fused = config.num_splits, common.fuses_merge(config)
    o_shape = jax.ShapeDtypeStruct((batch, kv_heads * group, q.shape[2]), q.dtype)
    out_shape = common.split_out_shape(o_shape, splits, fused, kv_heads)
    inputs, aliases = [lengths, layer, q, k, v, *(new or ())], {}
    if new is not None:  # the cache is updated in place: its buffers are the last two outputs
        aliases = {3: len(out_shape), 4: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    options = kernel_options(k.dtype, group, config.block_k, splits, scale, window, softcap)
    kernel = functools.partial(
        decode_kernel, append=new is not None, packed=packed, fused_merge=fused, interpret=interpret, **options
    )
    grid = (batch, kv_heads, splits)
    name = "jkv_decode_attention" if new is None else "jkv_decode_attention_append"
    trailing = 0 if new is None else 2
    return common.launch_split_kernel(
        kernel, inputs, out_shape, aliases, grid, config, interpret, name, q.dtype, trailing=trailing
    )


# ----------------------------------------------------------------------------------------------- public


def _launch_settings(q, k, scale, interpret, window, softcap, **overrides) -> tuple[bool, float, DecodeConfig]:
    """Interpret mode, softmax scale and launch config of a decode call (``overrides`` as :func:`decode_attention`;
    the defaults for the positions one query reads, ``common.reach``)."""
    b, _, d = q.shape
    kh, s = k.shape[-3], k.shape[-2]
    checks.check_window_softcap(window, softcap)
    default = common.decode_config(b, kh, common.reach(s, window), d, k.dtype)
    return common.launch_settings(default, s, d, jnp.dtype(k.dtype).itemsize, scale, interpret, **overrides)


def decode_attention(
    q: Float[Array, "B N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
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
    """Decode attention of one query per sequence over its first ``lengths[b]`` cache positions.

    ``layer`` selects the layer of a whole ``[L, B, K, S, D]`` cache inside the kernel (no copy of the layer).
    ``scale`` defaults to ``D ** -0.5``. ``window`` (static): the query, at ``lengths[b] - 1``, sees only the last
    ``window`` positions (the blocks wholly before them are never read); ``softcap`` ``c`` (static) caps the
    scaled scores as ``c * tanh(s / c)``. ``interpret=None`` runs interpret mode off GPU. ``block_k``,
    ``num_splits``, ``num_warps``, ``num_stages`` and ``fused_merge`` (several splits merged by the last of them
    to finish, not by a second launch) override ``pallas_kernels.common.decode_config``.
    """
    checks.check_args(q, k, v, lengths, layer, chunked=True)
    overrides = dict(block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                     fused_merge=fused_merge)  # fmt: skip
    interpret, scale, config = _launch_settings(q, k, scale, interpret, window, softcap, **overrides)
    (k, v), layer = common.whole_cache((k, v), layer, MIN_BLOCK)  # a tiny cache padded to one block
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    options = dict(scale=scale, window=window, softcap=softcap, config=config, interpret=interpret)
    return _decode(q, k, v, lengths, layer, **options)


def check_append_args(q, k, v, lengths, k_new, v_new, append=None, layer=None) -> tuple[int, int, int, int, int]:
    """Validate :func:`decode_attention_append`'s arguments (and its reference's); return ``(B, N, K, S, D)``."""
    b, n, kh, s, d = checks.check_args(q, k, v, lengths, layer, chunked=True)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if getattr(x, "shape", None) != (b, kh, d):
            raise ValueError(f"{name} must have shape [B, K, D] = {(b, kh, d)}, got {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    if append is not None and (
        getattr(append, "shape", None) != (b,)
        or not (jnp.issubdtype(append.dtype, jnp.integer) or append.dtype == jnp.bool_)
    ):
        raise ValueError(
            f"append must be bool or int [{b}], got {getattr(append, 'dtype', None)}{getattr(append, 'shape', None)}"
        )
    return b, n, kh, s, d


def write_rows(k, v, k_new, v_new, lengths, append, layer=None):
    """``k_new``/``v_new [B, K, D]`` written in XLA (a scatter) at position ``lengths[b] - 1`` of each sequence
    (of ``layer`` for a whole cache) whose ``append[b]`` is nonzero and that has a position; the others dropped.
    ``lengths`` and ``append`` int32 ``[B]``."""
    rows = jnp.arange(lengths.shape[0])
    pos = jnp.where((append != 0) & (lengths > 0), lengths - 1, k.shape[-2])  # S: dropped

    def put(buf, new):
        at = buf.at[layer, rows, :, pos, :] if buf.ndim == 5 else buf.at[rows, :, pos, :]
        return at.set(new.astype(buf.dtype), mode="drop")

    return put(k, k_new), put(v, v_new)


def decode_attention_append(
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
    interpret: bool | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fused_merge: bool | None = None,
) -> tuple[Float[Array, "B N D"], Float[Array, "*L B K S D"], Float[Array, "*L B K S D"]]:
    """A decode step's cache write and attention in one kernel; returns ``(out, k, v)``.

    Equals writing ``k_new``/``v_new`` ``[B, K, D]`` (cast to the cache dtype) at position ``lengths[b] - 1`` of
    each sequence (of ``layer`` for a whole cache), then :func:`decode_attention` over the first ``lengths[b]``
    positions: ``lengths`` counts the new token. The program that attends over the new position takes it from
    ``k_new``/``v_new`` and writes that one row; ``k`` and ``v`` are updated in place when the caller donates
    them (inside a jitted step whose cache is donated, no copy). ``append`` (bool or int ``[B]``, default all)
    selects the sequences that write; the others attend over what their cache holds and leave it unchanged, as
    does a sequence of length 0. ``window``, ``softcap`` and launch overrides as :func:`decode_attention`.
    """
    overrides = dict(block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                     fused_merge=fused_merge)  # fmt: skip
    extra = dict(scale=scale, window=window, softcap=softcap)
    return _append(q, k, v, lengths, k_new, v_new, append, layer, extra, overrides, interpret)


def _append(q, k, v, lengths, k_new, v_new, append, layer, extra: dict, overrides: dict, interpret, qkv=None):
    """:func:`decode_attention_append` (``qkv``: the packed array of :func:`decode_attention_packed`, which the
    kernel reads in place of ``q``, ``k_new`` and ``v_new``, its slices)."""
    b, _, _, s, _ = check_append_args(q, k, v, lengths, k_new, v_new, append, layer)
    append = jnp.ones((b,), jnp.int32) if append is None else append
    interpret, scale, config = _launch_settings(q, k, extra["scale"], interpret, extra["window"], extra["softcap"],
                                                **overrides)  # fmt: skip
    extra = extra | {"scale": scale}
    whole = k.ndim == 5
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    append = jnp.asarray(append).astype(jnp.int32)
    if s < MIN_BLOCK:  # the kernel would read a padded copy: write in XLA, then attend
        k, v = write_rows(k, v, k_new, v_new, lengths, append, layer)
        out = decode_attention(q, k, v, lengths, layer=layer, interpret=interpret, **extra, **overrides)
        return out, k, v
    (k5, v5), layer = common.whole_cache((k, v), layer)
    options = dict(**extra, config=config, interpret=interpret)
    if qkv is None:
        out, k5, v5 = _decode(q, k5, v5, lengths, layer, (append, k_new, v_new), **options)
    else:
        packed = qkv.reshape(b, -1, qkv.shape[-1])  # [B, K * (G + 2), D]
        out, k5, v5 = _decode(packed, k5, v5, lengths, layer, (append,), **options, packed=True)
    return (out, k5, v5) if whole else (out, k5[0], v5[0])


def decode_attention_packed(
    qkv: Float[Array, "B K G2 D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    lengths: Int[Array, " B"],
    *,
    append=None,
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
) -> tuple[Float[Array, "B N D"], Float[Array, "*L B K S D"], Float[Array, "*L B K S D"]]:
    """:func:`decode_attention_append` with each kv head's queries and new row in one array: ``qkv[b, h, :G]`` are
    kv head ``h``'s ``G`` queries (query heads ``h*G ..``), ``qkv[b, h, G]`` its new key and ``qkv[b, h, G + 1]``
    its new value: the fused q/k/v projection's layout, so a step's rotary embedding and cast make one array in
    one launch where three slices of it were three. The kernel reads the rows in place; same results."""
    if getattr(qkv, "ndim", 0) != 4 or qkv.shape[2] < 3:
        raise ValueError(f"qkv must have shape [B, K, G + 2, D] with G >= 1, got {getattr(qkv, 'shape', None)}")
    b, kh, rows, d = qkv.shape
    group = rows - 2
    q = qkv[:, :, :group].reshape(b, kh * group, d)
    k_new, v_new = qkv[:, :, group], qkv[:, :, group + 1]
    overrides = dict(block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                     fused_merge=fused_merge)  # fmt: skip
    extra = dict(scale=scale, window=window, softcap=softcap)
    return _append(q, k, v, lengths, k_new, v_new, append, layer, extra, overrides, interpret, qkv=qkv)
