"""Single-query GQA decode attention over a contiguous KV cache, split over the sequence (flash-decoding).

Shapes: ``q [B, N, D]``; ``k``, ``v`` either one layer ``[B, K, S, D]`` or the whole cache ``[L, B, K, S, D]``
with a ``layer`` index (a Python int or a traced int32 scalar); ``lengths int[B]`` counts the valid leading
positions of each sequence (0 gives a zero output). Query head ``n`` reads kv head ``n // G`` with ``G = N // K``.
Softmax runs in float32; the output has ``q.dtype``.

The kernel (Triton lowering on GPU, interpret mode elsewhere; see ``pallas_kernels.backend``):

* one program per ``(b, kv head, split)``; the ``G`` query heads of the kv head form one ``[Gp, D]`` tile
  (``Gp`` = ``G`` padded to a power of two >= 16, Triton's smallest dot; the padding rows are masked loads of
  zeros and are never stored), so each K/V byte is read once;
* the cache is passed whole and each program indexes its own ``(layer, b, kv head)`` slab, so a 5-D cache is
  never sliced in XLA (no copy of a layer) and ``layer`` may be traced;
* split ``j`` of sequence ``b`` walks its share of the ``cdiv(lengths[b], block_k)`` blocks in a loop whose trip
  count comes from the length, so blocks past a sequence's length are never read; full blocks run unmasked,
  the last partial block runs once, masked (its load window slides back to stay inside ``S``);
* each split leaves its running max ``m``, softmax denominator and unnormalised ``acc`` (``[B, P, N(, D)]``);
  :func:`merge_partials`, a second Pallas kernel of one program per query head, merges them with a log-sum-exp
  rescale (``merge="xla"``: :func:`combine_splits` in XLA, measured slower; see ``SPLIT_MERGE``). With one split
  the kernel normalises and writes the output itself. (``fused_combine=True`` merges inside the kernel instead:
  the last split of each ``(b, kv head)`` to finish, found with an atomic counter, merges the partials one after
  another; measured slower, see ``decode_config``.)

Block size, splits, warps and stages come from :func:`decode_config` (the heuristic is documented there), and
can be overridden per call.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import backend

MIN_BLOCK = 16  # Triton's smallest dot dimension: the q tile has at least this many rows, blocks this many keys
HEAD_DIMS = (16, 32, 64, 128, 256)  # power-of-two tiles; 64 and 128 are the tested and tuned ones
CACHE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
NUM_WARPS = (1, 2, 4, 8, 16)
# Shared memory the pipelined K/V buffers may take: H100/H200 give a block up to 227 KiB, Triton adds ~20 KiB.
SMEM_BYTES = 200 * 1024


class DecodeConfig(NamedTuple):
    """Launch parameters of the decode kernel (static: each distinct value compiles its own kernel)."""

    block_k: int  # keys per loop step (power of two, 16 <= block_k <= S)
    num_splits: int  # programs per (b, kv head), each walking an equal share of the sequence's blocks
    num_warps: int
    num_stages: int  # Triton software-pipelining depth of the loop's K/V loads
    # With several splits: the last split of each (b, kv head) to finish merges the partials inside the kernel
    # (an atomic counter per (b, kv head)) instead of a separate merge after it.
    fused_combine: bool = False
    merge: str = "xla"  # how several splits' partials are merged after the kernel: SPLIT_MERGES


# ----------------------------------------------------------------------------------------------- heuristics


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def group_rows(group: int) -> int:
    """Rows of the query tile for ``group`` query heads per kv head: a power of two, at least 16."""
    return max(MIN_BLOCK, 1 << (group - 1).bit_length())


def choose_block_k(max_len: int, head_dim: int, itemsize: int) -> int:
    """Keys per loop step: a 32 KiB K block (128 keys of 128 bf16), never more than the cache holds."""
    block_k = max(MIN_BLOCK, _pow2_floor((32 * 1024) // (head_dim * itemsize)))
    block_k = min(block_k, 256)
    return max(MIN_BLOCK, min(block_k, _pow2_floor(max(max_len, MIN_BLOCK))))


def max_stages(block_k: int, head_dim: int, itemsize: int) -> int:
    """Deepest pipeline whose buffers fit ``SMEM_BYTES``: Triton keeps ``stages - 1`` K and V blocks resident."""
    return 1 + SMEM_BYTES // (2 * block_k * head_dim * itemsize)


def choose_num_splits(
    batch: int, num_kv_heads: int, max_len: int, block_k: int, num_multiprocessors: int | None = None
) -> int:
    """Splits per ``(b, kv head)`` so that about four programs per multiprocessor share the work.

    Decode attention is memory-bound: the GPU streams K/V at full bandwidth only with enough programs in flight.
    A large batch needs few splits (64 x 8 = 512 programs: two splits on an H100's 132 multiprocessors); a
    single sequence needs its blocks spread over many programs. Each split keeps at least two blocks of a
    full-length sequence so the loop still pipelines its loads. (Measured on an H100, see docs/BENCHMARKS.md:
    at or near torch SDPA from 8 x 16384 up, short of it at 1 x 32768 and 8 x 4096, where programs of ~4 blocks
    spend much of their time filling the pipeline.)
    """
    sms = num_multiprocessors or backend.num_multiprocessors()
    programs = batch * num_kv_heads
    want = math.ceil(4 * sms / programs)
    most = max(1, math.ceil(max_len / block_k) // 2)
    return max(1, min(want, most))


def decode_config(
    batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype, *, num_multiprocessors: int | None = None
) -> DecodeConfig:
    """Default launch parameters for a shape (documented heuristic: see the two functions it calls)."""
    itemsize = jnp.dtype(dtype).itemsize
    block_k = choose_block_k(max_len, head_dim, itemsize)
    splits = choose_num_splits(batch, num_kv_heads, max_len, block_k, num_multiprocessors)
    # A float32 dot runs on the FMA units ("ieee" precision): smaller tiles per warp keep registers in bounds.
    num_warps = 4 if itemsize < 4 else 8
    stages = min(3, max_stages(block_k, head_dim, itemsize))
    # A merge after the kernel (SPLIT_MERGE): merging in the kernel measured slower on an H100 (the last split
    # merges P partials one after another: 14.0 vs 13.2 us (XLA merge) at 1 x 4096 with P=16, 74.6 vs 58.2 us at
    # 1 x 32768 with P=66).
    return DecodeConfig(block_k, splits, num_warps, stages, fused_combine=False, merge=SPLIT_MERGE)


# ----------------------------------------------------------------------------------------------- combine


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


# How ``launch_split_kernel`` merges split partials: "xla" (``combine_splits``, the fusions XLA makes of it) or
# "pallas" (``merge_partials``: one kernel launch, every partial of a head loaded at once). The default config of
# every split kernel takes this value. Measured on an H100 (docs/BENCHMARKS.md, "Decode attention", 2026-11-23
# run 8; bf16, N=32, K=8, D=128): the Pallas merge took the Triton kernel from 12.1 to 10.4 us at 1 x 4096,
# 55.5 to 52.3 us at 1 x 32768 and 54.4 to 53.0 us at 8 x 4096 (the Mosaic GPU kernel 52.9 -> 51.7 us at
# 1 x 32768), and changed nothing measurable where one or two splits run.
SPLIT_MERGES = ("xla", "pallas")
SPLIT_MERGE = "pallas"


def _merge_kernel(acc_ref, m_ref, denom_ref, o_ref, *, splits: int, packed: bool):
    r, c = pl.program_id(0), pl.program_id(1)
    p_rows = acc_ref.shape[1]  # splits padded to a power of two
    p_ok = lax.broadcasted_iota(jnp.int32, (p_rows,), 0) < splits
    if not packed:  # m, denom [R, P, C]
        m = backend.load(m_ref.at[r, :, c], mask=p_ok, other=-jnp.inf)
        denom = backend.load(denom_ref.at[r, :, c], mask=p_ok, other=0.0)
    else:  # both in one [R, P, C, stats] array: column 0 the max, column 1 the denominator
        col = lambda i, other: backend.load(m_ref.at[r, :, c, pl.ds(i, 1)], mask=p_ok[:, None], other=other)
        m, denom = col(0, -jnp.inf).reshape(p_rows), col(1, 0.0).reshape(p_rows)
    acc = backend.load(acc_ref.at[r, :, c, :], mask=p_ok[:, None], other=0.0)  # [Pp, D]
    m_max = jnp.max(m)
    weight = jnp.exp(m - jnp.where(m_max > -jnp.inf, m_max, 0.0))  # exp(-inf) = 0: empty splits drop out
    total = jnp.sum(weight * denom)
    out = jnp.sum(weight[:, None] * acc, axis=0)  # [D]
    inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)  # no position at all: zeros
    o_ref[r, c, :] = (out * inv).astype(o_ref.dtype)


def merge_partials(acc, m, denom=None, *, splits: int, dtype, interpret: bool):
    """:func:`combine_splits` as one Pallas kernel: ``acc [R, Pp, C, D]``, ``m`` and ``denom [R, Pp, C]`` (or
    ``denom=None`` and ``m [R, Pp, C, S]`` holding the max in column 0 and the denominator in column 1) to
    ``[R, C, D]`` in ``dtype``, merging the first ``splits`` entries along ``Pp`` (a power of two >= splits: the
    split kernels allocate their partials that way, :func:`split_out_shape`; the rest are never read). One
    program per ``(r, c)`` loads its partials at once, so the merge costs one launch and about one memory
    latency."""
    rows, padded, cols, head_dim = acc.shape
    if padded & (padded - 1) or not 1 <= splits <= padded:
        raise ValueError(f"acc.shape[1]={padded} must be a power of two >= splits={splits}")
    inputs = [acc, m, m if denom is None else denom]
    kernel = functools.partial(_merge_kernel, splits=splits, packed=denom is None)
    return backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=4 if padded * head_dim >= 4096 else 1,
        num_stages=1,
        grid=(rows, cols),
        in_specs=[_whole(x.shape) for x in inputs],
        out_specs=_whole((rows, cols, head_dim)),
        out_shape=jax.ShapeDtypeStruct((rows, cols, head_dim), dtype),
        name="jkv_merge_splits",
    )(*inputs)


# ----------------------------------------------------------------------------------------------- kernel


def split_blocks(n, j, block_k: int, num_splits: int):
    """Blocks ``[lo, hi)`` of a sequence of ``n`` positions that split ``j`` of ``num_splits`` walks: the
    ``ceil(n / block_k)`` blocks cut into equal shares (the last ones may be shorter or empty)."""
    per_split = pl.cdiv(pl.cdiv(n, block_k), num_splits)
    lo = j * per_split
    return lo, jnp.minimum(lo + per_split, pl.cdiv(n, block_k))


def _dot(a, b, b_contract: int, precision):
    """``a @ b`` (``b_contract=0``) or ``a @ b.T`` (``b_contract=1``) with a float32 result."""
    dims = (((1,), (b_contract,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _decode_kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    q_ref,  # [B, N, D]
    k_ref,  # [L, B, K, S, D]: the whole cache; the program reads its own (layer, b, kv head) slab
    v_ref,  # [L, B, K, S, D]
    # with ``append``: append [B] int32 (1: position lengths[b] - 1 comes from k_new/v_new and is written),
    # k_new [B, K, D], v_new [B, K, D]; then the inputs aliased to the outputs (poison, the zeroed counters
    # of a fused combine, and with ``append`` the cache itself), then the outputs:
    # o [B, N, D] (one split); or acc [B, P, N, D], m [B, P, N], denom [B, P, N] (float32 partials),
    # then, with a fused combine, counters [B * K] (int32) and o [B, N, D]; with ``append``, last, k and v
    *refs,
    append: bool = False,
    num_aliased: int,
    group: int,
    rows: int,
    block_k: int,
    num_splits: int,
    fused_combine: bool,
    scale: float,
    precision,
    interpret: bool,
):
    if append:
        append_ref, k_new_ref, v_new_ref = refs[:3]
        refs = refs[3:]
    out_refs = refs[num_aliased:]
    if append:
        out_refs, (k_out_ref, v_out_ref) = out_refs[:-2], out_refs[-2:]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_layers, _, _, max_len, head_dim = k_ref.shape
    # Lengths and layer were validated on the host when concrete; the clamps only keep traced values in bounds.
    n = jnp.clip(lengths_ref[b], 0, max_len)
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)

    lo, hi = split_blocks(n, j, block_k, num_splits)
    if append:
        # The block holding the new position n - 1 always runs as the (masked) tail, where the new row is
        # substituted for what the cache held: the cache is read before it is written, never after.
        n_full = (n - 1) // block_k
        new_pos = jnp.where((append_ref[b] != 0) & (n > 0), n - 1, -1)
        k_new = k_new_ref[b, h, :].astype(k_ref.dtype)  # [D]
        v_new = v_new_ref[b, h, :].astype(v_ref.dtype)
    else:
        n_full = n // block_k  # blocks whose every position is valid

    # This kv head's query heads are rows h*G .. h*G+G-1 of q; the tile pads them to `rows` (masked, zeros).
    head_rows = pl.ds(h * group, rows)
    row_ok = lax.broadcasted_iota(jnp.int32, (rows, head_dim), 0) < group if rows != group else None
    q = backend.load(q_ref.at[b, head_rows, :], mask=row_ok, other=0 if row_ok is not None else None)
    q = q.astype(k_ref.dtype)  # [Gp, D]

    def attend(carry, start, valid, new_row=None):
        m, denom, acc = carry  # [Gp], [Gp], [Gp, D] float32
        k = k_ref[layer, b, h, pl.ds(start, block_k), :]  # [bk, D]
        if new_row is not None:
            k = jnp.where(new_row[:, None], k_new[None, :], k)
        s = _dot(q, k, 1, precision) * scale  # [Gp, bk] float32
        if valid is not None:
            s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
        p = jnp.exp(s - m_new[:, None])  # [Gp, bk]
        v = v_ref[layer, b, h, pl.ds(start, block_k), :]  # [bk, D]
        if new_row is not None:
            v = jnp.where(new_row[:, None], v_new[None, :], v)
        if valid is not None:
            v = jnp.where(valid[:, None], v, 0)  # unused positions may hold NaN: 0 * NaN must not reach acc
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 0, precision)
        return m_new, denom * alpha + jnp.sum(p, axis=1), acc

    def full_block(i, carry):
        return attend(carry, pl.multiple_of(i * block_k, block_k), None)

    def tail_block(carry):
        start = n_full * block_k
        window = jnp.minimum(start, max_len - block_k)  # slide back so the load stays inside S
        pos = window + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        return attend(carry, window, (pos >= start) & (pos < n), (pos == new_pos) if append else None)

    carry = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
    carry = lax.fori_loop(lo, jnp.minimum(hi, n_full), full_block, carry)
    has_tail = (lo <= n_full) & (n_full < hi)
    m, denom, acc = lax.cond(has_tail, tail_block, lambda c: c, carry)
    if append:  # the program that attended over the new position writes it (one row of K and of V)

        @pl.when(has_tail & (new_pos >= 0))
        def _write():
            k_out_ref[layer, b, h, pl.ds(new_pos, 1), :] = k_new[None, :]
            v_out_ref[layer, b, h, pl.ds(new_pos, 1), :] = v_new[None, :]

    vec_ok = None if row_ok is None else lax.broadcasted_iota(jnp.int32, (rows,), 0) < group
    if num_splits == 1:
        (o_ref,) = out_refs
        inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)  # length 0: zeros
        backend.store(o_ref.at[b, head_rows, :], (acc * inv[:, None]).astype(o_ref.dtype), mask=row_ok)
        return
    acc_ref, m_ref, denom_ref = out_refs[:3]
    backend.store(acc_ref.at[b, j, head_rows, :], acc, mask=row_ok)
    backend.store(m_ref.at[b, j, head_rows], m, mask=vec_ok)
    backend.store(denom_ref.at[b, j, head_rows], denom, mask=vec_ok)
    if not fused_combine:
        return
    count_ref, o_ref = out_refs[3:]
    # Every thread's partial stores precede the counter's release (bar.sync, then an acq_rel atomic at GPU
    # scope); the split that brings the count to P saw every other split's release, so their partials.
    if not interpret:  # interpret mode runs programs one after another
        backend.barrier()
    arrived = backend.atomic_add(count_ref, b * pl.num_programs(1) + h, jnp.int32(1))

    @pl.when(arrived == num_splits - 1)
    def _combine():
        def merge(p, carry):
            m_run, den_run, acc_run = carry
            # Volatile: read where the other programs' stores landed, never a stale line of this SM's L1.
            m_p = backend.load(m_ref.at[b, p, head_rows], mask=vec_ok, other=0.0, volatile=True)
            den_p = backend.load(denom_ref.at[b, p, head_rows], mask=vec_ok, other=0.0, volatile=True)
            acc_p = backend.load(acc_ref.at[b, p, head_rows, :], mask=row_ok, other=0.0, volatile=True)
            m_new = jnp.maximum(m_run, m_p)
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all empty so far: both weights exp(-inf) = 0
            a, w = jnp.exp(m_run - m_safe), jnp.exp(m_p - m_safe)
            return m_new, den_run * a + den_p * w, acc_run * a[:, None] + acc_p * w[:, None]

        init = (
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32),
        )
        _, den_all, acc_all = lax.fori_loop(0, num_splits, merge, init)
        inv_all = jnp.where(den_all > 0, 1.0 / jnp.where(den_all > 0, den_all, 1.0), 0.0)
        backend.store(o_ref.at[b, head_rows, :], (acc_all * inv_all[:, None]).astype(o_ref.dtype), mask=row_ok)


def _whole(shape):
    """A BlockSpec that hands the kernel the whole array, whatever the program."""
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret", "poison"))
def _decode(q, k, v, lengths, layer, new=None, *, scale: float, config: DecodeConfig, interpret: bool, poison: bool):
    # q [B, N, D]; k, v [L, B, K, S, D]; lengths int32[B]; layer int32[1];
    # new: None, or (append int32[B], k_new [B, K, D], v_new [B, K, D]): then k and v are returned updated
    _, batch, kv_heads, _, _ = k.shape
    num_heads = q.shape[1]
    group = num_heads // kv_heads
    splits = config.num_splits
    out_shape = split_out_shape(q, splits, config.merge)
    fused = splits > 1 and config.fused_combine
    if fused:
        out_shape += [
            jax.ShapeDtypeStruct((batch * kv_heads,), jnp.int32),  # splits finished per (b, kv head)
            jax.ShapeDtypeStruct(q.shape, q.dtype),  # o
        ]
    inputs, aliases = [lengths, layer, q, k, v, *(new or ())], {}
    for i, o in enumerate(out_shape):
        if o.dtype == jnp.int32:  # the counters start at zero
            aliases[len(inputs)] = i
            inputs.append(jnp.zeros(o.shape, o.dtype))
        elif poison:  # NaN-filled buffers become the outputs: whatever the kernel fails to write stays NaN
            aliases[len(inputs)] = i
            inputs.append(jnp.full(o.shape, jnp.nan, o.dtype))
    num_aliased = len(aliases)
    if new is not None:  # the cache is updated in place: its buffers are the last two outputs
        aliases |= {3: len(out_shape), 4: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    kernel = functools.partial(
        _decode_kernel,
        append=new is not None,
        num_aliased=num_aliased,
        group=group,
        rows=group_rows(group),
        block_k=config.block_k,
        num_splits=splits,
        fused_combine=fused,
        scale=scale,
        precision=lax.Precision.HIGHEST if k.dtype == jnp.float32 else None,
        interpret=interpret,
    )
    grid = (batch, kv_heads, splits)
    combine = splits > 1 and not fused
    name = "jkv_decode_attention" if new is None else "jkv_decode_attention_append"
    trailing = 0 if new is None else 2
    return launch_split_kernel(
        kernel, inputs, out_shape, aliases, grid, config, interpret, name, combine, q.dtype, trailing=trailing
    )


def partial_rows(splits: int, merge: str) -> int:
    """Length of the split axis of the partials a split kernel allocates: ``splits``, rounded up to a power of
    two for ``merge="pallas"`` (:func:`merge_partials` loads them as one tile; the kernel writes the first
    ``splits``)."""
    if merge not in SPLIT_MERGES:
        raise ValueError(f"merge={merge!r} must be one of {SPLIT_MERGES}")
    return 1 << (splits - 1).bit_length() if merge == "pallas" else splits


def split_out_shape(q, splits: int, merge: str = "xla") -> list:
    """Outputs of a split-K decode kernel: the attention output itself for one split, else the partials
    ``acc [B, P, N, D]``, ``m [B, P, N]`` and ``denom [B, P, N]`` (float32) that ``combine_splits`` merges
    (with ``merge="pallas"``, ``P`` is the splits rounded up to a power of two, for :func:`merge_partials`;
    the kernel writes the first ``splits``)."""
    batch, num_heads, head_dim = q.shape
    if splits == 1:
        return [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    splits = partial_rows(splits, merge)
    return [
        jax.ShapeDtypeStruct((batch, splits, num_heads, head_dim), jnp.float32),  # acc
        jax.ShapeDtypeStruct((batch, splits, num_heads), jnp.float32),  # m
        jax.ShapeDtypeStruct((batch, splits, num_heads), jnp.float32),  # denom
    ]


def launch_split_kernel(
    kernel, inputs, out_shape, aliases, grid, config, interpret, name: str, combine: bool, dtype, trailing: int = 0
):
    """Launch a split-K decode kernel over whole-array refs and finish it: with ``combine``, its first three
    outputs are the partials of several splits, merged here (``combine_splits``) into ``dtype``; otherwise the
    kernel's last output before the ``trailing`` ones is the result (one split, or splits merged inside the
    kernel). With ``trailing`` outputs, returns ``(result, *trailing outputs)``. Shared by the contiguous,
    paged and Q8 decode kernels."""
    outs = backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        grid=grid,
        in_specs=[_whole(x.shape) for x in inputs],
        out_specs=[_whole(o.shape) for o in out_shape],
        out_shape=out_shape,
        input_output_aliases=aliases,
        name=name,
    )(*inputs)
    extra = tuple(outs[len(outs) - trailing :])
    outs = outs[: len(outs) - trailing]
    if not combine:
        result = outs[-1]
    elif config.merge == "pallas":
        result = merge_partials(*outs[:3], splits=grid[2], dtype=dtype, interpret=interpret)
    else:
        acc, m, denom = (x[:, : grid[2]] for x in outs[:3])  # (a free slice unless P was padded)
        result = combine_splits(m, denom, acc).astype(dtype)  # (B, N, D)
    return (result, *extra) if trailing else result


# ----------------------------------------------------------------------------------------------- validation


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _concrete(x):
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_args(q, k, v, lengths, layer=None) -> tuple[int, int, int, int, int]:
    """Validate the arguments of :func:`decode_attention`; return ``(B, N, K, S, D)``.

    Concrete lengths and layer are range-checked; traced ones cannot be (the kernel clamps them in bounds).
    """
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must have shape [B, N, D], got {getattr(q, 'shape', None)}")
    kshape, vshape = getattr(k, "shape", None), getattr(v, "shape", None)
    if kshape is None or len(kshape) not in (4, 5) or vshape != kshape:
        raise ValueError(f"k and v must both have shape [B, K, S, D] or [L, B, K, S, D], got {kshape} and {vshape}")
    if len(kshape) == 5 and layer is None:
        raise ValueError(f"k.shape={kshape} is a whole [L, B, K, S, D] cache: pass layer=")
    if len(kshape) == 4 and layer is not None:
        raise ValueError(f"layer={layer!r} needs a whole [L, B, K, S, D] cache, got k.shape={kshape}")
    if k.dtype != v.dtype or jnp.dtype(k.dtype) not in CACHE_DTYPES:
        raise TypeError(f"k and v must share a dtype among {[str(d) for d in CACHE_DTYPES]}, got {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating array, got dtype {q.dtype}")
    b, n, d = q.shape
    bk, kh, s, dk = kshape[-4:]
    if (bk, dk) != (b, d):
        raise ValueError(f"q.shape={q.shape} does not match k.shape={kshape} (batch and head_dim must agree)")
    if n % kh:
        raise ValueError(f"num_q_heads={n} must be a multiple of num_kv_heads={kh}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported; expected one of {HEAD_DIMS}")
    if getattr(lengths, "shape", None) != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be int[{b}], got {getattr(lengths, 'dtype', None)}{getattr(lengths, 'shape', None)}"
        )
    value = _concrete(lengths)
    if value is not None and (value.min(initial=0) < 0 or value.max(initial=0) > s):
        raise ValueError(f"lengths={value} must lie in [0, S={s}]")
    if layer is not None:
        if isinstance(layer, (bool, float)) or not (
            _is_int(layer) or (hasattr(layer, "dtype") and jnp.issubdtype(layer.dtype, jnp.integer))
        ):
            raise TypeError(f"layer must be an int or an integer scalar, got {layer!r}")
        if getattr(layer, "shape", ()) != ():
            raise ValueError(f"layer must be a scalar, got shape {layer.shape}")
        value = _concrete(layer)
        if value is not None and not 0 <= int(value) < kshape[0]:
            raise ValueError(f"layer={int(value)} out of range for num_layers={kshape[0]}")
    return b, n, kh, s, d


def softmax_scale(scale, head_dim: int) -> float:
    """The softmax scale of a decode call: ``head_dim ** -0.5`` for None, else ``scale``, a Python number (it
    is a static kernel parameter). Shared by every decode kernel's wrapper."""
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python number, got {scale!r}")
    return float(scale)


def check_launch_overrides(*, fused_combine=None, num_warps=None, **ints) -> None:
    """Types and ranges of the launch overrides the decode kernels share (None keeps a default): integers,
    ``num_splits`` / ``num_stages`` >= 1, ``num_warps`` in ``NUM_WARPS``, ``fused_combine`` a bool. Each kernel
    checks its own block-size argument."""
    if fused_combine is not None and not isinstance(fused_combine, bool):
        raise TypeError(f"fused_combine must be None or a bool, got {fused_combine!r}")
    for name, value in {**ints, "num_warps": num_warps}.items():
        if value is not None and not _is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    for name in ("num_splits", "num_stages"):
        if ints.get(name) is not None and ints[name] < 1:
            raise ValueError(f"{name}={ints[name]} must be >= 1")
    if num_warps is not None and num_warps not in NUM_WARPS:
        raise ValueError(f"{num_warps=} must be one of {NUM_WARPS}")


def _resolve_config(
    default: DecodeConfig, max_len: int, *, head_dim: int | None = None, itemsize: int | None = None, **overrides
) -> DecodeConfig:
    """The default with the caller's overrides (``None`` keeps the default), validated. Given ``head_dim`` and
    ``itemsize`` (of K/V), stages are capped so the resident K/V blocks fit in shared memory (:func:`max_stages`).
    """
    check_launch_overrides(**overrides)
    fused = overrides.pop("fused_combine", None)
    block_k, num_splits, num_warps, num_stages = (overrides.get(f) for f in DecodeConfig._fields[:4])
    if block_k is not None and (block_k < MIN_BLOCK or block_k & (block_k - 1) or block_k > max(max_len, MIN_BLOCK)):
        raise ValueError(f"{block_k=} must be a power of two in [{MIN_BLOCK}, max(S, {MIN_BLOCK})={max(max_len, 16)}]")
    given = (block_k, num_splits, num_warps, num_stages, fused, None)
    config = DecodeConfig(*(d if o is None else type(d)(o) for d, o in zip(default, given, strict=True)))
    if head_dim is None or itemsize is None:
        return config
    return config._replace(num_stages=min(config.num_stages, max_stages(config.block_k, head_dim, itemsize)))


# ----------------------------------------------------------------------------------------------- public


def decode_attention(
    q: Float[Array, "B N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    interpret: bool | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fused_combine: bool | None = None,
    poison: bool = False,
) -> Float[Array, "B N D"]:
    """Decode attention of one query per sequence over its first ``lengths[b]`` cache positions.

    ``layer`` selects the layer of a whole ``[L, B, K, S, D]`` cache inside the kernel (no copy of the layer).
    ``scale`` defaults to ``D ** -0.5``. ``interpret=None`` runs interpret mode off GPU. ``block_k``,
    ``num_splits``, ``num_warps``, ``num_stages`` and ``fused_combine`` override :func:`decode_config`.
    ``poison=True`` fills the kernel's output buffers with NaN before the launch (a test aid: elements it fails
    to write stay NaN).
    """
    *_, s, _ = check_args(q, k, v, lengths, layer)
    interpret, scale, config = _launch_settings(
        q,
        k,
        scale,
        interpret,
        block_k=block_k,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        fused_combine=fused_combine,
    )
    if k.ndim == 4:
        k, v, layer = k[None], v[None], 0  # a free reshape, not a copy
    if s < MIN_BLOCK:  # a tiny cache: pad it to one whole block (copies at most 15 positions per slab)
        pad = [(0, 0)] * 3 + [(0, MIN_BLOCK - s), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    return _decode(q, k, v, lengths, layer, scale=scale, config=config, interpret=interpret, poison=poison)


def _launch_settings(q, k, scale, interpret, **overrides) -> tuple[bool, float, DecodeConfig]:
    """Interpret mode, softmax scale and launch config of a decode call (``overrides`` as :func:`decode_attention`)."""
    b, _, d = q.shape
    kh, s = k.shape[-3], k.shape[-2]
    interpret = backend.resolve_interpret(interpret)
    itemsize = jnp.dtype(k.dtype).itemsize
    config = _resolve_config(decode_config(b, kh, s, d, k.dtype), s, head_dim=d, itemsize=itemsize, **overrides)
    return interpret, softmax_scale(scale, d), config


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
    interpret: bool | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    poison: bool = False,
) -> tuple[Float[Array, "B N D"], Float[Array, "*L B K S D"], Float[Array, "*L B K S D"]]:
    """A decode step's cache write and attention in one kernel; returns ``(out, k, v)``.

    Equals writing ``k_new``/``v_new`` ``[B, K, D]`` (cast to the cache dtype) at position ``lengths[b] - 1`` of
    each sequence (of ``layer`` for a whole cache), then :func:`decode_attention` over the first ``lengths[b]``
    positions: ``lengths`` counts the new token. The program that attends over the new position takes it from
    ``k_new``/``v_new`` and writes that one row; ``k`` and ``v`` are updated in place when the caller donates
    them (inside a jitted step whose cache is donated, no copy). ``append`` (bool or int ``[B]``, default all)
    selects the sequences that write; the others attend over what their cache holds and leave it unchanged, as
    does a sequence of length 0. Launch overrides as :func:`decode_attention` (no fused combine).
    """
    b, _, kh, s, d = check_args(q, k, v, lengths, layer)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if getattr(x, "shape", None) != (b, kh, d):
            raise ValueError(f"{name} must have shape [B, K, D] = {(b, kh, d)}, got {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    if append is None:
        append = jnp.ones((b,), jnp.int32)
    elif getattr(append, "shape", None) != (b,) or not (
        jnp.issubdtype(append.dtype, jnp.integer) or append.dtype == jnp.bool_
    ):
        raise ValueError(
            f"append must be bool or int [{b}], got {getattr(append, 'dtype', None)}{getattr(append, 'shape', None)}"
        )
    interpret, scale, config = _launch_settings(
        q, k, scale, interpret, block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages
    )
    whole = k.ndim == 5
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    append = jnp.asarray(append).astype(jnp.int32)
    if s < MIN_BLOCK:  # the kernel would read a padded copy: write in XLA, then attend
        rows = jnp.arange(b)
        pos = jnp.where((append != 0) & (lengths > 0), lengths - 1, s)  # s: dropped

        def put(buf, new):
            at = buf.at[layer, rows, :, pos, :] if whole else buf.at[rows, :, pos, :]
            return at.set(new.astype(buf.dtype), mode="drop")

        k, v = put(k, k_new), put(v, v_new)
        out = decode_attention(
            q,
            k,
            v,
            lengths,
            layer=layer,
            scale=scale,
            interpret=interpret,
            block_k=block_k,
            num_splits=num_splits,
            num_warps=num_warps,
            num_stages=num_stages,
            poison=poison,
        )
        return out, k, v
    k5, v5 = (k, v) if whole else (k[None], v[None])
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    out, k5, v5 = _decode(
        q,
        k5,
        v5,
        lengths,
        layer,
        (append, k_new, v_new),
        scale=scale,
        config=config,
        interpret=interpret,
        poison=poison,
    )
    return (out, k5, v5) if whole else (out, k5[0], v5[0])


def decode_attention_reference(
    q: Float[Array, "B N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    interpret: bool | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
) -> Float[Array, "B N D"]:
    """Pure-``jnp`` reference with the kernel's signature (the launch arguments are accepted and ignored).

    Computed in float32 at the highest matmul precision; positions past ``lengths[b]`` may hold anything, NaN
    included.
    """
    del interpret, block_k, num_splits
    b, n, kh, s, d = check_args(q, k, v, lengths, layer)
    if k.ndim == 5:
        k, v = k[layer], v[layer]
    scale = d**-0.5 if scale is None else scale
    hi = lax.Precision.HIGHEST
    qg = q.astype(jnp.float32).reshape(b, kh, n // kh, d)  # (B, K, G, D)
    valid = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]  # (B, S)
    kz = jnp.where(valid[:, None, :, None], k.astype(jnp.float32), 0.0)
    vz = jnp.where(valid[:, None, :, None], v.astype(jnp.float32), 0.0)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, kz, precision=hi) * scale
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))  # (B, K, G, S); masked positions give 0
    out = jnp.einsum("bkgs,bksd->bkgd", p, vz, precision=hi)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = out * jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out.reshape(b, n, d).astype(q.dtype)
