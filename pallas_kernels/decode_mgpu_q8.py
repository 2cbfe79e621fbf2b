"""Decode attention over a contiguous Q8 or FP8 cache with the Mosaic GPU lowering (Hopper): a TMA ring of 8-bit
codes and their scales, dequantized in registers into 16-bit tiles for warpgroup MMAs.

:func:`q8_decode_attention_mgpu` has the call and semantics of
:func:`pallas_kernels.decode_q8.q8_decode_attention` (its argument checks: int8 codes ``[*L, B, K, S, D]``,
float16 or float32 scales ``[*L, B, K, S, D // 32]``, value = code * scale), :func:`fp8_decode_attention_mgpu`
those of :func:`pallas_kernels.decode_fp8.fp8_decode_attention` (e4m3 values, a float32 scale per position and
kv head), both without ``window`` and ``softcap``. The products run in ``q``'s dtype when it is bfloat16 or
float16, in bfloat16 for a float32 ``q`` (the output keeps ``q``'s dtype); softmax and accumulation in float32.
The body is ``pallas_kernels.decode_mgpu_q8_kernel``'s (the formats differ only in the scale view: 8 scales per
view row, one position of Q8 at head_dim 256 up to four at 64, eight positions of FP8); splits are merged by
``pallas_kernels.common.merge_partials``. FP8's view rows are ``8 * D`` bytes: at head_dim 128 the ring holds one
block, at 256 none fits (refused). Not wired into the dispatch: ``bench/bench_decode_kinds.py`` times them (rows
``q8_mgpu``, ``fp8_mgpu``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Int8

from pallas_kernels import backend, checks, common, decode_fp8, decode_q8, mgpu_common
from pallas_kernels import decode_mgpu_kernel as kernel_bf16
from pallas_kernels import decode_mgpu_q8_kernel as kernel
from pallas_kernels.decode_mgpu import smem_budget
from pallas_kernels.mgpu_common import ROWS, round_up

FP8_SCALE_COLS = 8  # float32 scales per view row: eight positions ([64, 4] windows have no MMA register layout)
MIN_SPLIT_BYTES = 2 * ROWS * 128 * 2  # the bf16 kernel's two-block share: two 64 x 128 bf16 blocks
DEFAULT_STAGES = 2  # the bf16 kernel's measured ring depth (a Q8 block's codes: a 64 x 128 bf16 block's bytes)
MMA_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class MgpuQuant(NamedTuple):
    """A quantized format as this kernel reads it: its argument check and the scale view's row."""

    name: str
    check_args: Callable  # (q, k, k_scale, v, v_scale, lengths, layer) -> (B, N, K, S, D)
    scale_cols: int  # scales per view row: 16 bytes at least (TMA), 8 columns (the MMA layout's tile)
    per_position: Callable  # head_dim -> scales per position

    def reps(self, head_dim: int) -> int:
        """Positions per view row."""
        return kernel.interleave(self.scale_cols, self.per_position(head_dim))


Q8 = MgpuQuant("Q8", decode_q8.check_args, 8, lambda d: d // kernel.QBLOCK)
FP8 = MgpuQuant("FP8", decode_fp8.check_args, FP8_SCALE_COLS, lambda d: 1)


class MgpuQ8Config(NamedTuple):
    """Launch parameters (static: each distinct value compiles its own kernel)."""

    num_splits: int  # programs per (b, kv head), each walking an equal share of the ring blocks
    num_stages: int  # ring slots: blocks in flight per program


def block_positions(head_dim: int, fmt: MgpuQuant = Q8) -> int:
    """Positions per ring block: 64 view rows."""
    return ROWS * fmt.reps(head_dim)


def mgpu_q8_config(
    batch: int, num_kv_heads: int, max_len: int, head_dim: int, fmt: MgpuQuant = Q8, *,
    num_multiprocessors: int | None = None,
) -> MgpuQ8Config:  # fmt: skip
    """The bf16 Mosaic GPU kernel's rule (``decode_mgpu.mgpu_config``) in bytes: about one program per
    multiprocessor, equal shares of at least ``MIN_SPLIT_BYTES`` of codes per operand (two of Q8's blocks, one of
    FP8's), ``DEFAULT_STAGES`` slots (fewer where they do not fit: FP8 at head_dim 128)."""
    sms = num_multiprocessors or backend.num_multiprocessors()
    blocks = max(1, math.ceil(max_len / block_positions(head_dim, fmt)))
    per_split = max(1, -(-MIN_SPLIT_BYTES // (ROWS * fmt.reps(head_dim) * head_dim)))  # blocks
    splits = max(1, min(sms // (batch * num_kv_heads), blocks // per_split))
    splits = math.ceil(blocks / math.ceil(blocks / splits))  # equal shares: no split left empty at full length
    stages = DEFAULT_STAGES
    while stages > 1 and _smem_need(fmt, head_dim, 4, stages) > smem_budget():
        stages -= 1
    return MgpuQ8Config(splits, stages)


def _smem_need(fmt: MgpuQuant, head_dim: int, scale_itemsize: int, stages: int) -> int:
    return kernel.ring_bytes(head_dim, fmt.reps(head_dim), fmt.scale_cols, scale_itemsize, 2, stages)


def unsupported_reason(num_q_heads: int, num_kv_heads: int, head_dim: int, fmt: MgpuQuant = Q8) -> str | None:
    """Why this kernel cannot take these heads and head_dim in ``fmt`` (None: it can), any machine."""
    if head_dim not in mgpu_common.HEAD_DIMS:
        expected = mgpu_common.HEAD_DIMS
        return f"head_dim={head_dim} is not supported by the Mosaic GPU {fmt.name} kernel; expected one of {expected}"
    if (need := _smem_need(fmt, head_dim, 4, 1)) > smem_budget():
        return (
            f"head_dim={head_dim}: the Mosaic GPU {fmt.name} kernel's one-slot ring, tiles and query window need "
            f"{need} bytes of shared memory, more than the {smem_budget()} a program may take"
        )
    group = num_q_heads // num_kv_heads
    if group > ROWS:
        return (
            f"num_q_heads={num_q_heads} // num_kv_heads={num_kv_heads} = {group} query heads per kv head exceeds {ROWS}"
        )
    return None


def check_mgpu_q8_args(q, k, k_scale, v, v_scale, lengths, layer=None, window=None, softcap=None, fmt=Q8):
    """``fmt``'s checks (``decode_q8.check_args`` or ``decode_fp8.check_args``), then what this kernel adds;
    returns ``(B, N, K, S, D)``."""
    b, n, kh, s, d = fmt.check_args(q, k, k_scale, v, v_scale, lengths, layer)
    if window is not None or softcap is not None:
        raise ValueError(
            f"the Mosaic GPU {fmt.name} kernel takes no window or softcap, got {window=}, {softcap=}; "
            "use the Triton kernel (pallas_kernels.decode_q8 / decode_fp8)"
        )
    if (reason := unsupported_reason(n, kh, d, fmt)) is not None:
        raise ValueError(reason)
    return b, n, kh, s, d


def _resolve_config(
    default: MgpuQ8Config, fmt: MgpuQuant, head_dim: int, scale_itemsize: int, **overrides
) -> MgpuQ8Config:
    for name, value in overrides.items():
        if value is not None and not checks.is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    config = default._replace(**{k: int(x) for k, x in overrides.items() if x is not None})
    if config.num_splits < 1:
        raise ValueError(f"num_splits={config.num_splits} must be >= 1")
    if config.num_stages < 1:
        raise ValueError(f"num_stages={config.num_stages} must be >= 1")
    need = _smem_need(fmt, head_dim, scale_itemsize, config.num_stages)
    if need > smem_budget():
        raise ValueError(
            f"num_stages={config.num_stages} needs {need} bytes of ring, tiles and query window "
            f"(head_dim={head_dim}), more than the {smem_budget()} a program may take"
        )
    return config


@functools.partial(jax.jit, static_argnames=("scale", "config", "scale_cols"))
def _decode(q, k, k_scale, v, v_scale, lengths, layer, *, scale: float, config: MgpuQ8Config, scale_cols: int = 8):
    # q [B, N, D]; k, v int8 or float8_e4m3fn [L, B, K, S, D] (S a multiple of the ring block); scales
    # [L, B, K, S, D // 32] (Q8) or [L, B, K, S, 1] (FP8); lengths int32[B]; layer int32[1]
    num_layers, batch, kv_heads, max_len, head_dim = k.shape
    reps = kernel.interleave(scale_cols, k_scale.shape[-1])
    codes_view = lambda x: x.reshape(num_layers, batch, kv_heads, max_len // reps, reps * head_dim)  # free
    scales_view = lambda x: x.reshape(num_layers, batch, kv_heads, max_len // reps, scale_cols)  # free
    group = q.shape[1] // kv_heads
    body = functools.partial(
        kernel.kernel, group=group, num_splits=config.num_splits, num_stages=config.num_stages, scale=scale
    )

    def jkv_q8_decode_attention_mgpu(*refs):  # the kernel's name in profiles
        body(*refs)

    mma_dtype = q.dtype if q.dtype in MMA_DTYPES else jnp.dtype(jnp.bfloat16)
    cache = (codes_view(k), scales_view(k_scale), codes_view(v), scales_view(v_scale))
    splits = config.num_splits
    return kernel_bf16.launch(
        jkv_q8_decode_attention_mgpu, q, cache, lengths, layer, batch=batch, splits=splits, mma_dtype=mma_dtype
    )


def q8_decode_attention_mgpu(
    q: Float[Array, "B N D"],
    k: Int8[Array, "*L B K S D"],
    k_scale: Float[Array, "*L B K S D//32"],
    v: Int8[Array, "*L B K S D"],
    v_scale: Float[Array, "*L B K S D//32"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    num_stages: int | None = None,
) -> Float[Array, "B N D"]:
    """Decode attention over a Q8 cache (Mosaic GPU): one query per sequence over its first ``lengths[b]``
    positions; arguments as :func:`pallas_kernels.decode_q8.q8_decode_attention`'s. ``window`` and ``softcap``
    must be None (refused otherwise). ``num_splits`` and ``num_stages`` override :func:`mgpu_q8_config`. Raises
    ``RuntimeError`` where Mosaic GPU cannot run: this kernel has no interpret mode."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap)
    return _run(Q8, q, (k, k_scale, v, v_scale), lengths, **options, num_splits=num_splits, num_stages=num_stages)


def fp8_decode_attention_mgpu(
    q: Float[Array, "B N D"],
    k: Float[Array, "*L B K S D"],
    k_scale: Float[Array, "*L B K S 1"],
    v: Float[Array, "*L B K S D"],
    v_scale: Float[Array, "*L B K S 1"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    num_stages: int | None = None,
) -> Float[Array, "B N D"]:
    """:func:`q8_decode_attention_mgpu` over an FP8 cache (``pallas_kernels.decode_fp8``'s format: e4m3 values,
    one float32 scale per position and kv head), arguments as
    :func:`pallas_kernels.decode_fp8.fp8_decode_attention`'s."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap)
    return _run(FP8, q, (k, k_scale, v, v_scale), lengths, **options, num_splits=num_splits, num_stages=num_stages)


def _run(fmt: MgpuQuant, q, arrays, lengths, *, layer, scale, window, softcap, **overrides):
    b, _, kh, s, d = check_mgpu_q8_args(q, *arrays, lengths, layer, window, softcap, fmt)
    if not backend.mosaic_gpu_usable():
        raise RuntimeError(
            f"the Mosaic GPU {fmt.name} decode kernel cannot run here: {backend.mosaic_gpu_unavailable_reason()}"
        )
    scale = checks.softmax_scale(scale, d)
    config = _resolve_config(mgpu_q8_config(b, kh, s, d, fmt), fmt, d, arrays[1].dtype.itemsize, **overrides)
    # S padded to whole ring blocks (a copy of the cache; only where S is not a multiple of the block).
    cache, layer = common.whole_cache(arrays, layer, round_up(s, block_positions(d, fmt)))
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    return _decode(q, *cache, lengths, layer, scale=float(scale), config=config, scale_cols=fmt.scale_cols)
