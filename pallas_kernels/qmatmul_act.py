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
ROUNDING = "auto"
MAX_CHUNK = 1024  # values a program rounds (32 blocks)


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
