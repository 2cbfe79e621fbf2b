"""Plumbing the decode kernels share: launch configs, split-K arithmetic and the kernel that merges split partials
(their argument checks: ``pallas_kernels.checks``).

A split-K decode kernel runs one program per ``(b, kv head, split)``; split ``j`` walks its share of the
``cdiv(lengths[b], block_k)`` blocks (:func:`split_blocks`). With one split the kernel normalises and writes the
output itself; with several each split leaves its running max ``m``, softmax denominator and unnormalised
``acc`` (:func:`split_out_shape`), and :func:`merge_partials`, one program per query head, merges them with a
log-sum-exp rescale (:func:`launch_split_kernel` runs both).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, checks

LOG2E = math.log2(math.e)  # the softmax kernels exponentiate in base 2: scores times this, then exp2
MIN_BLOCK = 16  # Triton's smallest dot dimension: the q tile has at least this many rows, blocks this many keys
# Shared memory Triton itself takes beside the pipelined K/V buffers (Hopper: 227 - 27 = 200 KiB for the buffers).
TRITON_SMEM_RESERVE = 27 * 1024


class DecodeConfig(NamedTuple):
    """Launch parameters of a Triton split-K decode kernel (static: each distinct value compiles its own kernel)."""

    block_k: int  # keys per loop step (power of two, 16 <= block_k <= S)
    num_splits: int  # programs per (b, kv head), each walking an equal share of the sequence's blocks
    num_warps: int
    num_stages: int  # Triton software-pipelining depth of the loop's K/V loads
    # With several splits, the last program of a (b, kv head) to finish merges the partials (an atomic count
    # a (b, kv head)) instead of a second launch doing it (:func:`merge_partials`)
    fused_merge: bool = False


# ----------------------------------------------------------------------------------------------- launch rules


def reach(max_len: int, window: int | None) -> int:
    """Most positions one query reads: the cache length, or the window where it is shorter (launch rules)."""
    return max_len if window is None else min(max_len, int(window))


def pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def pow2_ceil(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def group_rows(group: int) -> int:
    """Rows of the query tile for ``group`` query heads per kv head: a power of two, at least 16."""
    return max(MIN_BLOCK, pow2_ceil(group))


def choose_block_k(max_len: int, head_dim: int, itemsize: int) -> int:
    """Keys per loop step: a 32 KiB K block (128 keys of 128 bf16), never more than the cache holds."""
    block_k = max(MIN_BLOCK, pow2_floor((32 * 1024) // (head_dim * itemsize)))
    block_k = min(block_k, 256)
    return max(MIN_BLOCK, min(block_k, pow2_floor(max(max_len, MIN_BLOCK))))


def smem_budget() -> int:
    """Shared memory the pipelined K/V buffers of a Triton kernel may take on this device."""
    return backend.shared_memory_per_block() - TRITON_SMEM_RESERVE


def max_stages(block_k: int, head_dim: int, itemsize: int, width: int | None = None) -> int:
    """Deepest pipeline whose buffers fit :func:`smem_budget`: Triton keeps ``stages - 1`` K and V blocks resident,
    each ``width`` columns wide (default ``head_dim``; a padded tile's buffers take its padded width)."""
    return 1 + smem_budget() // (2 * block_k * (width or head_dim) * itemsize)


def tile_max_stages(block_k: int, head_dim: int, itemsize: int) -> int:
    """:func:`max_stages` of the bf16 / f32 decode kernels, whose buffers take their tile's width
    (:func:`tile_width`: a padded tile's padded width)."""
    return max_stages(block_k, head_dim, itemsize, tile_width(head_dim))


def pipeline_stages(block_k: int, head_dim: int, itemsize: int) -> int:
    """Stages of the bf16 / f32 decode kernels: two blocks of their tile's width in flight (3 stages), more where the
    tile is padded past the head (80 in a 128-column tile: 4, so about as many real bytes are in flight as in the
    128 kernel's two blocks), as far as shared memory holds the padded buffers."""
    return min(1 + -(-2 * tile_width(head_dim) // head_dim), tile_max_stages(block_k, head_dim, itemsize))


def choose_num_splits(
    batch: int, num_kv_heads: int, max_len: int, block_k: int, num_multiprocessors: int | None = None
) -> int:
    """Splits per ``(b, kv head)`` so that about four programs per multiprocessor share the work.

    Decode attention is memory-bound: the GPU streams K/V at full bandwidth only with enough programs in flight.
    A large batch needs few splits; a single sequence needs its blocks spread over many programs. Each split
    keeps at least two blocks of a full-length sequence so the loop still pipelines its loads. (Measured:
    docs/BENCHMARKS.md, "Decode attention"; the rules: docs/notes/kernel_rules.md.)
    """
    sms = num_multiprocessors or backend.num_multiprocessors()
    programs = batch * num_kv_heads
    want = math.ceil(4 * sms / programs)
    most = max(1, math.ceil(max_len / block_k) // 2)
    return max(1, min(want, most))


def decode_config(
    batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype, *, num_multiprocessors: int | None = None
) -> DecodeConfig:
    """Default launch parameters of the contiguous Triton kernel for a shape (the rules of the functions it calls)."""
    itemsize = jnp.dtype(dtype).itemsize
    block_k = choose_block_k(max_len, head_dim, itemsize)
    splits = choose_num_splits(batch, num_kv_heads, max_len, block_k, num_multiprocessors)
    # A float32 dot runs on the FMA units ("ieee" precision): smaller tiles per warp keep registers in bounds.
    num_warps = 4 if itemsize < 4 else 8
    return DecodeConfig(block_k, splits, num_warps, pipeline_stages(block_k, head_dim, itemsize))


def resolve_config(default: DecodeConfig, max_len: int, head_dim: int, itemsize: int, **overrides) -> DecodeConfig:
    """The default with the caller's overrides (``None`` keeps the default), validated; stages are capped so the
    resident K/V blocks of ``itemsize`` bytes fit in shared memory (:func:`max_stages`). ``fused_merge`` (a bool)
    picks where several splits' partials are merged (:class:`DecodeConfig`)."""
    fused = checks.check_flag("fused_merge", overrides.pop("fused_merge", None))
    checks.check_launch_overrides(**overrides)
    block_k = overrides.get("block_k")
    top = max(max_len, MIN_BLOCK)
    if block_k is not None and (block_k < MIN_BLOCK or block_k & (block_k - 1) or block_k > top):
        raise ValueError(f"{block_k=} must be a power of two in [{MIN_BLOCK}, max(S, {MIN_BLOCK})={top}]")
    config = default._replace(**{k: int(v) for k, v in overrides.items() if v is not None})
    if fused is not None:
        config = config._replace(fused_merge=bool(fused))
    return config._replace(num_stages=min(config.num_stages, tile_max_stages(config.block_k, head_dim, itemsize)))


def launch_settings(default, max_len: int, head_dim: int, itemsize: int, scale, interpret, **overrides):
    """Interpret mode, softmax scale and launch config (``default`` with ``overrides``, :func:`resolve_config`) of
    a checked Triton decode call over ``max_len`` positions of ``itemsize``-byte K/V."""
    interpret = backend.resolve_interpret(interpret)
    config = resolve_config(default, max_len, head_dim, itemsize, **overrides)
    return interpret, checks.softmax_scale(scale, head_dim), config


def whole_cache(arrays, layer, positions: int | None = None):
    """Cache arrays as whole ``[L, ...]`` caches (one layer ``[B, K, S, X]``: free reshapes, layer 0), padded along
    the position axis to ``positions`` where they hold fewer (a tiny cache: a copy), and ``layer`` as ``int32[1]``."""
    if arrays[0].ndim == 4:
        arrays, layer = tuple(x[None] for x in arrays), 0  # free reshapes, not copies
    held = arrays[0].shape[3]
    if positions is not None and held < positions:
        pad = [(0, 0)] * 3 + [(0, positions - held), (0, 0)]
        arrays = tuple(jnp.pad(x, pad) for x in arrays)
    return arrays, jnp.asarray(layer, jnp.int32).reshape(1)


# ----------------------------------------------------------------------------------------------- kernel bodies


def dot(a, b, *, trans_b: bool = False, precision=None):
    """``a @ b`` (``a @ b.T`` with ``trans_b``) of two 2-D tiles, accumulated and returned in float32."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def inverse_or_zero(denom):
    """``1 / denom`` where the softmax denominator is positive, 0 where nothing was attended (no NaN)."""
    return jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------- split-K


def split_blocks(n, j, block_k: int, num_splits: int, first=0):
    """Blocks ``[lo, hi)`` of a sequence of ``n`` positions that split ``j`` of ``num_splits`` walks: blocks
    ``first .. ceil(n / block_k) - 1`` (``first``: the window's first block) cut into equal shares (the last ones
    may be shorter or empty)."""
    end = pl.cdiv(n, block_k)
    per_split = pl.cdiv(end if isinstance(first, int) and first == 0 else end - first, num_splits)
    lo = first + j * per_split
    return lo, jnp.minimum(lo + per_split, end)


def window_start(n, window: int | None):
    """First position a query at ``n - 1`` sees: ``max(n - window, 0)``, 0 without a window."""
    return 0 if window is None else jnp.maximum(n - window, 0)


def softcapped(s, softcap: float | None):
    """Scores ``s`` (already scaled) capped as ``softcap * tanh(s / softcap)``; as they are without a cap."""
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def partial_rows(splits: int) -> int:
    """Length of the split axis of the partials a split kernel allocates: ``splits`` rounded up to a power of two
    (:func:`merge_partials` loads them as one tile; the kernel writes the first ``splits``)."""
    return 1 << (splits - 1).bit_length()


def split_out_shape(q, splits: int, fused_merge: bool = False, kv_heads: int = 1) -> list:
    """Outputs of a split-K decode kernel: the attention output itself for one split, else the partials
    ``acc [B, P, N, D]``, ``m [B, P, N]`` and ``denom [B, P, N]`` (float32), ``P = partial_rows(splits)``; with
    ``fused_merge`` these, then the output and the count of finished splits ``int32 [B, kv_heads]``
    (:func:`merge_when_last`: the kernel takes the count zeroed, :func:`split_inputs`)."""
    batch, num_heads, head_dim = q.shape
    if splits == 1:
        return [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    rows = partial_rows(splits)
    partials = [
        jax.ShapeDtypeStruct((batch, rows, num_heads, head_dim), jnp.float32),  # acc
        jax.ShapeDtypeStruct((batch, rows, num_heads), jnp.float32),  # m
        jax.ShapeDtypeStruct((batch, rows, num_heads), jnp.float32),  # denom
    ]
    if not fused_merge:
        return partials
    return [*partials, jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, kv_heads), jnp.int32)]


def fuses_merge(config) -> bool:
    """Whether a launch of ``config`` (a :class:`DecodeConfig` or ``paged.PagedConfig``: both have the field)
    merges its splits inside the kernel (several splits and ``fused_merge``)."""
    return config.fused_merge and config.num_splits > 1


def split_inputs(inputs: list, out_shape: list, aliases: dict, config: DecodeConfig) -> tuple[list, dict]:
    """``inputs`` and ``aliases`` of a split-K decode launch with, where it fuses its merge (:func:`fuses_merge`),
    the zeroed count of finished splits last, aliased to its output (the fifth of ``out_shape``)."""
    if not fuses_merge(config):
        return inputs, aliases
    count = out_shape[4]
    return [*inputs, jnp.zeros(count.shape, count.dtype)], {**aliases, len(inputs): 4}


def whole(shape):
    """A BlockSpec that hands the kernel the whole array, whatever the program."""
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def whole_call(kernel, inputs, out_shape, *, grid, num_warps: int, num_stages: int, interpret, name: str, aliases=None):
    """``backend.pallas_call`` of ``kernel`` on ``inputs`` where every program sees each input and output whole
    (:func:`whole`) and indexes them itself; ``out_shape`` one ShapeDtypeStruct or a list of them."""
    many = isinstance(out_shape, list)
    return backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        grid=grid,
        in_specs=[whole(x.shape) for x in inputs],
        out_specs=[whole(o.shape) for o in out_shape] if many else whole(out_shape.shape),
        out_shape=out_shape,
        input_output_aliases=aliases or {},
        name=name,
    )(*inputs)


def column_slices(head_dim: int) -> list:
    """The column chunks a Triton kernel reads ``head_dim`` in (power-of-two tiles): ``[slice(None)]`` (the whole
    row, one tile) for a power of two, else one ``pl.ds`` per set bit, widest first (96: 64 then 32; 80: 64
    then 16): the fewest, widest products."""
    if head_dim & (head_dim - 1) == 0:
        return [slice(None)]
    widths = [1 << i for i in reversed(range(head_dim.bit_length())) if head_dim >> i & 1]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [pl.ds(c, w) for c, w in zip(starts, widths, strict=True)]


def column_tiles(head_dim: int, pad: bool | None = None) -> list:
    """The column tiles a Triton decode kernel reads a head of ``head_dim`` in: :func:`column_slices`, or with
    ``pad`` one ``pl.ds`` of the next power of two, whose columns past the head read as zeros and are never stored
    (``decode_walk.query_tile`` / ``block_tile``, ``paged.PagedView``). ``pad`` None: where the chunks would include
    one of 16 columns (80 = 64 + 16, 48 = 32 + 16), which lowers poorly (spills, twice the loop's instructions:
    docs/BENCHMARKS.md, "Padded column tiles")."""
    return [pl.ds(0, pow2_ceil(head_dim))] if pads(head_dim, pad) else column_slices(head_dim)


def pads(head_dim: int, pad: bool | None = None) -> bool:
    """Whether :func:`column_tiles` reads ``head_dim`` as one padded tile (``pad`` as there)."""
    if pad is None:
        pad = head_dim % 32 != 0
    return pad and head_dim & (head_dim - 1) != 0


def tile_width(head_dim: int) -> int:
    """Columns the bf16 / f32 kernels' K and V tiles span (shared-memory buffers included): the head, or the next
    power of two where :func:`column_tiles` pads it."""
    return pow2_ceil(head_dim) if pads(head_dim) else head_dim


def _merge_kernel(acc_ref, m_ref, denom_ref, o_ref, *, splits: int, packed: bool):
    merge_row(acc_ref, m_ref, denom_ref, o_ref, pl.program_id(0), pl.program_id(1), splits=splits, packed=packed)


def merge_row(acc_ref, m_ref, denom_ref, o_ref, r, c, *, splits: int, packed: bool = False, volatile: bool = False):
    """``o[r, c]`` from the first ``splits`` partials of row ``(r, c)`` (:func:`merge_partials`); ``volatile``
    partials' loads (:func:`merge_when_last`: other programs of the launch wrote them)."""
    p_rows = acc_ref.shape[1]  # splits padded to a power of two
    p_ok = lax.broadcasted_iota(jnp.int32, (p_rows,), 0) < splits
    load = functools.partial(backend.load, volatile=volatile)
    if not packed:  # m, denom [R, P, C]
        m = load(m_ref.at[r, :, c], mask=p_ok, other=-jnp.inf)
        denom = load(denom_ref.at[r, :, c], mask=p_ok, other=0.0)
    else:  # both in one [R, P, C, stats] array: column 0 the max, column 1 the denominator
        col = lambda i, other: load(m_ref.at[r, :, c, pl.ds(i, 1)], mask=p_ok[:, None], other=other)
        m, denom = col(0, -jnp.inf).reshape(p_rows), col(1, 0.0).reshape(p_rows)
    chunks = column_slices(acc_ref.shape[-1])
    accs = [load(acc_ref.at[r, :, c, at], mask=p_ok[:, None], other=0.0) for at in chunks]  # [Pp, W]
    m_max = jnp.max(m)
    weight = jnp.exp(m - jnp.where(m_max > -jnp.inf, m_max, 0.0))  # exp(-inf) = 0: empty splits drop out
    total = jnp.sum(weight * denom)
    outs = [jnp.sum(weight[:, None] * acc, axis=0) for acc in accs]  # [W]
    inv = inverse_or_zero(total)  # no position at all: zeros
    for at, out in zip(chunks, outs, strict=True):
        o_ref[r, c, at] = (out * inv).astype(o_ref.dtype)


def merge_partials(acc, m, denom=None, *, splits: int, dtype, interpret: bool):
    """Merge split-K partials: ``acc [R, Pp, C, D]``, ``m`` and ``denom [R, Pp, C]`` (or ``denom=None`` and
    ``m [R, Pp, C, S]`` holding the max in column 0 and the denominator in column 1) to ``[R, C, D]`` in
    ``dtype``, merging the first ``splits`` entries along ``Pp`` (a power of two >= splits; the rest are never
    read). A split that saw no position (``m = -inf``, ``denom = 0``) drops out; no position at all gives zeros.
    One program per ``(r, c)`` loads its partials at once: one launch and about one memory latency."""
    rows, padded, cols, head_dim = acc.shape
    if padded & (padded - 1) or not 1 <= splits <= padded:
        raise ValueError(f"acc.shape[1]={padded} must be a power of two >= splits={splits}")
    inputs = [acc, m, m if denom is None else denom]
    kernel = functools.partial(_merge_kernel, splits=splits, packed=denom is None)
    out_shape = jax.ShapeDtypeStruct((rows, cols, head_dim), dtype)
    launch = dict(grid=(rows, cols), num_warps=4 if padded * head_dim >= 4096 else 1, num_stages=1)
    return whole_call(kernel, inputs, out_shape, **launch, interpret=interpret, name="jkv_merge_splits")


def merge_when_last(out_refs, b, h, *, group: int, num_splits: int, interpret: bool) -> None:
    """In a split-K decode program that stored its partials (``out_refs``: ``acc``, ``m``, ``denom``, ``o``,
    ``count``; :func:`split_out_shape` with ``fused_merge``): count this split finished for ``(b, kv head h)``;
    the program that finishes last merges the ``group`` query heads' partials into ``o`` (:func:`merge_row`).

    The program's threads meet at a barrier after their stores, so the count's release (acquire-release, GPU
    scope) covers every partial of the program; the last program's acquire precedes its reads, volatile ones (from L2,
    where the other programs' stores are, never a stale L1 line). Interpret mode runs the programs one after another."""
    acc_ref, m_ref, denom_ref, o_ref, count_ref = out_refs
    backend.sync_threads(interpret)
    done = backend.atomic_add(count_ref, (b, h), jnp.int32(1))

    @pl.when(done == num_splits - 1)
    def _merge():
        for g in range(group):
            merge_row(acc_ref, m_ref, denom_ref, o_ref, b, h * group + g, splits=num_splits, volatile=True)


def launch_split_kernel(
    kernel, inputs, out_shape, aliases, grid, config, interpret, name: str, dtype, trailing: int = 0
):
    """Launch a split-K decode kernel over whole-array refs and finish it: with several splits (``grid[2]``) its
    first three outputs are the partials, merged here (:func:`merge_partials`) into ``dtype``; with one, its
    first output is the result; where it merges them itself (:func:`fuses_merge`), its fourth. With ``trailing``
    outputs after those, returns ``(result, *trailing outputs)``. Shared by the contiguous, paged and Q8 decode
    kernels."""
    inputs, aliases = split_inputs(inputs, out_shape, aliases, config)
    launch = dict(grid=grid, num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret)
    outs = whole_call(kernel, inputs, out_shape, **launch, name=name, aliases=aliases)
    extra = tuple(outs[len(outs) - trailing :])
    outs = outs[: len(outs) - trailing]
    if grid[2] == 1:
        result = outs[-1]
    elif fuses_merge(config):
        result = outs[3]
    else:
        result = merge_partials(*outs[:3], splits=grid[2], dtype=dtype, interpret=interpret)
    return (result, *extra) if trailing else result
