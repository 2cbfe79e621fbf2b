"""The launches of ``quantized_matmul``'s kernel: its parameters (:class:`QMatmulConfig`), the default rule for a
product's shape and format, the rule of each register path, the split-K rule and the checks of a given launch
(rules measured on the GPU: docs/quant.md, "Speed")."""

from __future__ import annotations

from typing import NamedTuple

from jax.experimental import pallas as pl

from pallas_kernels import backend, checks, common, qmatmul_units
from pallas_kernels.block_formats import block_format

FMA_ROWS = 8  # at most this many rows a register path (units, fma) takes in one program
SMALL_DOT_ROWS = 16  # at most this many rows take the decode-shaped dot launch (one 16-row tile, bn 64, bk 128)
UNITS_ELEMENTS = 4096  # bm * bn * unit of the units path's accumulators: 32 registers a thread of 4 warps
UNITS_PER_STEP = 16  # bm * bk / unit where the groups allow: the unrolled step's size bounds Triton's compile time
FMA_ELEMENTS = 8192  # bm * bn * bk of the fma path's broadcast product: registers of 4 warps without spills
TARGET_PROGRAMS = 2  # programs per multiprocessor the split-K rule aims for
# ... and the dp4a launch's: its programs wait on each K step's reads (no pipelining), so more programs in flight
# and fewer steps each run faster (docs/BENCHMARKS.md, "The dp4a launches swept")
DP4A_PROGRAMS = 6
DP4A_MAX_STEPS = 8  # ... and at most this many K steps a program (the LM head: 2 splits of 8 faster than 1 of 16)
PATHS = ("units", "fma", "dot", "dot_expand", "grouped", "dp4a")


class QMatmulConfig(NamedTuple):
    """Launch parameters (static: each distinct value compiles its own kernel)."""

    block_m: int  # rows of x per program (power of two)
    block_n: int  # output columns per program (power of two, <= N)
    block_k: int  # packed columns per step (power of two dividing K / parts, a multiple of the format's max_group)
    num_splits: int  # programs sharing one output block's K (dividing K / parts / block_k)
    num_warps: int
    num_stages: int
    path: str | None = None  # one of PATHS; None: "units" at block_m <= FMA_ROWS, else "dot"


def config_path(config: QMatmulConfig) -> str:
    """The formulation ``config`` launches (its ``path``, else the one its ``block_m`` implies)."""
    return config.path or ("units" if config.block_m <= FMA_ROWS else "dot")


def _largest_pow2_dividing(x: int, cap: int) -> int:
    out = 1
    while out * 2 <= cap and x % (out * 2) == 0:
        out *= 2
    return out


def qmatmul_config(m: int, n: int, k: int, fmt: str) -> QMatmulConfig:
    """The default launch for ``x [m, k]`` times an ``n x k`` ``fmt`` matrix (rules in docs/quant.md, "Speed")."""
    spec = block_format(fmt)
    kp = k // spec.parts
    if n < common.MIN_BLOCK:  # a dot tile needs 16 columns: thin matrices take registers
        return units_config(m, n, k, fmt)
    if m <= SMALL_DOT_ROWS:  # decode steps: one 16-row tile (rows padded), narrow column blocks, deep K steps
        bm, bn, warps, stages = common.MIN_BLOCK, 64, 4, 3
        bk = max(spec.max_group, _largest_pow2_dividing(kp, 128))
    else:
        bm = min(128, max(common.MIN_BLOCK, common.pow2_ceil(m)))  # no more padded rows than a dot tile needs
        warps = 4 if bm <= 64 else 8
        if spec.max_group > 64:  # the K-quants' 128-column steps in two stages: at 64 rows faster than in three on
            # an H100, level at 32 (two programs a multiprocessor; docs/BENCHMARKS.md, "Int8 tensor cores")
            bk, bn, stages = spec.max_group, 64, 2
        elif spec.parts == 1:  # Q8_0: 128-column steps in two stages, 13-14 % faster at 64 rows than 64-column
            # steps in three on an H100 (docs/BENCHMARKS.md, "The row layout's dot kernel at 64 rows")
            bk, bn, stages = max(spec.max_group, _largest_pow2_dividing(kp, 128)), 128, 2
        else:  # the 4-bit formats: 128 packed columns (256 values) a step spill registers (sm_90, 32-64 rows)
            bk, bn, stages = max(spec.max_group, _largest_pow2_dividing(kp, 64)), 128, 3
    bn = min(bn, common.pow2_floor(n))
    return QMatmulConfig(bm, bn, bk, default_splits(m, n, kp // bk, bm, bn), warps, stages, "dot")


def _unrolled_block_k(fmt: str, kp: int, unit: int, block_m: int) -> int:
    """K step of the register paths that unroll units of ``unit`` packed columns for each of ``block_m`` rows: at
    most ``UNITS_PER_STEP`` row-units a step (and 256 columns), a power of two dividing the ``kp`` packed columns,
    at least the format's widest plane group."""
    return max(block_format(fmt).max_group, _largest_pow2_dividing(kp, min(256, UNITS_PER_STEP * unit // block_m)))


def units_config(m: int, n: int, k: int, fmt: str) -> QMatmulConfig:
    """The register launch (``"units"``): the default for matrices thinner than a dot tile, and at ``M <= 8``
    before the GPU measured the 16-row dot faster there (kept for comparisons)."""
    spec = block_format(fmt)
    kp = k // spec.parts
    bm, unit = min(common.pow2_ceil(m), FMA_ROWS), qmatmul_units.unit_width(fmt)
    bk = _unrolled_block_k(fmt, kp, unit, bm)
    bn = min(max(1, min(64, UNITS_ELEMENTS // (bm * unit))), common.pow2_floor(n))
    return QMatmulConfig(bm, bn, bk, default_splits(m, n, kp // bk, bm, bn), 4, 3, "units")


def dp4a_config(
    m: int, n: int, k: int, fmt: str, *, block_n: int = 128, split_factor: int = 1, programs_rule: bool | None = None
) -> QMatmulConfig:
    """The integer-dot launch (``"dp4a"``): a warp per 32 of ``block_n`` rows (each thread one row of a 16-byte
    window of words), the units path's step-size rule, and K splits: at one row, the fewest (a divisor of the
    steps) giving at least ``DP4A_PROGRAMS`` programs a multiprocessor and at most ``DP4A_MAX_STEPS`` steps a
    program (or one step each); at more rows (unmeasured under that rule: their smaller steps would take many
    more splits, each a partial sum of all the rows) twice the default rule's where the steps divide. Then times
    ``split_factor`` where the K steps divide by that many splits (else the rule's own). ``programs_rule``: the
    one-row rule at any row count (True), never (False), or at one row only (None, the default)."""
    spec = block_format(fmt)
    kp = k // spec.parts
    bm = min(common.pow2_ceil(m), FMA_ROWS)
    bk = _unrolled_block_k(fmt, kp, 32 // spec.parts, bm)
    bn = min(block_n, common.pow2_floor(n))
    steps, programs = kp // bk, pl.cdiv(m, bm) * pl.cdiv(n, bn)
    if (bm == 1) if programs_rule is None else programs_rule:
        want = max(-(-DP4A_PROGRAMS * backend.num_multiprocessors() // programs), -(-steps // DP4A_MAX_STEPS))
        splits = min(d for d in range(min(want, steps), steps + 1) if steps % d == 0)  # the fewest giving that
    else:
        splits = doubled_default_splits(m, n, steps, bm, bn)
    splits = splits_times(steps, splits, split_factor)
    return QMatmulConfig(bm, bn, bk, splits, max(1, min(8, bn // 32)), 1, "dp4a")


def splits_times(steps: int, splits: int, factor: int) -> int:
    """``factor`` times ``splits`` where the ``steps`` K steps divide by that many, else ``splits``."""
    return splits * factor if steps % (factor * splits) == 0 else splits


def doubled_default_splits(m: int, n: int, steps: int, block_m: int, block_n: int) -> int:
    """Twice :func:`default_splits` where the steps allow: the dp4a launch's splits at more than one row (and at
    one row before ``DP4A_PROGRAMS``)."""
    return splits_times(steps, default_splits(m, n, steps, block_m, block_n), 2)


def fma_config(m: int, n: int, k: int, fmt: str) -> QMatmulConfig:
    """The first small-M launch (``"fma"``, the default before the units path), for comparisons."""
    spec = block_format(fmt)
    kp = k // spec.parts
    bm = min(common.pow2_ceil(m), FMA_ROWS)
    bk = max(spec.max_group, _largest_pow2_dividing(kp, 256 // spec.parts))
    bn = min(max(1, min(64, FMA_ELEMENTS // (bm * bk))), common.pow2_floor(n))
    return QMatmulConfig(bm, bn, bk, default_splits(m, n, kp // bk, bm, bn), 4, 3, "fma")


def default_splits(m: int, n: int, steps: int, block_m: int, block_n: int) -> int:
    """The split-K rule: the fewest splits (a divisor of the ``steps`` K steps) giving ``TARGET_PROGRAMS``
    programs per multiprocessor, or as near as the divisors allow."""
    programs = pl.cdiv(m, block_m) * pl.cdiv(n, block_n)
    want = max(1, -(-TARGET_PROGRAMS * backend.num_multiprocessors() // programs))
    return max(d for d in range(1, min(want, steps) + 1) if steps % d == 0)


def check_config(config: QMatmulConfig, m: int, n: int, k: int, fmt: str) -> None:
    spec = block_format(fmt)
    kp = k // spec.parts
    bm, bn, bk, splits, warps, stages, path = config
    pow2 = lambda v: checks.is_int(v) and v >= 1 and v & (v - 1) == 0
    if not (pow2(bm) and pow2(bn) and bn <= n):
        raise ValueError(f"block_m={bm} and block_n={bn} must be powers of two with block_n <= N={n}")
    if not (pow2(bk) and bk % spec.max_group == 0 and kp % bk == 0):
        raise ValueError(
            f"block_k={bk} must be a power of two dividing K/{spec.parts}={kp} and a multiple of {spec.max_group} "
            f"(the widest {fmt} plane group)"
        )
    if not (checks.is_int(splits) and splits >= 1 and (kp // bk) % splits == 0):
        raise ValueError(f"num_splits={splits} must divide the {kp // bk} K steps")
    if path is not None and path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {PATHS} (or None for the one block_m implies)")
    if config_path(config) == "dp4a" and bm > FMA_ROWS:
        raise ValueError(f"the dp4a path unrolls its rows: block_m={bm} must be at most {FMA_ROWS}")
    if config_path(config) in ("dot", "dot_expand", "grouped") and (bm < common.MIN_BLOCK or bn < common.MIN_BLOCK):
        raise ValueError(f"the dot path (block_m={bm}) needs block_m and block_n >= {common.MIN_BLOCK}")
    checks.check_launch_overrides(num_warps=warps, num_stages=stages, num_splits=splits)
