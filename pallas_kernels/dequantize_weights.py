"""A block-quantized matrix (GGUF formats, ``block_formats``) dequantized to a dense ``[N, K]`` matrix in one launch.

Products of many rows (prefill, large prompt chunks) dequantize each matrix once and give it to XLA's GEMM
(``jkv.models.quant.dequantized_dot``); XLA's own dequantization of the 4-bit formats reads and writes at a
fraction of the memory's rate. Here each program takes ``block_n`` rows and ``block_k`` packed columns: the
planes are read as the ``dot_expand`` tile reads them (``qmatmul_expand.expanded_tiles``: every per-group entry
already broadcast to its codes, 2-D tensors only), dequantized with the kernels' shared arithmetic
(``qmatmul_units.dequantize_codes``) and stored in ``K``'s order: for the nibble formats, part ``p``'s packed
column ``c`` is value ``32 (c // 16) + 16 p + c % 16`` of its row. The values are those of
``block_formats.dequantize`` (float32, then ``dtype``) wherever the compilers round alike (interpret mode: bit for
bit).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, common
from pallas_kernels.block_formats import block_format, check_planes
from pallas_kernels.qmatmul_expand import expanded_tiles

BLOCK_N = 32  # rows a program (at most: the largest power of two dividing N)
BLOCK_K = 256  # packed columns a program (at most; at least the format's widest group)


def _kernel(*refs, fmt: str, block_n: int, block_k: int):
    *plane_refs, o_ref = refs
    n0 = pl.multiple_of(pl.program_id(0) * block_n, block_n)
    k0 = pl.multiple_of(pl.program_id(1) * block_k, block_k)
    rows = (n0 + lax.broadcasted_iota(jnp.int32, (block_n, 1), 0)) + jnp.zeros((1, block_k), jnp.int32)
    c = k0 + lax.broadcasted_iota(jnp.int32, (block_n, block_k), 1)  # packed columns
    tiles = expanded_tiles(fmt, plane_refs, n0, block_n, k0, block_k)
    for p, tile in enumerate(tiles):
        col = c if len(tiles) == 1 else 32 * lax.div(c, 16) + 16 * p + lax.rem(c, 16)
        o_ref[rows, col] = tile.astype(o_ref.dtype)


def launch(n: int, k: int, fmt: str) -> tuple[int, int]:
    """``(block_n, block_k)`` for an ``[N, K]`` matrix: the largest powers of two dividing ``N`` (at most
    ``BLOCK_N``) and ``K / parts`` (at most ``BLOCK_K``, at least the widest plane group)."""
    spec = block_format(fmt)
    kp = k // spec.parts
    block_k = max(math.gcd(kp, BLOCK_K), spec.max_group)
    return math.gcd(n, BLOCK_N), block_k


def dequantize_matrix(planes, fmt: str, dtype=jnp.bfloat16, *, interpret: bool | None = None):
    """The ``[N, K]`` matrix ``planes`` hold (``block_formats``' row planes of ``fmt``), as ``dtype``."""
    return _dequantize(tuple(planes), fmt, jnp.dtype(dtype), backend.resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("fmt", "dtype", "interpret"))
def _dequantize(planes, fmt: str, dtype, interpret: bool):
    n, k = check_planes(fmt, planes)
    block_n, block_k = launch(n, k, fmt)
    kernel = functools.partial(_kernel, fmt=fmt, block_n=block_n, block_k=block_k)
    grid = (n // block_n, k // block_format(fmt).parts // block_k)
    return common.whole_call(
        kernel, list(planes), jax.ShapeDtypeStruct((n, k), dtype), grid=grid, num_warps=4, num_stages=1,
        interpret=interpret, name=f"jkv_dequantize_{fmt.lower()}",
    )  # fmt: skip
