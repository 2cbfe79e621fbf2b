"""How the Llama block runs fast: its options, and every fusion in one place.

Unfused, a block is ``h = x + o(attn(rope(q), rope(k), v))`` with ``q, k, v = rmsnorm(x) @ (Wq, Wk, Wv)``, then
``out = h + down(silu(rmsnorm(h) @ Wgate) * (rmsnorm(h) @ Wup))``; ``model.py`` reads that way and calls the
helpers below, which compute the same values with fewer launches and weight reads. Each says why in a line and
names the docs/BENCHMARKS.md section that measured it ("Model fusions" there lists them together):

* fused q/k/v and gate/up products: one matmul reads each group of weights once ("Model fusions").
* RMSNorm split around its product: the per-row scale is applied to the product's output, so the norm's only
  work of its own is one reduction ("End-to-end decode", run 5).
* small products padded to ``MIN_MATMUL_ROWS`` rows, once per step on the residual stream: XLA's one-row GPU
  products read weights more slowly than its 8-row ones ("End-to-end decode", run 2 and "Later runs"); not in a
  model holding dp4a-layout matrices, whose integer-dot kernel's work grows with its rows.
* the RMSNorm as one Pallas kernel (``LlamaOptions.norm_kernel``): by default only before a dp4a product, whose
  rows it rounds in the same launch (the norm's reduction and the rounding kernel were two): the Q4_K batch-1 step
  2.5 % faster on an H100 ("The gated rounding and the norm kernel"); elsewhere off, measured neutral to worse
  ("End-to-end decode", run 6).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from jkv.attention import IMPLS, resolve_impl
from jkv.models import quant
from jkv.models.llama.config import ACTIVATIONS, LlamaConfig
from jkv.models.llama.params import LayerParams
from pallas_kernels import reference as kernel_reference
from pallas_kernels import rms_norm as rms_norm_kernels

# Fewest rows a projection runs with, per backend (a measured rule, read-only; LlamaOptions overrides it).
MIN_MATMUL_ROWS = types.MappingProxyType({"gpu": 8})


@dataclasses.dataclass(frozen=True)
class LlamaOptions:
    """How the model runs (hashable: a static argument of a jitted step). ``None`` takes the backend's default
    from the measured rules at trace time (``resolve``)."""

    impl: str | None = None  # attention: "xla" (reference) or "pallas" (kernels); None: Pallas on GPU only
    # RMSNorm as one Pallas kernel when impl is "pallas": True everywhere, False never, None (the default) where a
    # dp4a product follows (the kernel rounds its rows in the same launch)
    norm_kernel: bool | None = None
    min_matmul_rows: int | None = None  # None: MIN_MATMUL_ROWS of the backend, else 1
    # Block-quantized weights (jkv.models.quant.WEIGHTS_IMPLS): "pallas" (the Triton qmatmul kernels), "mgpu" (the
    # Mosaic GPU kernel where it takes the matrix, else Triton's; Hopper) or "xla" (dequantize + one dot); None
    # follows ``impl``.
    weights_impl: str | None = None
    # A padded step's queries, keys and values go to attention as the fused projection's one array
    # (``jkv.attend_write_qkv``: the decode kernel reads them in place; one XLA launch for the rotary embedding and
    # the cast where three slices were three). False: the slices.
    pack_qkv: bool = True

    def __post_init__(self):
        if self.impl is not None and self.impl not in IMPLS:
            raise ValueError(f"LlamaOptions.impl={self.impl!r} is not one of {IMPLS} or None")
        if not isinstance(self.pack_qkv, bool):
            raise ValueError(f"LlamaOptions.pack_qkv must be a bool, got {self.pack_qkv!r}")
        if self.norm_kernel is not None and not isinstance(self.norm_kernel, bool):
            raise ValueError(f"LlamaOptions.norm_kernel must be a bool or None, got {self.norm_kernel!r}")
        if self.weights_impl is not None and self.weights_impl not in quant.WEIGHTS_IMPLS:
            raise ValueError(
                f"LlamaOptions.weights_impl={self.weights_impl!r} is not one of {quant.WEIGHTS_IMPLS} or None"
            )
        rows = self.min_matmul_rows
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise ValueError(f"LlamaOptions.min_matmul_rows must be a positive int or None, got {rows!r}")

    def resolve(self) -> LlamaOptions:
        """These options with every ``None`` replaced by the default for ``jax.default_backend()``."""
        rows = self.min_matmul_rows
        rows = MIN_MATMUL_ROWS.get(jax.default_backend(), 1) if rows is None else rows
        return dataclasses.replace(self, impl=resolve_impl(self.impl), min_matmul_rows=rows)


DEFAULT_OPTIONS = LlamaOptions()


# ---------------------------------------------------------------------------------------------- small products
def padded_batch(batch: int, tokens: int, options: LlamaOptions) -> int:
    """Rows of the residual stream for ``batch`` sequences of ``tokens`` new tokens: ``batch``, or more so that
    every projection gets ``min_matmul_rows`` rows (the extra sequences are zeros, never written to a cache).

    Padded once per step, not before each product: a pad before each of a layer's four products was a kernel of
    its own ("End-to-end decode", "Later runs the same day")."""
    return max(batch, -(-options.min_matmul_rows // tokens))


def pad_rows(x: Float[Array, "B ..."], rows: int) -> Float[Array, "R ..."]:
    """``x`` with zero rows appended along its first axis up to ``rows`` (unchanged when it has as many)."""
    if rows <= x.shape[0]:
        return x
    return jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def project(x: Float[Array, "... H"], w, options: LlamaOptions, contract: int = 0) -> Float[Array, "..."]:
    """``x`` times ``w`` over ``x``'s last axis and ``w``'s axis ``contract``: operands in the weight dtype,
    f32 accumulation and result. Output axes: ``x``'s leading ones, then ``w``'s others in order. Fewer rows than
    ``options.min_matmul_rows`` are padded with zeros. Float32 weights multiply at full float32 precision: XLA's
    default on a GPU rounds float32 operands to TF32 (~1e-3 relative), not what float32 weights ask for.
    A block-quantized weight (``jkv.models.quant.QuantizedMatrix``) goes to its own product, unpadded."""
    if isinstance(w, quant.QuantizedMatrix):
        return quant.project(x, w, options.weights_impl or options.impl, contract)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = pad_rows(x.reshape(rows, x.shape[-1]).astype(w.dtype), options.min_matmul_rows)
    precision = lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    y = lax.dot_general(x2, w, (((1,), (contract,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
    out = [n for axis, n in enumerate(w.shape) if axis != contract]
    return y[:rows].reshape(*lead, *out)


# ---------------------------------------------------------------------------------------------- RMSNorm
class Normed(NamedTuple):
    """``rmsnorm(x) * weight`` split in two: ``rows = (x * weight).astype(dtype)`` and the per-row
    ``scale = rsqrt(mean(x**2) + eps)`` ``[..., 1]``. The scale commutes with a product
    (``rmsnorm(x) @ W == scale * ((x * weight) @ W)``), so it is applied to the product's output inside the
    fusion that consumes it. Before a dp4a-layout matrix's integer-dot product the norm kernel may give the rows
    rounded to int8 instead (``rounded``: words and factors; ``rows`` None)."""

    rows: Float[Array, "... H"] | None
    scale: Float[Array, "... 1"]
    rounded: tuple | None = None

    def value(self) -> Float[Array, "... H"]:
        """The normalised rows themselves (where no product follows)."""
        return self.rows * self.scale


def rms_norm(x: Float[Array, "... H"], weight, eps: float, dtype, options: LlamaOptions, matrix=None) -> Normed:
    """RMSNorm of ``x`` (f32) with ``weight``, split around the product that follows (``Normed``). With the norm
    kernel (``options.norm_kernel``: True, or None where it rounds), before ``matrix``'s integer-dot product (a
    dp4a-layout matrix, decode-sized rows) the kernel also rounds the rows as that product would: one launch for
    the norm and the rounding."""
    if options.norm_kernel is not False and options.impl == "pallas":
        rows, impl = math.prod(x.shape[:-1]), options.weights_impl or options.impl
        if quant.rounds_before(matrix, rows, impl):
            _, rounded, scale = rms_norm_kernels.residual_rms_norm_rounded(
                x, None, weight, eps=eps, dtype=dtype, fmt=matrix.format
            )
            return Normed(None, scale, rounded)
    if options.norm_kernel and options.impl == "pallas":
        _, rows, scale = rms_norm_kernels.residual_rms_norm(x, None, weight, eps=eps, dtype=dtype)
    else:
        _, rows, scale = kernel_reference.residual_rms_norm_reference(x, None, weight, eps=eps, dtype=dtype)
    return Normed(rows, scale)


def project_normed(normed: Normed, w, options: LlamaOptions) -> Float[Array, "..."]:
    """``rmsnorm(x) @ w`` from its split form: the product of the weighted rows, times the per-row scale."""
    if normed.rounded is not None:
        y = quant.project_rounded(normed.rounded, normed.scale.shape[:-1], w)
    else:
        y = project(normed.rows, w, options)
    return y * normed.scale.reshape(normed.scale.shape + (1,) * (y.ndim - normed.scale.ndim))


# ---------------------------------------------------------------------------------------------- fused weights
def qkv_rows(normed: Normed, layer: LayerParams, options: LlamaOptions) -> Float[Array, "B T K G2 D"]:
    """The fused ``wqkv`` product ``[B, T, K, G + 2, D]`` (float32, biases added): kv head ``k``'s ``G`` queries,
    its key and its value."""
    qkv = project_normed(normed, layer.wqkv, options)  # (B, T, K, G + 2, D)
    if layer.bqkv is not None:
        qkv = qkv + layer.bqkv.astype(jnp.float32)
    return qkv


def qkv_projection(normed: Normed, layer: LayerParams, config: LlamaConfig, options: LlamaOptions):
    """Queries ``[B, T, N, D]``, keys and values ``[B, T, K, D]`` from one product with the fused ``wqkv``
    ``[H, K, G + 2, D]`` (kv head k's G queries, its key, its value: a tensor-parallel split keeps groups whole)."""
    qkv = qkv_rows(normed, layer, options)
    b, t = qkv.shape[:2]
    g = config.num_heads // config.num_kv_heads
    q = qkv[:, :, :, :g].reshape(b, t, config.num_heads, config.head_dim)  # query head n = kv head n // G
    return q, qkv[:, :, :, g], qkv[:, :, :, g + 1]


def mlp_projection(normed: Normed, layer: LayerParams, options: LlamaOptions, activation: str = "silu"):
    """``down(act(gate) * up)`` on the normed stream ``[..., H]``: ``[..., H]`` float32."""
    return project(gate_up_projection(normed, layer, options, activation), layer.w_down, options)


def gate_up_projection(
    normed: Normed, layer: LayerParams, options: LlamaOptions, activation: str = "silu"
) -> Float[Array, "B T F"]:
    """``act(gate) * up`` from one product with the fused ``w_gate_up`` ``[H, 2, F]`` (a split of F keeps each
    gate column beside its up column); ``act`` is SiLU or, for Gemma, GELU's tanh approximation."""
    gate_up = project_normed(normed, layer.w_gate_up, options)  # (B, T, 2, F)
    return ACTIVATIONS[activation](gate_up[:, :, 0]) * gate_up[:, :, 1]
