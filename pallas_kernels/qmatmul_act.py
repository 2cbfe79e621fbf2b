"""The dp4a path's activation rounding (``qmatmul_dp4a.quantize_activations``) as one Pallas launch.

In a batch-1 decode step every product of the dp4a path first rounds its activations to int8 words and their
per-block factors. XLA does that in several fusions (the blocks' largest magnitudes, then the codes and their
words, then the factors' sums), each a launch of a few microseconds around a product of a few more.
:func:`rounded_rows` does all of it in one launch: one program per row and ``chunk`` values (a power of two, at
most ``MAX_CHUNK``, dividing ``K``), each loading its values once, rounding its 32-blocks and storing the words
and every factor the format takes. The arithmetic is ``quantize_activations``'s own functions
(``int_codes.round_rows``, ``qmatmul_dp4a.block_factors``), so the two give the same words and factors wherever the
compilers round a float alike (interpret mode: bit for bit); only the packing of four codes to a word differs (a
bitcast for XLA, shifts here).

``ROUNDING`` (``"auto"``, ``"xla"`` or ``"kernel"``), read by ``quantized_matmul`` per call
(:func:`round_activations`), picks the form. ``"auto"`` (the default) is the kernel where the product runs on the
GPU and XLA's fusions in interpret mode (where the kernel would only be slower): on an H100 the batch-1 step of the
8B shape in the dp4a layout ran 3 % (Q8_0) and 6 % (Q4_K) faster with the kernel (docs/BENCHMARKS.md, "Activation
rounding in one launch"; ``bench/bench_qweights.py``'s ``<name>_dp4a_actx`` rows keep XLA's form for comparison).

:func:`gated_rows` rounds the input of a block's ``down`` product from the split-K partial products of its fused
gate/up matrix: the partials' sum, the norm's per-row scale, ``act(gate) * up`` and the rounding in one launch,
where XLA's fusion of the first three and the rounding kernel were two (:func:`round_gated` picks the form as
:func:`round_activations` does; :func:`gated_reference` is XLA's).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common, int_codes, qmatmul_dp4a

ROUNDINGS = ("auto", "xla", "kernel")
# The gated activations of an MLP (the model's ``activation`` names): SiLU, and GELU's tanh approximation (Gemma)
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
ROUNDING = "auto"
MAX_CHUNK = 1024  # values a program rounds (32 blocks)
# values a program of gated_rows makes (a power of two): it reads every split's partials of them, in a chain of
# dependent sums, so it takes fewer columns than the plain rounding, in more programs (its 1,024 ran 2.97 us a call
# at 14,336 columns on an H100, longer than the two launches it replaced: docs/BENCHMARKS.md)
GATED_CHUNK = 256


def round_blocks(x, fmt: str):
    """Inside a kernel: ``x [nb, 32]`` (float32, a row's 32-blocks) rounded as ``quantize_activations`` rounds it:
    ``(words [nb * 8] int32, factors)``, each factor ``[nb]``."""
    nb = x.shape[0]
    codes, scale = int_codes.round_rows(x)  # [nb, 32] int8, [nb]
    codes = codes.astype(jnp.int32)
    shift = 8 * lax.broadcasted_iota(jnp.int32, (nb, 8, 4), 2)
    # four codes to a word, the first lowest: disjoint byte fields, so their sum is their bitwise or (int32 wraps)
    words = jnp.sum(lax.shift_left(codes.reshape(nb, 8, 4) & 0xFF, shift), axis=2)  # [nb, 8]
    return words.reshape(nb * 8), qmatmul_dp4a.block_factors(codes, scale, fmt)


def _kernel(x_ref, words_ref, *factor_refs, fmt: str, chunk: int):
    r, c = pl.program_id(0), pl.program_id(1)
    nb = chunk // 32
    words, factors = round_blocks(x_ref[r, pl.ds(c * chunk, chunk)].astype(jnp.float32).reshape(nb, 32), fmt)
    words_ref[r, pl.ds(c * (chunk // 4), chunk // 4)] = words
    for ref, factor in zip(factor_refs, factors, strict=True):
        ref[r, pl.ds(c * nb, nb)] = factor


def chunk_of(k: int) -> int:
    """Values a program rounds for rows of ``k`` (a multiple of 32): the largest power of two dividing ``k``, at
    most ``MAX_CHUNK``."""
    if k <= 0 or k % 32:
        raise ValueError(f"rows of K={k} values cannot be rounded per 32-block (K must be a positive multiple of 32)")
    return math.gcd(k, MAX_CHUNK)


@functools.partial(jax.jit, static_argnames=("fmt", "interpret"))
def rounded_rows(x, fmt: str, *, interpret: bool):
    """``x [M, K]`` rounded as ``qmatmul_dp4a.quantize_activations(x, fmt)`` rounds it: ``(words, factors)``, in
    one launch."""
    m, k = x.shape
    chunk = chunk_of(k)
    words, factors = jax.eval_shape(functools.partial(qmatmul_dp4a.quantize_activations, fmt=fmt), x)
    out_shape = [words, *factors]
    kernel = functools.partial(_kernel, fmt=fmt, chunk=chunk)
    words, *factors = common.whole_call(
        kernel, [x], out_shape, grid=(m, k // chunk), num_warps=4, num_stages=1, interpret=interpret,
        name=f"jkv_act_rounding_{fmt.lower()}",
    )  # fmt: skip
    return words, tuple(factors)


def round_activations(x, fmt: str, interpret: bool, rounding: str | None):
    """The dp4a path's int8 activation words and factors, rounded as ``rounding`` says (None: ``ROUNDING``;
    ``quantized_matmul``'s public functions pass it per call, so a change retraces; ``"auto"``: the kernel unless
    ``interpret``)."""
    if form(rounding, interpret) == "kernel":
        return rounded_rows(x, fmt, interpret=interpret)
    return qmatmul_dp4a.quantize_activations(x, fmt)


def form(rounding: str | None, interpret: bool) -> str:
    """``"kernel"`` or ``"xla"``: ``rounding`` (None: ``ROUNDING``) with ``"auto"`` resolved (the kernel unless
    ``interpret``); anything else is refused."""
    rounding = ROUNDING if rounding is None else rounding
    if rounding == "auto":
        rounding = "xla" if interpret else "kernel"
    if rounding not in ("kernel", "xla"):
        raise ValueError(f"qmatmul_act.ROUNDING={rounding!r} must be one of {ROUNDINGS}")
    return rounding


# ----------------------------------------------------------------------------------------------- gated rows
def gated_reference(partials, scale, activation: str, dtype):
    """``act(gate) * up`` in ``dtype`` ``[M, F]`` from the split-K partial products ``[S, M, 2F]`` (float32) of a
    fused gate/up matrix (gate the first ``F`` columns, up the next) and the norm's per-row ``scale`` ``[M, 1]``:
    the partials summed, then scaled, as the model computes them when XLA sums the product."""
    gate_up = partials.sum(axis=0) * scale
    width = gate_up.shape[1] // 2
    return (ACTIVATIONS[activation](gate_up[:, :width]) * gate_up[:, width:]).astype(dtype)


def _gated_kernel(p_ref, s_ref, words_ref, *factor_refs, fmt, chunk, width, splits, activation, dtype):
    r, c = pl.program_id(0), pl.program_id(1)
    row, nb = pl.ds(r, 1), chunk // 32

    def summed(start):  # [1, chunk]: the partials of these columns summed in split order, then scaled
        cols = pl.ds(pl.multiple_of(start + c * chunk, chunk), chunk)
        total = p_ref[0, row, cols]
        for s in range(1, splits):
            total = total + p_ref[s, row, cols]
        return total * s_ref[row, pl.ds(0, 1)]

    x = (ACTIVATIONS[activation](summed(0)) * summed(width)).astype(dtype).astype(jnp.float32)
    words, factors = round_blocks(x.reshape(nb, 32), fmt)
    words_ref[r, pl.ds(c * (chunk // 4), chunk // 4)] = words
    for ref, factor in zip(factor_refs, factors, strict=True):
        ref[r, pl.ds(c * nb, nb)] = factor


@functools.partial(jax.jit, static_argnames=("fmt", "activation", "dtype", "interpret"))
def gated_rows(partials, scale, fmt: str, *, activation: str, dtype, interpret: bool):
    """:func:`gated_reference`'s rows rounded as ``qmatmul_dp4a.quantize_activations(rows, fmt)`` rounds them:
    ``(words, factors)``, in one launch (programs of ``gcd(F, GATED_CHUNK)`` columns of a row)."""
    splits, m, n = partials.shape
    width = n // 2
    chunk = math.gcd(width, GATED_CHUNK)
    rows = jax.ShapeDtypeStruct((m, width), dtype)
    words, factors = jax.eval_shape(functools.partial(qmatmul_dp4a.quantize_activations, fmt=fmt), rows)
    kernel = functools.partial(
        _gated_kernel, fmt=fmt, chunk=chunk, width=width, splits=splits, activation=activation, dtype=dtype
    )
    words, *factors = common.whole_call(
        kernel, [partials, scale], [words, *factors], grid=(m, width // chunk), num_warps=4, num_stages=1,
        interpret=interpret, name=f"jkv_gated_rounding_{fmt.lower()}",
    )  # fmt: skip
    return words, tuple(factors)


def round_gated(partials, scale, fmt: str, *, activation: str, dtype, interpret: bool, rounding: str | None = None):
    """The ``down`` product's int8 words and factors from its gate/up product's split-K ``partials``
    ``[S, M, 2F]`` and the norm's ``scale`` ``[M, 1]`` (:func:`gated_reference`), rounded as ``rounding`` says
    (as :func:`round_activations`: None reads ``ROUNDING``; ``"auto"``: the kernel unless ``interpret``)."""
    if partials.ndim != 3 or partials.shape[2] % 64 or partials.dtype != jnp.float32:
        raise ValueError(f"partials {partials.shape} {partials.dtype}: expected float32 [S, M, 2F], F a multiple of 32")
    if scale.shape != (partials.shape[1], 1):
        raise ValueError(f"scale.shape={scale.shape}: expected ({partials.shape[1]}, 1), a row's norm scale")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {tuple(ACTIVATIONS)}")
    scale = scale.astype(jnp.float32)
    if form(rounding, interpret) == "kernel":
        return gated_rows(partials, scale, fmt, activation=activation, dtype=jnp.dtype(dtype), interpret=interpret)
    return qmatmul_dp4a.quantize_activations(gated_reference(partials, scale, activation, dtype), fmt)
