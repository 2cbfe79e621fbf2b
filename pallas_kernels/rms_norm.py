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

from pallas_kernels import backend, common


def _kernel(*refs, hidden: int, width: int, eps: float, has_y: bool):
    if has_y:
        x_ref, y_ref, w_ref, x_out, u_out, s_out = refs
    else:
        (x_ref, w_ref, u_out, s_out), y_ref, x_out = refs, None, None
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
    backend.store(u_out.at[row, cols], (x * w).astype(u_out.dtype), mask=ok)
    backend.store(s_out.at[row, pl.ds(0, 1)], scale)


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "interpret"))
def _call(x, y, weight, *, eps: float, dtype, interpret: bool):
    rows, hidden = x.shape
    width = 1 << (hidden - 1).bit_length()
    has_y = y is not None
    inputs = [x, y, weight[None, :]] if has_y else [x, weight[None, :]]
    out_shape = [jax.ShapeDtypeStruct((rows, hidden), dtype), jax.ShapeDtypeStruct((rows, 1), jnp.float32)]
    if has_y:
        out_shape.insert(0, jax.ShapeDtypeStruct((rows, hidden), jnp.float32))
    kernel = functools.partial(_kernel, hidden=hidden, width=width, eps=eps, has_y=has_y)
    launch = dict(grid=(rows,), num_warps=4 if width <= 4096 else 8, num_stages=1, interpret=interpret)
    outs = common.whole_call(kernel, inputs, out_shape, **launch, name="jkv_residual_rms_norm")
    return tuple(outs) if has_y else (x, *outs)


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
    if x.ndim < 1 or (y is not None and y.shape != x.shape):
        raise ValueError(f"x {x.shape} and y {None if y is None else y.shape} must be [..., H] of one shape")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight.shape={weight.shape} must be ({x.shape[-1]},) for x of shape {x.shape}")
    interpret = backend.resolve_interpret(interpret)
    lead, hidden = x.shape[:-1], x.shape[-1]
    flat = lambda a: a.reshape(-1, hidden)
    s, u, scale = _call(
        flat(x).astype(jnp.float32),
        None if y is None else flat(y),
        weight,
        eps=float(eps),
        dtype=jnp.dtype(dtype),
        interpret=interpret,
    )
    return s.reshape(x.shape), u.reshape(x.shape), scale.reshape(*lead, 1)
