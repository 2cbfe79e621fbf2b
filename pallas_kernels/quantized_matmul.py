"""Activations times a block-quantized weight matrix, dequantizing inside the kernel: ``x [M, K] @ W.T -> [M, N]``.

``W`` is ``N x K`` in one of ``pallas_kernels.block_formats``' formats (planes ``[N, ...]``, ``K`` along the last
axis); its reference is ``block_formats.qmatmul_reference`` (same signature). One kernel, four formulations
(``QMatmulConfig.path``):

* ``"dot"`` (the default wherever ``N`` holds a 16-column tile: decode steps, prefill, mixed steps): a ``bm x bn``
  output tile per program (``bm >= 16``, fewer rows padded with zeros); each weight tile is dequantized to the
  activations' dtype (bf16/f16; f32 at full precision) and fed to the tensor-core ``dot`` with float32
  accumulation. At ``M <= SMALL_DOT_ROWS`` one 16-row tile, 64 columns, 128-deep K steps: measured in a
  Llama-3-8B-shaped decode step on the GPU 3x faster than ``"units"`` (docs/quant.md, "Speed").
  ``"dot_expand"``: the same with the tile dequantized from plane reads expanded to its shape
  (``pallas_kernels.qmatmul_expand``: no reshapes).
* ``"units"`` (register path; the default for matrices thinner than a dot tile): each program owns
  ``bn`` output columns of ``bm`` rows and walks ``K`` in steps of ``bk`` packed columns, each a static loop of
  units (``pallas_kernels.qmatmul_units``): 2-D windows of the codes, one column of each per-group plane,
  dequantized in registers to float32 and multiplied into a ``[bn, U]`` float32 accumulator per row, reduced once
  after the K loop. No 3-D register tile, no per-step reduction: the codes load 16 bytes wide and the loop needs
  no layout conversion (docs/quant.md, "Speed").
* ``"dp4a"`` (a register path under trial, never the default): the activations rounded to int8 per 32-block
  of ``K`` once per call, each block's weight words multiplied into int32 sums by PTX ``dp4a``, summed in the
  thread that holds the row and scaled into a ``[bn]`` float32 accumulator per row
  (``pallas_kernels.qmatmul_dp4a``; docs/quant.md).
* ``"fma"`` (the first small-M kernel, kept for comparison): the whole ``[bn, bk]`` tile dequantized through
  ``[R, W / g, g]`` reshapes and multiplied by a ``[bm, bn, bk]`` broadcast-multiply-sum each step.

``K`` is split over ``num_splits`` programs when too few column blocks fill the GPU; their float32 partials are
summed outside. Activations are split once per call into the kernel's ``parts`` (``block_formats.split_parts``),
so nibble tiles never interleave. The last row and column blocks slide back to end at ``M`` and ``N`` (their
overlap rewrites the same values), so an odd ``N`` needs no masks; ``M`` below one block is padded with zero rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import (
    backend,
    common,
    qmatmul_act,
    qmatmul_dp4a,
    qmatmul_expand,
    qmatmul_grouped,
    qmatmul_units,
)
from pallas_kernels.block_formats import (
    block_format,
    check_activations,
    check_planes,
    dequantize_tile,
    split_parts,
)
from pallas_kernels.qmatmul_configs import (  # noqa: F401  (the launches: callers name them here too)
    FMA_ELEMENTS,
    FMA_ROWS,
    PATHS,
    SMALL_DOT_ROWS,
    TARGET_PROGRAMS,
    UNITS_ELEMENTS,
    UNITS_PER_STEP,
    QMatmulConfig,
    check_config,
    config_path,
    default_splits,
    doubled_default_splits,
    dp4a_config,
    fma_config,
    qmatmul_config,
    units_config,
)


def _kernel(
    # inputs
    x_ref,  # [P, M, K / P]: the activations split into the format's parts (dp4a: int8 codes as words [M, K / 4])
    *refs,  # grouped path with offsets: the group sums [P, M, K / P / G]; dp4a: the activations' F factors
    # [M, K / 32] each; the planes [N, K / P / group] each; the output [S, M, N] float32
    fmt: str,
    groups: tuple[int, ...],
    config: QMatmulConfig,
    steps: int,  # K steps per split
    groups_major: bool,  # the grouped path's per-group planes stored [K / P / group, N]
    interpret: bool,  # the dp4a path emulates its PTX instruction
    interleaved: bool = False,  # the dp4a path's planes laid out by qmatmul_dp4a.interleave
    factors: int = 0,  # the dp4a path: how many activation factor arrays lead the planes
):
    plane_refs, o_ref = refs[:-1], refs[-1]
    path = config_path(config)
    sums_ref = None
    if path == "grouped" and qmatmul_grouped.has_offsets(fmt):
        sums_ref, plane_refs = plane_refs[0], plane_refs[1:]
    if path == "dp4a":  # the activations' scales (and sums)
        sums_ref, plane_refs = plane_refs[:factors], plane_refs[factors:]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    m_total = x_ref.shape[-2]
    n_total = plane_refs[0].shape[1 if interleaved else 0]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row0 = jnp.minimum(i * bm, m_total - bm)  # the last block slides back to end at M (and N)
    rows, cols = pl.ds(row0, bm), pl.ds(jnp.minimum(j * bn, n_total - bn), bn)
    dot_dtype = x_ref.dtype
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    if path == "dp4a":
        qmatmul_dp4a.dp4a_program(
            fmt,
            x_ref,
            sums_ref,
            plane_refs,
            o_ref,
            rows0=row0,
            cols=cols,
            split=s,
            steps=steps,
            block_k=bk,
            block_m=bm,
            block_n=bn,
            emulate=interpret,
            prefetch=config.num_stages > 1,  # its loop is not pipelined by Triton: stages 2 carries the reads
            interleaved=interleaved,
        )
        return

    if path == "units":

        def units_body(step, accs):
            k0 = pl.multiple_of((s * steps + step) * bk, bk)
            return qmatmul_units.units_step(
                fmt, x_ref, plane_refs, accs, rows0=row0, cols=cols, k0=k0, block_k=bk, block_m=bm
            )

        width = qmatmul_units.unit_width(fmt)
        accs = lax.fori_loop(0, steps, units_body, tuple(jnp.zeros((bn, width), jnp.float32) for _ in range(bm)))
        qmatmul_units.units_finish(o_ref, accs, split=s, rows0=row0, cols=cols)
        return

    if path == "grouped":  # each step's scales, offsets and sums loaded one step ahead, in the loop's carry
        factors = lambda step: qmatmul_grouped.step_factors(
            fmt,
            sums_ref,
            plane_refs,
            rows=rows,
            cols=cols,
            k0=(s * steps + step) * bk,
            block_k=bk,
            groups_major=groups_major,
        )

        def grouped_body(step, carry):
            acc, now = carry
            ahead = factors(jnp.minimum(step + 1, steps - 1))
            k0 = pl.multiple_of((s * steps + step) * bk, bk)
            acc = qmatmul_grouped.grouped_step(
                fmt, x_ref, plane_refs, acc, now, rows=rows, cols=cols, k0=k0, block_k=bk, block_n=bn
            )
            return acc, ahead

        acc, _ = lax.fori_loop(0, steps, grouped_body, (jnp.zeros((bm, bn), jnp.float32), factors(0)))
        o_ref[s, rows, cols] = acc
        return

    def body(step, acc):
        k0 = pl.multiple_of((s * steps + step) * bk, bk)
        if path == "dot_expand":
            parts = qmatmul_expand.expanded_tiles(fmt, plane_refs, cols.start, bn, k0, bk)
        else:
            tiles = [
                ref[cols, pl.ds(group_start(k0, g, bk), bk // g)] for ref, g in zip(plane_refs, groups, strict=True)
            ]
            parts = dequantize_tile(fmt, tiles)
        for p, w in enumerate(parts):  # [bn, bk] float32 each
            x = x_ref[p, rows, pl.ds(k0, bk)]  # [bm, bk]
            if path != "fma":
                acc += common.dot(x, w.astype(dot_dtype), trans_b=True, precision=precision)
            else:
                acc += jnp.sum(x.astype(jnp.float32)[:, None, :] * w[None, :, :], axis=2)
        return acc

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[s, rows, cols] = acc


def group_start(k0, group: int, block_k: int):
    """The first entry of a plane of ``group`` packed columns an entry that a K step at packed column ``k0`` (a
    multiple of ``block_k``) reads, with that divisibility stated. ``k0 // group`` lowers to a floor division whose
    sign fix-up (a select) hides it from Triton, and a codes plane's tile was then read a byte per load."""
    return k0 if group == 1 else pl.multiple_of(lax.div(k0, group), block_k // group)


@functools.partial(jax.jit, static_argnames=("fmt", "config", "interpret", "groups_major", "interleaved", "rounding"))
def _qmatmul(
    x, planes, *, fmt: str, config: QMatmulConfig, interpret: bool, groups_major: bool = False, interleaved=False,
    rounding: str | None = None,
):  # fmt: skip
    rounded = isinstance(x, tuple)  # the dp4a path's activations already rounded: (words, factors)
    m, k = (x[0].shape[0], 4 * x[0].shape[1]) if rounded else x.shape
    n = planes[0].shape[1 if interleaved else 0]
    spec = block_format(fmt)
    rows = max(m, config.block_m)
    path = config_path(config)
    factors = ()
    if path == "dp4a":  # int8 codes as words (M', K/4), their F factors (M', K/32) each; the code planes as words
        if rounded:
            xs, factors = common_pad_rows(x[0], rows), tuple(common_pad_rows(f, rows) for f in x[1])
        else:
            xs, factors = qmatmul_act.round_activations(common_pad_rows(x, rows), fmt, interpret, rounding)
        planes = (*factors, *(planes if interleaved else qmatmul_dp4a.weight_words(planes, fmt)))
    else:
        xs = split_parts(common_pad_rows(x, rows), fmt)  # (P, M', K/P)
    steps = k // spec.parts // config.block_k // config.num_splits
    grid = (pl.cdiv(rows, config.block_m), pl.cdiv(n, config.block_n), config.num_splits)
    out_shape = jax.ShapeDtypeStruct((config.num_splits, rows, n), jnp.float32)
    groups = tuple(p.group for p in spec.planes)
    kernel = functools.partial(
        _kernel,
        fmt=fmt,
        groups=groups,
        config=config,
        steps=steps,
        groups_major=groups_major,
        interpret=interpret,
        interleaved=interleaved,
        factors=len(factors),
    )
    launch = dict(grid=grid, num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret)
    inputs = [xs, *planes]
    if path == "grouped" and qmatmul_grouped.has_offsets(fmt):
        inputs.insert(1, qmatmul_grouped.group_sums(xs, fmt))
    out = common.whole_call(kernel, inputs, out_shape, **launch, name=f"jkv_qmatmul_{fmt.lower()}")
    return out.sum(axis=0)[:m] if config.num_splits > 1 else out[0, :m]


def common_pad_rows(x, rows: int):
    """``x`` with zero rows appended up to ``rows``."""
    return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def qmatmul(x, planes, fmt: str, *, config: QMatmulConfig | None = None, interpret: bool | None = None):
    """``x [M, K] @ W.T -> [M, N]`` (float32) for the ``N x K`` matrix ``W`` held in ``planes`` as ``fmt``.

    ``x``: bfloat16, float16 or float32. ``config``: launch parameters (default :func:`qmatmul_config`).
    ``interpret``: None picks Triton on a GPU, interpret mode elsewhere (``pallas_kernels.backend``).

    >>> y = qmatmul(x, (codes, scales), "Q8_0")  # codes int8 [N, K], scales f16 [N, K // 32]
    """
    planes = tuple(planes) if isinstance(planes, list) else planes
    n, k = check_planes(fmt, planes)
    check_activations(x, k, fmt)
    m = x.shape[0]
    if m == 0:
        return jnp.zeros((0, n), jnp.float32)
    config = qmatmul_config(m, n, k, fmt) if config is None else QMatmulConfig(*config)
    check_config(config, m, n, k, fmt)
    interpret = backend.resolve_interpret(interpret)
    return _qmatmul(x, planes, fmt=fmt, config=config, interpret=interpret, rounding=qmatmul_act.ROUNDING)


def qmatmul_groups_major(x, planes, fmt: str, *, config: QMatmulConfig, interpret: bool | None = None):
    """:func:`qmatmul` on the grouped path over planes whose per-group planes are stored groups-major
    (``qmatmul_grouped.to_groups_major``: each group's entries for all rows contiguous), a layout under trial
    (bench/bench_qmatmul.py times it as ``grouped_gm``)."""
    if config_path(config) != "grouped":
        raise ValueError(f"groups-major planes take the grouped path, got path={config.path!r}")
    entries = qmatmul_grouped.ENTRY_PLANES[fmt] if fmt in qmatmul_grouped.ENTRY_PLANES else ()
    shapes = [  # the row-major layout's shapes, for the checks (no transposed copy)
        jax.ShapeDtypeStruct(p.shape[::-1] if i in entries else p.shape, p.dtype) for i, p in enumerate(planes)
    ]
    n, k = check_planes(fmt, shapes)
    check_activations(x, k, fmt)
    check_config(config, x.shape[0], n, k, fmt)
    interpret = backend.resolve_interpret(interpret)
    return _qmatmul(x, tuple(planes), fmt=fmt, config=config, interpret=interpret, groups_major=True)


def qmatmul_words(
    x, planes, fmt: str, *, config: QMatmulConfig, interpret: bool | None = None, interleaved: bool = False
):  # fmt: skip
    """:func:`qmatmul` on the dp4a path over planes whose byte planes (codes or nibbles, Q6_K's crumbs) are already
    int32 words (``qmatmul_dp4a.weight_words``, made once): no bitcast in the call (bench/bench_qmatmul.py times
    the dp4a variants so). ``interleaved``: the words laid out by ``qmatmul_dp4a.interleave`` (coalesced reads).
    ``x``: the activations ``[M, K]``, or ``(words, factors)`` already rounded as
    ``qmatmul_dp4a.quantize_activations`` rounds them (by the norm before the product:
    ``rms_norm.residual_rms_norm_rounded``), so the call launches the product alone."""
    if config_path(config) != "dp4a":
        raise ValueError(f"word planes take the dp4a path, got path={config.path!r}")
    planes = tuple(planes)
    n, k = check_planes(fmt, qmatmul_dp4a.byte_shapes(planes, fmt, interleaved))
    if isinstance(x, tuple):
        x = _check_rounded(x, k, fmt)
        m = x[0].shape[0]
    else:
        check_activations(x, k, fmt)
        m = x.shape[0]
    check_config(config, m, n, k, fmt)
    if m == 0:
        return jnp.zeros((0, n), jnp.float32)
    interpret = backend.resolve_interpret(interpret)
    return _qmatmul(
        x, planes, fmt=fmt, config=config, interpret=interpret, interleaved=interleaved,
        rounding=qmatmul_act.ROUNDING,
    )  # fmt: skip


def _check_rounded(rounded, k: int, fmt: str) -> tuple:
    """``(words, factors)`` as ``quantize_activations`` makes them for ``[M, K]`` activations of ``fmt``."""
    words, factors = rounded
    m = words.shape[0] if getattr(words, "ndim", 0) == 2 else -1
    want = jax.eval_shape(lambda: qmatmul_dp4a.quantize_activations(jnp.zeros((max(m, 0), k)), fmt))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (words, tuple(factors)))
    if got != want:
        raise ValueError(f"rounded activations {got} are not the words and factors of [M, {k}] for {fmt}: {want}")
    return words, tuple(factors)
