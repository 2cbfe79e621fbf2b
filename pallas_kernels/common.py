"""Plumbing the decode kernels share: argument checks, the softmax scale, launch configs, split-K arithmetic and
the kernel that merges split partials.

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
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend

MIN_BLOCK = 16  # Triton's smallest dot dimension: the q tile has at least this many rows, blocks this many keys
HEAD_DIMS = (16, 32, 64, 128, 256)  # power-of-two tiles; 64 and 128 are the tested and tuned ones
CACHE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
NUM_WARPS = (1, 2, 4, 8, 16)
# Shared memory Triton itself takes beside the pipelined K/V buffers (Hopper: 227 - 27 = 200 KiB for the buffers).
TRITON_SMEM_RESERVE = 27 * 1024


class DecodeConfig(NamedTuple):
    """Launch parameters of a Triton split-K decode kernel (static: each distinct value compiles its own kernel)."""

    block_k: int  # keys per loop step (power of two, 16 <= block_k <= S)
    num_splits: int  # programs per (b, kv head), each walking an equal share of the sequence's blocks
    num_warps: int
    num_stages: int  # Triton software-pipelining depth of the loop's K/V loads


# ----------------------------------------------------------------------------------------------- validation


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def concrete(x):
    """``x`` as a NumPy array, or ``None`` when it is traced (then it cannot be range-checked)."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_int_vector(name: str, x, batch: int):
    """``x`` int ``[B]``; its values as NumPy, or None when traced."""
    if getattr(x, "shape", None) != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be int[{batch}], got {getattr(x, 'dtype', None)}{getattr(x, 'shape', None)}")
    return concrete(x)


def check_lengths(lengths, batch: int, max_len: int, bound: str) -> None:
    """``lengths`` int ``[B]``; concrete values in ``[0, max_len]`` (``bound`` spells the bound out)."""
    value = check_int_vector("lengths", lengths, batch)
    if value is not None and (value.min(initial=0) < 0 or value.max(initial=0) > max_len):
        raise ValueError(f"lengths={value} must lie in [0, {bound}]")


def check_layer(layer, num_layers: int) -> None:
    """``layer`` an int or an integer scalar; concrete values in ``[0, num_layers)``."""
    if isinstance(layer, (bool, float)) or not (
        is_int(layer) or (hasattr(layer, "dtype") and jnp.issubdtype(layer.dtype, jnp.integer))
    ):
        raise TypeError(f"layer must be an int or an integer scalar, got {layer!r}")
    if getattr(layer, "shape", ()) != ():
        raise ValueError(f"layer must be a scalar, got shape {layer.shape}")
    value = concrete(layer)
    if value is not None and not 0 <= int(value) < num_layers:
        raise ValueError(f"layer={int(value)} out of range for num_layers={num_layers}")


def check_kv(q, k, v, layer, *, q_axes: str, axes: str, layer_needs: str, names=("k", "v"), dtypes=CACHE_DTYPES):
    """What every attention kernel checks first: ``q`` 3-D (``q_axes`` spells its axes) and floating; ``k`` and ``v``
    (``names``) of one shape, ``axes`` or ``[L, *axes]``, with ``layer`` exactly for the latter (``layer_needs``
    says what a layer needs, in the error) and in range; one dtype (among ``dtypes`` unless None); head_dim equal
    to ``q``'s, kv heads dividing query heads. Returns ``(q.shape, k.shape[-4:])``."""
    kn, vn = names
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must have shape {q_axes}, got {getattr(q, 'shape', None)}")
    kshape, vshape = getattr(k, "shape", None), getattr(v, "shape", None)
    if kshape is None or len(kshape) not in (4, 5) or vshape != kshape:
        raise ValueError(f"{kn} and {vn} must both have shape {axes} or [L, {axes[1:]}, got {kshape} and {vshape}")
    if len(kshape) == 5 and layer is None:
        raise ValueError(f"{kn}.shape={kshape} holds every layer [L, {axes[1:]}: pass layer=")
    if len(kshape) == 4 and layer is not None:
        raise ValueError(f"layer={layer!r} {layer_needs}, got {kn}.shape={kshape}")
    if k.dtype != v.dtype or (dtypes is not None and jnp.dtype(k.dtype) not in dtypes):
        among = "" if dtypes is None else f" among {[str(d) for d in dtypes]}"
        raise TypeError(f"{kn} and {vn} must share a dtype{among}, got {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating array, got dtype {q.dtype}")
    num_heads, kv_heads, head_dim = q.shape[1], kshape[-3], kshape[-1]
    if head_dim != q.shape[2]:
        raise ValueError(f"q.shape={q.shape} does not match {kn}.shape={kshape} (head_dim must agree)")
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"num_q_heads={num_heads} must be a multiple of num_kv_heads={kv_heads}")
    if layer is not None:
        check_layer(layer, kshape[0])
    return q.shape, kshape[-4:]


def check_block_tables(block_tables, batch: int, num_pages: int, page_size: int, first=None, end=None, why=None):
    """``block_tables`` int ``[B, M]``; where the table and the (concrete) positions ``[first[b], end[b])`` that
    sequence ``b`` reads are known, each entry covering them names a page of the pool (``why(b)`` says who reads
    it); entries outside may be anything (a ring's released pages)."""
    tshape = getattr(block_tables, "shape", None)
    if tshape is None or len(tshape) != 2 or tshape[0] != batch or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must be int[{batch}, M], got {getattr(block_tables, 'dtype', None)}{tshape}")
    tables = concrete(block_tables)
    if tables is None or first is None or end is None:
        return
    column = np.arange(tshape[1])[None, :]
    read = (column >= first[:, None] // page_size) & (column < -(-end[:, None] // page_size))
    bad = read & ((tables < 0) | (tables >= num_pages))
    if bad.any():
        b0, m0 = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"block_tables[{b0}, {m0}]={int(tables[b0, m0])} must name a page in [0, {num_pages}): {why(b0)}"
        )


def check_args(q, k, v, lengths, layer=None) -> tuple[int, int, int, int, int]:
    """Validate the arguments of a contiguous decode kernel (and of its reference); return ``(B, N, K, S, D)``.

    Concrete lengths and layer are range-checked; traced ones cannot be (the kernel clamps them in bounds).
    """
    whole = "needs a whole [L, B, K, S, D] cache"
    (b, n, d), (bk, kh, s, _) = check_kv(q, k, v, layer, q_axes="[B, N, D]", axes="[B, K, S, D]", layer_needs=whole)
    if bk != b:
        raise ValueError(f"q.shape={q.shape} does not match k.shape={k.shape} (batch and head_dim must agree)")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported; expected one of {HEAD_DIMS}")
    check_lengths(lengths, b, s, f"S={s}")
    return b, n, kh, s, d


def check_window_softcap(window, softcap) -> None:
    """``window`` (positions a query sees, itself included) None or an int >= 1; ``softcap`` None or a Python
    number > 0 (both static kernel parameters)."""
    if window is not None and (not is_int(window) or window < 1):
        raise ValueError(f"window={window!r} must be None or an int >= 1")
    if softcap is not None:
        if not isinstance(softcap, (int, float, np.floating, np.integer)) or isinstance(softcap, bool):
            raise TypeError(f"softcap must be None or a Python number, got {softcap!r}")
        if not softcap > 0:
            raise ValueError(f"softcap={softcap} must be > 0")


def reach(max_len: int, window: int | None) -> int:
    """Most positions one query reads: the cache length, or the window where it is shorter (launch rules)."""
    return max_len if window is None else min(max_len, int(window))


def softmax_scale(scale, head_dim: int) -> float:
    """The softmax scale of a decode call: ``head_dim ** -0.5`` for None, else ``scale``, a Python number (it
    is a static kernel parameter)."""
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python number, got {scale!r}")
    return float(scale)


def check_launch_overrides(*, num_warps=None, **ints) -> None:
    """Types and ranges of the launch overrides the Triton decode kernels share (None keeps a default): integers,
    ``num_splits`` / ``num_stages`` >= 1, ``num_warps`` in ``NUM_WARPS``. Each kernel checks its own block size."""
    for name, value in {**ints, "num_warps": num_warps}.items():
        if value is not None and not is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    for name in ("num_splits", "num_stages"):
        if ints.get(name) is not None and ints[name] < 1:
            raise ValueError(f"{name}={ints[name]} must be >= 1")
    if num_warps is not None and num_warps not in NUM_WARPS:
        raise ValueError(f"{num_warps=} must be one of {NUM_WARPS}")


# ----------------------------------------------------------------------------------------------- launch rules


def pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def group_rows(group: int) -> int:
    """Rows of the query tile for ``group`` query heads per kv head: a power of two, at least 16."""
    return max(MIN_BLOCK, 1 << (group - 1).bit_length())


def choose_block_k(max_len: int, head_dim: int, itemsize: int) -> int:
    """Keys per loop step: a 32 KiB K block (128 keys of 128 bf16), never more than the cache holds."""
    block_k = max(MIN_BLOCK, pow2_floor((32 * 1024) // (head_dim * itemsize)))
    block_k = min(block_k, 256)
    return max(MIN_BLOCK, min(block_k, pow2_floor(max(max_len, MIN_BLOCK))))


def smem_budget() -> int:
    """Shared memory the pipelined K/V buffers of a Triton kernel may take on this device."""
    return backend.shared_memory_per_block() - TRITON_SMEM_RESERVE


def max_stages(block_k: int, head_dim: int, itemsize: int) -> int:
    """Deepest pipeline whose buffers fit :func:`smem_budget`: Triton keeps ``stages - 1`` K and V blocks resident."""
    return 1 + smem_budget() // (2 * block_k * head_dim * itemsize)


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
    stages = min(3, max_stages(block_k, head_dim, itemsize))
    return DecodeConfig(block_k, splits, num_warps, stages)


def resolve_config(default: DecodeConfig, max_len: int, head_dim: int, itemsize: int, **overrides) -> DecodeConfig:
    """The default with the caller's overrides (``None`` keeps the default), validated; stages are capped so the
    resident K/V blocks of ``itemsize`` bytes fit in shared memory (:func:`max_stages`)."""
    check_launch_overrides(**overrides)
    block_k = overrides.get("block_k")
    top = max(max_len, MIN_BLOCK)
    if block_k is not None and (block_k < MIN_BLOCK or block_k & (block_k - 1) or block_k > top):
        raise ValueError(f"{block_k=} must be a power of two in [{MIN_BLOCK}, max(S, {MIN_BLOCK})={top}]")
    config = default._replace(**{k: int(v) for k, v in overrides.items() if v is not None})
    return config._replace(num_stages=min(config.num_stages, max_stages(config.block_k, head_dim, itemsize)))


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


def split_out_shape(q, splits: int) -> list:
    """Outputs of a split-K decode kernel: the attention output itself for one split, else the partials
    ``acc [B, P, N, D]``, ``m [B, P, N]`` and ``denom [B, P, N]`` (float32), ``P = partial_rows(splits)``."""
    batch, num_heads, head_dim = q.shape
    if splits == 1:
        return [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    rows = partial_rows(splits)
    return [
        jax.ShapeDtypeStruct((batch, rows, num_heads, head_dim), jnp.float32),  # acc
        jax.ShapeDtypeStruct((batch, rows, num_heads), jnp.float32),  # m
        jax.ShapeDtypeStruct((batch, rows, num_heads), jnp.float32),  # denom
    ]


def whole(shape):
    """A BlockSpec that hands the kernel the whole array, whatever the program."""
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


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
    inv = inverse_or_zero(total)  # no position at all: zeros
    o_ref[r, c, :] = (out * inv).astype(o_ref.dtype)


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
    return backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=4 if padded * head_dim >= 4096 else 1,
        num_stages=1,
        grid=(rows, cols),
        in_specs=[whole(x.shape) for x in inputs],
        out_specs=whole((rows, cols, head_dim)),
        out_shape=jax.ShapeDtypeStruct((rows, cols, head_dim), dtype),
        name="jkv_merge_splits",
    )(*inputs)


def launch_split_kernel(
    kernel, inputs, out_shape, aliases, grid, config, interpret, name: str, dtype, trailing: int = 0
):
    """Launch a split-K decode kernel over whole-array refs and finish it: with several splits (``grid[2]``) its
    first three outputs are the partials, merged here (:func:`merge_partials`) into ``dtype``; with one, its
    first output is the result. With ``trailing`` outputs after those, returns ``(result, *trailing outputs)``.
    Shared by the contiguous, paged and Q8 decode kernels."""
    outs = backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        grid=grid,
        in_specs=[whole(x.shape) for x in inputs],
        out_specs=[whole(o.shape) for o in out_shape],
        out_shape=out_shape,
        input_output_aliases=aliases,
        name=name,
    )(*inputs)
    extra = tuple(outs[len(outs) - trailing :])
    outs = outs[: len(outs) - trailing]
    if grid[2] == 1:
        result = outs[-1]
    else:
        result = merge_partials(*outs[:3], splits=grid[2], dtype=dtype, interpret=interpret)
    return (result, *extra) if trailing else result
