"""Block-quantized weight matrices as pytrees the model takes wherever it takes a dense weight.

A :class:`QuantizedMatrix` stands for a dense weight of ``shape`` (as ``LlamaParams`` holds it, e.g. ``wqkv
[H, K, G + 2, D]``) whose reduction axis is ``reduce_axis`` (0 for projections; 1 for the embedding, whose rows
are tokens and whose transpose is a tied LM head). It holds the matrix as ``N`` rows of ``K`` reduction values in
the planes of ``pallas_kernels.block_formats`` (packed codes or nibbles and per-block scales, ``K`` along each
plane's last axis), with the format, the dense shape and the compute dtype as static aux data; stacking layers
adds a leading ``[L]`` to every plane (``shape`` then reads ``(L, *dense shape)``).

:func:`project` is the one product every matmul of the model goes through for such a weight
(``jkv.models.llama.fusions.project`` hands it over); :func:`take_rows` dequantizes the embedding rows a step
looks up. The ``"pallas"`` impl runs ``pallas_kernels.quantized_matmul`` (Triton on a GPU, interpret mode elsewhere),
``"mgpu"`` ``pallas_kernels.qmatmul_mgpu`` (Mosaic GPU, Hopper) for the products it takes (decode-sized row
counts) and Triton's for the rest, ``"xla"`` the reference (the matrix dequantized in float32, rounded to the
compute dtype, one dot). Products of ``DEQUANT_MIN_ROWS`` rows or more (prefill) take the reference under every
impl: XLA's GEMM over the dequantized matrix outruns the kernels there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from pallas_kernels import block_formats, dequantize_weights, qmatmul_dp4a, quantized_matmul

WEIGHTS_IMPLS = ("xla", "pallas", "mgpu")
LAYOUTS = ("rows", "dp4a")  # QuantizedMatrix.layout: the format's planes, or to_dp4a_layout's interleaved words
DP4A_FORMATS = tuple(f for f, words in qmatmul_dp4a.WORDS.items() if words == 4)
# Rows a dp4a-layout product takes on the integer-dot kernel; more run the row layout's kernel (DP4A_MID_ROWS). On
# an H100 the 8B-shaped decode step ran faster on it at 2 sequences, level (Q8_0) or faster (Q4_K) at 4, and
# slower at 8 and 16 (docs/BENCHMARKS.md, "Where the dp4a kernel hands over").
DP4A_MAX_ROWS = 4
# How a dp4a-layout product of more rows than that and fewer than DEQUANT_MIN_ROWS runs (decode at 5-127
# sequences, small mixed steps): "dequantize" (the matrix dequantized for one XLA dot: about 4.6 bytes moved a Q4_K
# weight) or "rows" (its words put back in the format's row layout by XLA, then the row layout's Triton kernel:
# about 1.7). On an H100 the Llama-3-8B-shaped decode step at 64 sequences took 7.20 ms (Q8_0) and 10.56 ms (Q4_K)
# with "rows", 16.08 and 17.16 dequantizing (docs/BENCHMARKS.md, "Packed q/k/v, the mid-size products and the gated
# rounding on the GPU"; bench/bench_qweights.py's ``_middeq`` rows keep "dequantize").
DP4A_MID_ROWS = "rows"
DP4A_MID_FORMS = ("dequantize", "rows")
# The dp4a layout's launch for (M, N, K, format) (bench/bench_qweights.py's ``_rule2x`` rows put the one before here)
DP4A_LAUNCH = quantized_matmul.dp4a_config
# Rows from which a row-layout product dequantizes the matrix for one XLA dot instead of running the Triton dot
# kernel: bench/bench_qmatmul.py's default / dequant rows at M = 64-1024 (an H100; docs/BENCHMARKS.md, "Where
# the quantized products hand over") place the crossing at 128-256 rows for Q8_0 (a tie over a layer's three
# products at 128) and 64-128 for Q4_K; at 256 rows and more the dequantized matrix wins every product measured.
DEQUANT_MIN_ROWS = 128
# How such a product dequantizes its matrix for XLA's GEMM: "xla" (``block_formats.dequantize`` in XLA's fusions)
# or "kernel" (``pallas_kernels.dequantize_weights``: one launch a matrix, the same values). Timed on an H100 the
# kernel was level with XLA's form within the run's noise (bench/bench_qweights.py's ``_deqk`` prefill rows;
# docs/BENCHMARKS.md), so XLA's stays the default. ``weights_impl="xla"`` always dequantizes in XLA.
DEQUANT_IMPLS = ("xla", "kernel")
DEQUANT_IMPL = "xla"


@struct.dataclass
class QuantizedMatrix:
    planes: tuple  # block_formats planes of the [N, K] matrix, each [*batch, N, ...]
    format: str = struct.field(pytree_node=False)
    dense_shape: tuple[int, ...] = struct.field(pytree_node=False)  # one matrix, as the dense weight
    reduce_axis: int = struct.field(pytree_node=False)  # 0 (projections) or 1 (the [V, H] embedding)
    compute_dtype: str = struct.field(pytree_node=False)  # activations are cast to it; the dense dtype it replaces
    layout: str = struct.field(pytree_node=False, default="rows")  # one of LAYOUTS

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The stacking axes before the matrix's planes (``[L]`` for stacked layers)."""
        return self.planes[0].shape[: self.planes[0].ndim - (3 if self.layout == "dp4a" else 2)]

    def flat_planes(self) -> tuple:
        """The planes with their stacking axes flattened into one leading axis (``[B, ...]``; B = 1 unstacked)."""
        lead = len(self.batch_shape)
        return tuple(p.reshape(-1, *p.shape[lead:]) for p in self.planes)

    def row_planes(self) -> tuple:
        """The planes in the format's own row layout (``layout == "rows"``: as held; ``"dp4a"``: converted back,
        one matrix; XLA work)."""
        if self.layout == "rows":
            return self.planes
        return qmatmul_dp4a.byte_planes(qmatmul_dp4a.deinterleave(self.planes, self.format), self.format)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, *self.dense_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(p.size) * p.dtype.itemsize for p in self.planes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The dense axes other than the reduction one (a product's output axes, in order)."""
        return tuple(n for axis, n in enumerate(self.dense_shape) if axis != self.reduce_axis)

    def dequantize(self, dtype=None):
        """The dense weight (``[*batch, *dense_shape]``) as ``dtype`` (default the compute dtype)."""
        dtype = self.dtype if dtype is None else dtype
        batch = self.batch_shape
        one = lambda *ps: block_formats.dequantize(self.replace(planes=ps).row_planes(), self.format, jnp.float32)
        rows = jax.vmap(one)(*self.flat_planes())  # (B, N, K)
        k = self.dense_shape[self.reduce_axis]
        dense = rows.reshape(-1, *self.out_shape, k)
        if self.reduce_axis == 0:
            dense = jnp.moveaxis(dense, -1, 1)
        return dense.reshape(*batch, *self.dense_shape).astype(dtype)


def from_planes(fmt: str, planes: Sequence, dense_shape, dtype, reduce_axis: int = 0) -> QuantizedMatrix:
    """A ``QuantizedMatrix`` over ``planes`` (NumPy or JAX; ``[N, ...]`` rows in ``dense_shape``'s output order),
    checked against the format and the dense shape."""
    dense_shape = tuple(int(n) for n in dense_shape)
    if reduce_axis not in (0, len(dense_shape) - 1) or len(dense_shape) < 2:
        raise ValueError(f"reduce_axis={reduce_axis} must be 0 or the last axis of a dense shape {dense_shape}")
    n, k = block_formats.check_planes(fmt, tuple(planes))
    out = math.prod(d for axis, d in enumerate(dense_shape) if axis != reduce_axis)
    if (n, k) != (out, dense_shape[reduce_axis]):
        raise ValueError(
            f"{fmt} planes of an {n} x {k} matrix cannot stand for a dense {dense_shape} reduced over axis "
            f"{reduce_axis} (expected {out} x {dense_shape[reduce_axis]})"
        )
    return QuantizedMatrix(tuple(planes), fmt, dense_shape, reduce_axis, jnp.dtype(dtype).name)


def project(x, w: QuantizedMatrix, impl: str, contract: int = 0):
    """``x [..., K]`` times ``w`` over its reduction axis: ``[..., *w.out_shape]`` float32 (activations cast to
    ``w.dtype`` first, as for a dense weight)."""
    if contract != w.reduce_axis:
        raise ValueError(f"a {w.format} matrix reduces over axis {w.reduce_axis}, not {contract}")
    if w.batch_shape:
        raise ValueError(f"project takes one matrix, got stacked planes {w.planes[0].shape}: slice a layer first")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1]).astype(w.dtype)
    if w.layout == "dp4a":
        y = _project_dp4a(x2, w, impl)
    elif impl in ("pallas", "mgpu") and x2.shape[0] >= DEQUANT_MIN_ROWS:  # prefill-sized: the reference's path
        y = dequantized_dot(x2, w, DEQUANT_IMPL)
    elif impl == "mgpu" and _mgpu_takes(w, x2.shape[0], x2.dtype):
        from pallas_kernels import qmatmul_mgpu

        y = qmatmul_mgpu.qmatmul_mgpu(x2, w.planes, w.format)
    elif impl in ("pallas", "mgpu"):
        y = quantized_matmul.qmatmul(x2, w.planes, w.format)
    elif impl == "xla":
        y = dequantized_dot(x2, w)
    else:
        raise ValueError(f"weights impl {impl!r} is not one of {WEIGHTS_IMPLS}")
    return y.reshape(*lead, *w.out_shape)


def dequantized_dot(x2, w: QuantizedMatrix, dequantize: str = "xla"):
    """``x2 @ W.T`` as ``block_formats.qmatmul_reference`` makes it: the matrix dequantized (from its row planes, in
    either layout; by XLA or, ``dequantize="kernel"``, by ``pallas_kernels.dequantize_weights``), one dot. The
    planes as held pass an optimization barrier with the activations first, so no work on them (dp4a words back to
    rows, dequantization) starts before the layer's input exists: the weights do not depend on it, and XLA could
    otherwise dequantize every layer's matrices at a step's start (the whole model in bf16 at once, beside a cache
    sized to the memory left)."""
    if dequantize not in DEQUANT_IMPLS:
        raise ValueError(f"quant.DEQUANT_IMPL={dequantize!r} must be one of {DEQUANT_IMPLS}")
    planes, x2 = lax.optimization_barrier((w.planes, x2))
    kernel = dequantize_weights.dequantize_matrix if dequantize == "kernel" else None
    return block_formats.qmatmul_reference(x2, w.replace(planes=planes).row_planes(), w.format, kernel)


def _project_dp4a(x2, w: QuantizedMatrix, impl: str):
    """``x2 @ W.T`` for a matrix in the dp4a layout: the integer-dot kernel over its interleaved words up to
    ``DP4A_MAX_ROWS`` rows (launched as ``DP4A_LAUNCH`` says: ``quantized_matmul.dp4a_config``); more rows (and
    the ``"xla"`` impl) as the reference does it, the matrix dequantized for one dot, or, below
    ``DEQUANT_MIN_ROWS`` with ``DP4A_MID_ROWS = "rows"`` (the default), the row layout's kernel over the words put
    back."""
    if impl not in WEIGHTS_IMPLS:
        raise ValueError(f"weights impl {impl!r} is not one of {WEIGHTS_IMPLS}")
    if DP4A_MID_ROWS not in DP4A_MID_FORMS:
        raise ValueError(f"quant.DP4A_MID_ROWS={DP4A_MID_ROWS!r} must be one of {DP4A_MID_FORMS}")
    m = x2.shape[0]
    if impl != "xla" and DP4A_MAX_ROWS < m < DEQUANT_MIN_ROWS and DP4A_MID_ROWS == "rows":
        planes, x2 = lax.optimization_barrier((w.planes, x2))  # no layer's words put back before its input exists
        return quantized_matmul.qmatmul(x2, w.replace(planes=planes).row_planes(), w.format)
    if impl == "xla" or m > DP4A_MAX_ROWS:
        return dequantized_dot(x2, w, "xla" if impl == "xla" else DEQUANT_IMPL)
    return _dp4a_kernel(x2, w)


def _dp4a_kernel(x, w: QuantizedMatrix):
    """The integer-dot kernel's product of activations ``[M, K]`` (or of their rounded words and factors)."""
    m = (x[0] if isinstance(x, tuple) else x).shape[0]
    n, k = math.prod(w.out_shape), w.dense_shape[w.reduce_axis]
    config = DP4A_LAUNCH(m, n, k, w.format)
    return quantized_matmul.qmatmul_words(x, w.planes, w.format, config=config, interleaved=True)


def rounds_before(w, rows: int, impl: str | None) -> bool:
    """Whether ``rows`` rows times ``w`` run the dp4a layout's integer-dot kernel, whose activations can then be
    rounded to int8 before the product (by the norm before it: ``rms_norm.residual_rms_norm_rounded``) and given
    to :func:`project_rounded`."""
    dp4a = isinstance(w, QuantizedMatrix) and w.layout == "dp4a"
    return dp4a and impl in ("pallas", "mgpu") and rows <= DP4A_MAX_ROWS and not w.batch_shape


def project_rounded(rounded, lead: tuple, w: QuantizedMatrix):
    """:func:`project` of activations ``[*lead, K]`` already rounded for ``w``'s dp4a product (``(words,
    factors)`` of ``qmatmul_dp4a.quantize_activations``, rows flattened; :func:`rounds_before` said so):
    ``[*lead, *w.out_shape]`` float32."""
    return _dp4a_kernel(rounded, w).reshape(*lead, *w.out_shape)


def to_dp4a_layout(params, *, donate: bool = False):
    """``params`` with each projection matrix of a ``DP4A_FORMATS`` format in the dp4a layout: its code words
    interleaved for the integer-dot kernel's coalesced reads (``pallas_kernels.qmatmul_dp4a.interleave``), the same
    bytes. Decode-sized products (up to ``DP4A_MAX_ROWS`` rows) then run that kernel, whose activations are rounded
    to int8 per 32-block (docs/quant.md); larger ones dequantize the matrix for one dot. Embeddings keep their rows
    (a step looks rows up). ``donate``: free each matrix's row-layout planes once its new ones are made, so the
    weights are never held twice (``params`` must not be used afterwards; the loader does this)."""

    def convert(w):
        if not is_quantized(w) or w.layout != "rows" or w.reduce_axis != 0 or w.format not in DP4A_FORMATS:
            return w
        batch = w.batch_shape
        laid = _interleaved_words(w.flat_planes(), w.format)
        if donate:
            jax.block_until_ready(laid)
            for p in w.planes:
                if isinstance(p, jax.Array):
                    p.delete()
        return w.replace(planes=tuple(p.reshape(*batch, *p.shape[1:]) for p in laid), layout="dp4a")

    return jax.tree.map(convert, params, is_leaf=is_quantized)


@functools.partial(jax.jit, static_argnames="fmt")
def _interleaved_words(flat_planes: tuple, fmt: str) -> tuple:
    """Each of a flattened batch of matrices' planes laid out by ``qmatmul_dp4a.interleave`` (one compile per
    format and shape: a model's layers share it)."""
    one = lambda *ps: qmatmul_dp4a.interleave(qmatmul_dp4a.weight_words(ps, fmt), fmt)
    return jax.vmap(one)(*flat_planes)


def _mgpu_takes(w: QuantizedMatrix, rows: int, dtype) -> bool:
    """Whether the Mosaic GPU kernel takes ``rows`` of ``dtype`` activations times ``w``: a small-M kernel (one row
    block at most; prefill stays on the Triton kernel's large tiles), its formats and shapes. It needs a GPU with
    Mosaic GPU (``qmatmul_mgpu`` says so where there is none)."""
    from pallas_kernels import qmatmul_mgpu

    n, k = math.prod(w.out_shape), w.dense_shape[w.reduce_axis]
    small = rows <= qmatmul_mgpu.MAX_BLOCK_M
    return small and qmatmul_mgpu.unsupported_reason(w.format, n, k, dtype) is None


def take_rows(w, ids):
    """``w[ids]`` for a dense ``[V, H]`` embedding or a ``QuantizedMatrix`` one (rows dequantized, ``w.dtype``)."""
    if not isinstance(w, QuantizedMatrix):
        return jnp.take(w, ids, axis=0)
    if w.reduce_axis != 1 or len(w.dense_shape) != 2 or w.layout != "rows":
        raise ValueError(
            f"take_rows needs a [V, H] embedding reduced over axis 1 in the rows layout, got "
            f"{w.dense_shape}/{w.reduce_axis}/{w.layout}"
        )
    flat = ids.reshape(-1)
    rows = block_formats.dequantize(tuple(p[flat] for p in w.planes), w.format, w.dtype)  # (R, H)
    return rows.reshape(*ids.shape, w.dense_shape[1])


# ----------------------------------------------------------------------------------------------- host side
def concat_rows(parts: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Planes of the matrices ``parts`` (each a tuple of planes of one format) stacked row after row."""
    return tuple(np.concatenate(planes, axis=0) for planes in zip(*parts, strict=True))


def fuse_qkv_rows(q, k, v, num_kv_heads: int) -> tuple[np.ndarray, ...]:
    """Planes of q/k/v projections (rows ``N*D``, ``K*D``, ``K*D``) in the row order of the fused ``wqkv``
    ``[H, K, G + 2, D]``: kv head ``h``'s ``G`` query heads, then its key, then its value."""
    out = []
    for pq, pk, pv in zip(q, k, v, strict=True):
        group = [p.reshape(num_kv_heads, -1, p.shape[-1]) for p in (pq, pk, pv)]
        out.append(np.concatenate(group, axis=1).reshape(-1, pq.shape[-1]))
    return tuple(out)


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedMatrix)


def holds_layout(tree, layout: str) -> bool:
    """Whether a ``QuantizedMatrix`` of ``layout`` is among ``tree``'s leaves (static: known at trace time)."""
    return any(is_quantized(w) and w.layout == layout for w in jax.tree.leaves(tree, is_leaf=is_quantized))


def dequantize_params(params, dtype=None):
    """``params`` with every ``QuantizedMatrix`` replaced by its dense weight (``dtype``, default its compute
    dtype): the dequantize-at-load model of the same values."""
    return jax.tree.map(
        lambda w: w.dequantize(dtype) if isinstance(w, QuantizedMatrix) else w, params, is_leaf=is_quantized
    )
