"""Activations times a block-quantized weight matrix with the Mosaic GPU lowering (Hopper): ``x [M, K] @ W.T``.

Same call and semantics as :func:`pallas_kernels.quantized_matmul.qmatmul` (reference:
``block_formats.qmatmul_reference``): ``W`` is ``N x K`` held as ``fmt`` planes; the result is float32 ``[M, N]``;
each weight is dequantized in float32, rounded to ``x``'s dtype and multiplied with float32 accumulation. Takes
Q8_0 and Q4_K weights (``K`` a multiple of 256 and 2048: whole K steps, 16-byte rows for TMA), bf16/f16
activations (the 16-bit MMA) and ``N`` a multiple of 8, at least 64; other formats, float32 activations and other
shapes are refused with the reason (``quantized_matmul.qmatmul`` takes them).

The kernel (``pallas_kernels.qmatmul_mgpu_kernel``, per format ``qmatmul_mgpu_formats``; Hopper and later, no
interpret mode): one warpgroup per ``(K split, row block, 64 weight rows)``; a TMA ring brings each 256-column
step's weight windows (codes or nibbles and their scales) and activations into shared memory; the warpgroup
dequantizes them in registers into swizzled bf16/f16 tiles (one per part: Q4_K's low and high nibbles multiply
the activations' two halves of each 32-block, ``block_formats.split_parts``), and ``wgmma`` multiplies them by
the activations' tiles (``W_tile @ x_tile^T``: the activations' rows, padded to a multiple of 8, are the MMA's N,
so a decode step pays for 8 rows, not 64); the next step is dequantized while the MMAs run. ``K`` is split over
programs when the column blocks do not fill the GPU; the float32 partials ``[S, N, M']`` are summed (and
transposed) outside, as ``quantized_matmul`` does.

Launch parameters: :class:`QMatmulMgpuConfig`, default :func:`qmatmul_mgpu_config` (a starting rule, to be
tuned on the GPU: docs/quant.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend, checks
from pallas_kernels import qmatmul_mgpu_formats as formats
from pallas_kernels import qmatmul_mgpu_kernel as kernel
from pallas_kernels.block_formats import block_format, check_activations, check_planes, split_parts
from pallas_kernels.mgpu_common import CACHE_DTYPES, MGPU_SMEM_RESERVE, round_up

FORMATS = tuple(formats.FORMATS)
BLOCK_N, BLOCK_K = formats.BLOCK_N, formats.BLOCK_K  # weight rows per program, packed columns per K step
ROW_ALIGN = 8  # the activations' rows come in 8-row tiles (the MMA's N is a multiple of 8)
MAX_BLOCK_M = 64  # activation rows per program at most: a small-M kernel (the accumulator's registers)
MIN_STAGES = 2  # one weight slot would leave every step's load exposed
MAX_STAGES = 4
KERNEL = "the Mosaic GPU quantized matmul"  # how errors name it
SPLIT_OVERHEAD_STEPS = 1  # a program's fixed cost (ring fill, store) in K steps, for the split rule


class QMatmulMgpuConfig(NamedTuple):
    """Launch parameters (static: each distinct value compiles its own kernel)."""

    block_m: int  # activation rows per program: a multiple of 8, at most MAX_BLOCK_M (the MMA's N)
    num_splits: int  # programs sharing one output block's K (dividing the K / BLOCK_K steps)
    num_stages: int  # ring slots (at least MIN_STAGES): K steps in flight per program


def smem_budget() -> int:
    """Shared memory one program may take on this device."""
    return backend.shared_memory_per_block() - MGPU_SMEM_RESERVE


def smem_bytes(fmt: str, block_m: int, num_stages: int, itemsize: int = 2) -> int:
    """Shared memory of a launch: the ring (weight windows per slot, activations per slot and one more) and two
    buffers of dequantized tiles; the output tile reuses them after the loop."""
    spec = formats.FORMATS[fmt]
    planes = block_format(fmt).planes
    windows = sum(BLOCK_N * w.cols * p.dtype.itemsize for w, p in zip(spec.windows, planes, strict=True))
    x_slot = spec.parts * block_m * BLOCK_K * itemsize
    ring = num_stages * windows + (num_stages + 1) * x_slot + 2 * spec.parts * BLOCK_N * BLOCK_K * itemsize
    return max(ring, BLOCK_N * block_m * 4)


def qmatmul_mgpu_config(
    m: int, n: int, k: int, fmt: str, *, num_multiprocessors: int | None = None
) -> QMatmulMgpuConfig:
    """The default launch for ``x [m, k]`` times an ``n x k`` ``fmt`` matrix. Not measured yet (docs/quant.md):

    * ``block_m``: the rows padded to a multiple of 8, at most 64 and at most what fits two ring slots (larger
      ``M``: row blocks of ``block_m``);
    * ``num_stages``: the most (up to 4) with which two programs fit a multiprocessor's shared memory (two
      warpgroups hide each other's dequantization and waits), else the most with which one fits;
    * ``num_splits``: the divisor ``d`` of the K steps minimising ``waves(d) * (steps / d + 1)``, where a wave
      is one program on every slot of the GPU (the fewest splits among equals).
    """
    sms = num_multiprocessors or backend.num_multiprocessors()
    block_m = min(MAX_BLOCK_M, round_up(max(m, 1), ROW_ALIGN))
    while block_m > ROW_ALIGN and smem_bytes(fmt, block_m, MIN_STAGES) > smem_budget():
        block_m -= ROW_ALIGN  # Q4_K's two parts: at most 16 rows beside its ring and tiles
    fits = lambda stages, per_sm: smem_bytes(fmt, block_m, stages) <= smem_budget() // per_sm
    per_sm = 2 if fits(2, 2) else 1
    stages = max([s for s in range(MIN_STAGES, MAX_STAGES + 1) if fits(s, per_sm)], default=MIN_STAGES)
    programs = -(-round_up(m, ROW_ALIGN) // block_m) * -(-n // BLOCK_N)
    steps = k // block_format(fmt).parts // BLOCK_K
    slots = per_sm * sms
    cost = lambda d: (-(-programs * d // slots) * (steps // d + SPLIT_OVERHEAD_STEPS), d)
    splits = min((d for d in range(1, steps + 1) if steps % d == 0), key=cost)
    return QMatmulMgpuConfig(block_m, splits, stages)


def unsupported_reason(fmt: str, n: int, k: int, dtype) -> str | None:
    """Why this kernel cannot take an ``n x k`` ``fmt`` matrix times ``dtype`` activations (None: it can)."""
    if fmt not in FORMATS:
        return f"{KERNEL} takes {FORMATS} weights, got {fmt!r} (quantized_matmul.qmatmul takes it)"
    if jnp.dtype(dtype) not in CACHE_DTYPES:
        names = [str(t) for t in CACHE_DTYPES]
        return f"{KERNEL} takes {names} activations (the 16-bit MMA), got {jnp.dtype(dtype)}"
    if n < BLOCK_N or n % ROW_ALIGN:
        return (
            f"N={n} must be a multiple of {ROW_ALIGN} (tiled TMA copies of the codes) and at least {KERNEL}'s "
            f"{BLOCK_N}-row block (quantized_matmul.qmatmul takes any N)"
        )
    if k % (multiple := formats.FORMATS[fmt].k_multiple):
        return f"K={k} must be a multiple of {multiple} for {fmt} weights in {KERNEL} (its K step and TMA rows)"
    return None


def check_args(x, planes, fmt: str) -> tuple[int, int]:
    """The shared checks (``block_formats``), then what this kernel adds; return ``(N, K)``. Raises ``TypeError``
    for activations the MMA cannot take, ``ValueError`` otherwise."""
    n, k = check_planes(fmt, planes)
    check_activations(x, k, fmt)
    if (reason := unsupported_reason(fmt, n, k, x.dtype)) is not None:
        raise (TypeError if jnp.dtype(x.dtype) not in CACHE_DTYPES else ValueError)(reason)
    return n, k


def check_config(config, fmt: str, k: int, itemsize: int) -> QMatmulMgpuConfig:
    if not isinstance(config, QMatmulMgpuConfig):
        raise TypeError(f"config must be a QMatmulMgpuConfig or None, got {config!r}")
    for name, value in config._asdict().items():
        if not checks.is_int(value) or value < 1:
            raise ValueError(f"config.{name}={value!r} must be a positive int")
    if config.num_stages < MIN_STAGES:
        raise ValueError(f"config.num_stages={config.num_stages} must be at least {MIN_STAGES}")
    if config.block_m % ROW_ALIGN or config.block_m > MAX_BLOCK_M:
        raise ValueError(f"config.block_m={config.block_m} must be a multiple of {ROW_ALIGN} up to {MAX_BLOCK_M}")
    steps = k // block_format(fmt).parts // BLOCK_K
    if steps % config.num_splits:
        raise ValueError(f"config.num_splits={config.num_splits} must divide the {steps} K steps (K={k})")
    need = smem_bytes(fmt, config.block_m, config.num_stages, itemsize)
    if need > smem_budget():
        raise ValueError(
            f"{config} needs {need} bytes of shared memory, more than the {smem_budget()} a program may take"
        )
    return config


@functools.partial(jax.jit, static_argnames=("fmt", "config"))
def _qmatmul(x, planes, *, fmt: str, config: QMatmulMgpuConfig):
    plgpu = backend.mosaic_gpu_module()
    m, n = x.shape[0], planes[0].shape[0]
    rows = max(round_up(m, ROW_ALIGN), config.block_m)
    if rows != m:  # whole 8-row tiles, at least one row block (a copy of x: M is small)
        x = jnp.pad(x, ((0, rows - m), (0, 0)))
    xs = split_parts(x, fmt)  # [P, M', K / P]
    body = functools.partial(
        kernel.kernel,
        fmt=fmt,
        block_m=config.block_m,
        num_stages=config.num_stages,
        steps=xs.shape[2] // BLOCK_K // config.num_splits,
    )

    def jkv_qmatmul_mgpu(*refs):  # the kernel's name in profiles
        body(*refs)

    out = plgpu.kernel(
        jkv_qmatmul_mgpu,
        out_type=jax.ShapeDtypeStruct((config.num_splits, n, rows), jnp.float32),
        grid=(config.num_splits, pl.cdiv(rows, config.block_m), pl.cdiv(n, BLOCK_N)),
        grid_names=("split", "row", "col"),
        # No barrier around every shared-memory store (two per 32-column group): no thread reads what it writes,
        # and commit_smem (fence + warpgroup barrier) orders the tile before the MMA and the output before its copy.
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True),
    )(xs, *planes)
    return out.sum(axis=0)[:, :m].T if config.num_splits > 1 else out[0, :, :m].T


def qmatmul_mgpu(x, planes, fmt: str, *, config: QMatmulMgpuConfig | None = None):
    """``x [M, K] @ W.T -> [M, N]`` (float32) for the ``N x K`` matrix ``W`` held in ``planes`` as ``fmt``, on the
    Mosaic GPU kernel (see the module doc for what it takes).

    ``config``: launch parameters (default :func:`qmatmul_mgpu_config`). Raises ``RuntimeError`` where Mosaic GPU
    cannot run (no Hopper GPU, or a JAX build without ``jax.experimental.pallas.mosaic_gpu``): no interpret mode.

    >>> y = qmatmul_mgpu(x, (codes, scales), "Q8_0")  # x bf16 [M, K]; codes int8 [N, K], scales f16 [N, K // 32]
    >>> y = qmatmul_mgpu(x, (nibbles, sub_scales, sub_mins, d, dmin), "Q4_K")
    """
    planes = tuple(planes) if isinstance(planes, list) else planes
    n, k = check_args(x, planes, fmt)
    m = x.shape[0]
    if not backend.mosaic_gpu_usable():
        raise RuntimeError(f"{KERNEL} cannot run here: {backend.mosaic_gpu_unavailable_reason()}")
    config = qmatmul_mgpu_config(m, n, k, fmt) if config is None else config
    check_config(config, fmt, k, jnp.dtype(x.dtype).itemsize)
    if m == 0:
        return jnp.zeros((0, n), jnp.float32)
    return _qmatmul(x, planes, fmt=fmt, config=config)
