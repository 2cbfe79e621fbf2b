"""Residual add and RMSNorm in one kernel: the norm before each product of a decoder block.

``residual_rms_norm(x, y, weight)`` returns ``(x + y, ((x + y) * weight).astype(dtype), rsqrt(mean((x + y)**2)
+ eps))``: the new residual stream (float32), the weighted rows the next product reads, and the per-row scale
that commutes with that product (``rmsnorm(x) @ W == scale * ((x * weight) @ W)``, applied by the model to the
product's output). ``y=None`` normalises ``x`` alone.

Why a kernel: in a batch-1 decode step every one of these is a few microseconds of launch latency, and XLA runs
the residual add and the norm's reduction as two fusions (the add's output has users outside the reduction).
One launch does all three outputs: programs of up to ``MAX_CHUNK`` columns of a row (:func:`chunk_of`), each
reading the whole row for its scale and writing its own columns. Rows of any width: a row whose width no
power-of-two chunk of ``MIN_CHUNK`` or more divides is one program, its row one power-of-two tile masked past
``H``. Interpret mode off GPU (see ``pallas_kernels.backend``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas_kernels import backend, common, qmatmul_act, qmatmul_dp4a

# A row's columns are split over programs of CHUNK columns each (every program reads the whole row for its scale,
# then writes its own columns), so that the norm before a product runs in several programs, as the activations'
# rounding does (qmatmul_act), not one: a one-program norm at one row took as long as the two launches it replaced.
MAX_CHUNK = 1024
MIN_CHUNK = 64


def chunk_of(hidden: int) -> int:
    """Columns a program writes for rows of ``hidden``: the largest power of two dividing it, at most
    ``MAX_CHUNK``, where that is at least ``MIN_CHUNK``; else the whole row (one program, masked to its width)."""
    chunk = math.gcd(hidden, MAX_CHUNK)
    return chunk if chunk >= MIN_CHUNK else hidden


def _kernel(*refs, hidden: int, width: int, chunk: int, eps: float, has_y: bool, dtype, fmt: str | None):
    x_ref, refs = refs[0], refs[1:]
    y_ref, refs = (refs[0], refs[1:]) if has_y else (None, refs)
    w_ref, refs = refs[0], refs[1:]
    x_out, refs = (refs[0], refs[1:]) if has_y else (None, refs)
    *rows_out, s_out = refs  # the weighted rows, or their int8 words and factors (fmt)
    r, c = pl.program_id(0), pl.program_id(1)
    row = pl.ds(r, 1)
    ok = lax.broadcasted_iota(jnp.int32, (1, width), 1) < hidden if width != hidden else None
    load = lambda view, mask: backend.load(view, mask=mask, other=None if mask is None else 0.0).astype(jnp.float32)

    def summed(cols, mask):  # x + y over cols, float32 [1, n]
        x = load(x_ref.at[row, cols], mask)
        return x + load(y_ref.at[row, cols], mask) if has_y else x

    x = summed(pl.ds(0, width), ok)  # the whole row: every program takes the row's scale
    scale = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) * (1.0 / hidden) + eps)  # [1, 1]

    @pl.when(c == 0)
    def _():
        backend.store(s_out.at[row, pl.ds(0, 1)], scale)

    if chunk != hidden:  # this program's columns, read again (a register tile cannot be sliced)
        cols, mask, n = pl.ds(pl.multiple_of(c * chunk, chunk), chunk), None, chunk
        x = summed(cols, None)
    else:
        cols, mask, n = pl.ds(0, width), ok, width
    if has_y:
        backend.store(x_out.at[row, cols], x, mask=mask)
    w = load(w_ref.at[pl.ds(0, 1), cols], mask)
    if fmt is None:
        backend.store(rows_out[0].at[row, cols], (x * w).astype(dtype), mask=mask)
        return
    # the weighted rows in the activations' dtype, rounded to int8 per 32-block as the dp4a product would round them
    rows = (x * w).astype(dtype).astype(jnp.float32).reshape(n // 32, 32)
    words, block_factors = qmatmul_act.round_blocks(rows, fmt)
    at = lambda k: lax.broadcasted_iota(jnp.int32, (1, k), 1) < hidden * k // width if mask is not None else None
    first = c * (n // 32)  # the program's first 32-block
    backend.store(rows_out[0].at[row, pl.ds(first * 8, n // 4)], words[None], mask=at(n // 4))
    for ref, factor in zip(rows_out[1:], block_factors, strict=True):
        backend.store(ref.at[row, pl.ds(first, n // 32)], factor[None], mask=at(n // 32))


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "fmt", "interpret"))
def _call(x, y, weight, *, eps: float, dtype, fmt: str | None, interpret: bool):
    rows, hidden = x.shape
    width, chunk = common.pow2_ceil(hidden), chunk_of(hidden)
    has_y = y is not None
    inputs = [x, y, weight[None, :]] if has_y else [x, weight[None, :]]
    if fmt is None:
        out_rows = [jax.ShapeDtypeStruct((rows, hidden), dtype)]
    else:  # quantize_activations' words and factors
        words, factors = jax.eval_shape(functools.partial(qmatmul_dp4a.quantize_activations, fmt=fmt), x)
        out_rows = [words, *factors]
    out_shape = [*out_rows, jax.ShapeDtypeStruct((rows, 1), jnp.float32)]
    if has_y:
        out_shape.insert(0, jax.ShapeDtypeStruct((rows, hidden), jnp.float32))
    kernel = functools.partial(
        _kernel, hidden=hidden, width=width, chunk=chunk, eps=eps, has_y=has_y, dtype=dtype, fmt=fmt
    )
    grid = (rows, hidden // chunk)
    launch = dict(grid=grid, num_warps=4 if width <= 4096 else 8, num_stages=1, interpret=interpret)
    outs = common.whole_call(kernel, inputs, out_shape, **launch, name="jkv_residual_rms_norm")
    outs = list(outs) if has_y else [x, *outs]
    if fmt is not None:  # (s, (words, factors), scale)
        outs = [outs[0], (outs[1], tuple(outs[2:-1])), outs[-1]]
    return tuple(outs)


def residual_rms_norm(
    x: Float[Array, "... H"],
    y: Float[Array, "... H"] | None,
    weight: Float[Array, " H"],
    *,
    eps: float,
    dtype=jnp.float32,
    interpret: bool | None = None,
) -> tuple[Float[Array, "... H"], Float[Array, "... H"], Float[Array, "... 1"]]:
    """``(s, (s * weight).astype(dtype), rsqrt(mean(s**2, -1) + eps)[..., None])`` with ``s = x + y`` in float32
    (``s = x`` when ``y`` is None; then ``x`` itself is returned first)."""
    s, u, scale = _launch(x, y, weight, eps=eps, dtype=dtype, fmt=None, interpret=interpret)
    return s, u.reshape(x.shape), scale


def residual_rms_norm_rounded(
    x: Float[Array, "... H"],
    y: Float[Array, "... H"] | None,
    weight: Float[Array, " H"],
    *,
    eps: float,
    dtype,
    fmt: str,
    interpret: bool | None = None,
) -> tuple[Float[Array, "... H"], tuple, Float[Array, "... 1"]]:
    """:func:`residual_rms_norm` with the weighted rows rounded for the dp4a product of a ``fmt`` matrix instead:
    ``(s, (words, factors), scale)``, ``(words, factors)`` what ``qmatmul_dp4a.quantize_activations`` makes of the
    rows ``(s * weight).astype(dtype)`` flattened to ``[R, H]`` (``H`` a multiple of 32), in the same launch."""
    if x.shape[-1] % 32:
        raise ValueError(f"rows of H={x.shape[-1]} cannot be rounded per 32-block (H must be a multiple of 32)")
    return _launch(x, y, weight, eps=eps, dtype=dtype, fmt=fmt, interpret=interpret)


def _launch(x, y, weight, *, eps, dtype, fmt, interpret):
    if x.ndim < 1 or (y is not None and y.shape != x.shape):
        raise ValueError(f"x {x.shape} and y {None if y is None else y.shape} must be [..., H] of one shape")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight.shape={weight.shape} must be ({x.shape[-1]},) for x of shape {x.shape}")
    interpret = backend.resolve_interpret(interpret)
    lead, hidden = x.shape[:-1], x.shape[-1]
    flat = lambda a: a.reshape(-1, hidden)
    s, rows, scale = _call(
        flat(x).astype(jnp.float32),
        None if y is None else flat(y),
        weight,
        eps=float(eps),
        dtype=jnp.dtype(dtype),
        fmt=fmt,
        interpret=interpret,
    )
    return s.reshape(x.shape), rows, scale.reshape(*lead, 1)
