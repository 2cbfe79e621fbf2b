"""Residual add and RMSNorm in one kernel: the norm before each product of a decoder block.

``residual_rms_norm(x, y, weight)`` returns ``(x + y, ((x + y) * weight).astype(dtype), rsqrt(mean((x + y)**2)
+ eps))``: the new residual stream (float32), the weighted rows the next product reads, and the per-row scale
that commutes with that product (``rmsnorm(x) @ W == scale * ((x * weight) @ W)``, applied by the model to the
product's output). ``y=None`` normalises ``x`` alone.

Why a kernel: in a batch-1 decode step every one of these is a few microseconds of launch latency, and XLA runs
the residual add and the norm's reduction as two fusions (the add's output has users outside the reduction).
One Pallas program per row does all three outputs in one launch. Rows of any width: the row is one
power-of-two tile, masked past ``H``. Interpret mode off GPU (see ``pallas_kernels.backend``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas_kernels import backend, common, qmatmul_act, qmatmul_dp4a


def _kernel(*refs, hidden: int, width: int, eps: float, has_y: bool, dtype, fmt: str | None):
    x_ref, refs = refs[0], refs[1:]
    y_ref, refs = (refs[0], refs[1:]) if has_y else (None, refs)
    w_ref, refs = refs[0], refs[1:]
    x_out, refs = (refs[0], refs[1:]) if has_y else (None, refs)
    *rows_out, s_out = refs  # the weighted rows, or their int8 words and factors (fmt)
    r = pl.program_id(0)
    row, cols = pl.ds(r, 1), pl.ds(0, width)
    ok = lax.broadcasted_iota(jnp.int32, (1, width), 1) < hidden if width != hidden else None
    other = 0.0 if ok is not None else None
    x = backend.load(x_ref.at[row, cols], mask=ok, other=other).astype(jnp.float32)  # [1, width]
    if has_y:
        x = x + backend.load(y_ref.at[row, cols], mask=ok, other=other).astype(jnp.float32)
        backend.store(x_out.at[row, cols], x, mask=ok)
    w = backend.load(w_ref.at[pl.ds(0, 1), cols], mask=ok, other=other).astype(jnp.float32)
    scale = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) * (1.0 / hidden) + eps)  # [1, 1]
    backend.store(s_out.at[row, pl.ds(0, 1)], scale)
    if fmt is None:
        backend.store(rows_out[0].at[row, cols], (x * w).astype(dtype), mask=ok)
        return
    # the weighted rows in the activations' dtype, rounded to int8 per 32-block as the dp4a product would round them
    rows = (x * w).astype(dtype).astype(jnp.float32).reshape(width // 32, 32)
    words, block_factors = qmatmul_act.round_blocks(rows, fmt)
    at = lambda n: lax.broadcasted_iota(jnp.int32, (1, n), 1) < hidden * n // width if width != hidden else None
    backend.store(rows_out[0].at[row, pl.ds(0, width // 4)], words[None], mask=at(width // 4))
    for ref, factor in zip(rows_out[1:], block_factors, strict=True):
        backend.store(ref.at[row, pl.ds(0, width // 32)], factor[None], mask=at(width // 32))


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "fmt", "interpret"))
def _call(x, y, weight, *, eps: float, dtype, fmt: str | None, interpret: bool):
    rows, hidden = x.shape
    width = common.pow2_ceil(hidden)
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
    kernel = functools.partial(_kernel, hidden=hidden, width=width, eps=eps, has_y=has_y, dtype=dtype, fmt=fmt)
    launch = dict(grid=(rows,), num_warps=4 if width <= 4096 else 8, num_stages=1, interpret=interpret)
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
