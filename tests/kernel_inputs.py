"""Inputs and tolerances the kernel tests (tests/kernels/) and the cache tests that run kernels share."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import REL_TOL
from helpers_compile import FAST_COMPILE
from reference import decode_attention_f64

from jkv.caches.formats import dequantize, quantize
from pallas_kernels import decode_q8
from pallas_kernels.formats import dequantize_fp8, quantize_fp8

# Products in bf16/f16 round p (and q): the shared table. float32 q: exact in interpret mode on a CPU, tf32 on a
# GPU (the real lowering, and interpret mode too: its dots run on the GPU at default precision).
KERNEL_TOL = {"float32": 1e-5, "float32-gpu": 2e-3, "bfloat16": REL_TOL["bfloat16"], "float16": REL_TOL["float16"]}
# The Q8 body's loop forms other than the default (decode_q8.LOOP_FORMS), and those the GPU tests take: each part
# alone, then all of them
Q8_OTHER_FORMS = [f for f in decode_q8.LOOP_FORMS if f != decode_q8.LOOP_FORM]
Q8_GPU_FORMS = [f for f in Q8_OTHER_FORMS if "+" not in f] + [decode_q8.LOOP_FORMS[-1]]
# A head_dim that is not a power of two read as one padded, column-masked tile, then in power-of-two column parts,
# whichever the kernel's default
COLUMN_FORMS = ("vperm+pad", "vperm+parts")
# Decode attention through a Q8 cache against attention over the unquantized values, q/k/v ~ N(0, 1): measured
# relative errors of 7.2e-3 to 8.6e-3 over 1024 positions with either scale dtype (docs/quant.md); asserted at
# about twice the largest.
Q8_ATTENTION_REL_TOL = 1.5e-2
# Lengths named relative to the cache size S and the block size bk, so one table serves every scale: empty, one
# position, a block's edges and the capacity.
LENGTHS = {
    "1": lambda s, bk: 1,
    "0": lambda s, bk: 0,
    "bk-1": lambda s, bk: bk - 1,
    "bk": lambda s, bk: bk,
    "bk+1": lambda s, bk: bk + 1,
    "2bk+1": lambda s, bk: 2 * bk + 1,
    "S-1": lambda s, bk: s - 1,
    "S": lambda s, bk: s,
}


def kernel_query(q, int8_codes: bool = True):
    """``q [..., D]`` in float64 as the Q8 kernel's score products take it under the current
    ``decode_q8.LOOP_FORM``: with an ``iq8`` form over int8 codes, each head's 32-value chunk rounded to int8 at
    its own scale (``floor(x * 127 / peak + 0.5)`` in float32, the rule ``int_codes.round_rows`` states, written
    out here in NumPy), else ``q`` itself (the kernels' rounding of ``q`` to its own dtype is the tolerance's)."""
    x = np.asarray(jnp.asarray(q).astype(jnp.float32))
    if not (int8_codes and "iq8" in decode_q8.LOOP_FORM.split("+")):
        return x.astype(np.float64)
    chunks = x.reshape(*x.shape[:-1], -1, 32)
    peak = np.max(np.abs(chunks), axis=-1, keepdims=True)
    inv = np.where(peak > 0, np.float32(127.0) / np.where(peak > 0, peak, np.float32(1.0)), np.float32(0.0))
    codes = np.clip(np.floor(chunks * inv + np.float32(0.5)), -127, 127)
    return (codes.astype(np.float64) * (peak.astype(np.float64) / 127.0)).reshape(x.shape)


def fast_jit(fn, **options):
    """``jax.jit(fn, **options)`` with ``helpers_compile.FAST_COMPILE`` (compiling the interpret-mode kernels, tiny
    programs run once, is most of the kernel tests' time on a CPU)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **options)


def run_jitted(fn, *args, **static):
    """``fn(*args, **static)`` as one ``fast_jit`` program (eager dispatch would compile the calls around a kernel
    one by one, at full optimisation)."""
    return fast_jit(lambda *a: fn(*a, **static))(*args)


def random_paged(rng, batch, kv_heads, head_dim, page_size, max_pages, lengths, layers, stale):
    """Pools (float64, NaN wherever nothing valid lives), block tables, and the contiguous K/V slabs they hold."""
    num_layers, layer = layers if layers is not None else (1, 0)
    layer = 1 if layer == "traced" else layer
    need = [-(-n // page_size) for n in lengths]
    spare = 3 + batch  # pages nobody uses (NaN), for stale entries to name
    num_pages = sum(need) + spare
    order = rng.permutation(num_pages)
    shape = (num_layers, num_pages, kv_heads, page_size, head_dim)
    k_pages, v_pages = np.full(shape, np.nan), np.full(shape, np.nan)
    slabs = [rng.standard_normal((batch, kv_heads, max_pages * page_size, head_dim)) for _ in range(2)]
    tables = np.full((batch, max_pages), -1, np.int32)
    if stale:
        tables[:] = rng.choice(order[sum(need) :], size=tables.shape)
    used = 0
    for b, n in enumerate(lengths):
        for j in range(need[b]):
            tables[b, j] = page = order[used]
            used += 1
            rows = min(page_size, n - j * page_size)
            for pool, slab in zip((k_pages, v_pages), slabs, strict=True):
                pool[layer, page, :, :rows] = slab[b, :, j * page_size : j * page_size + rows]
    if layers is None:
        k_pages, v_pages = k_pages[0], v_pages[0]
    return k_pages, v_pages, tables, slabs


def bench_paged_inputs(rng, batch, seq, page_size):
    """The benchmark's head layout (N=32, K=8, D=128) over bf16 page pools, full lengths but the first
    (``seq - 77``): ``(q, k_pages, v_pages, tables, lengths)`` as device arrays and the float64 reference output."""
    lengths = np.full((batch,), seq, np.int32)
    lengths[0] = seq - 77
    k_pages, v_pages, tables, (k, v) = random_paged(
        rng, batch, 8, 128, page_size, seq // page_size, lengths, None, True
    )
    q = rng.standard_normal((batch, 32, 128))
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    ref = decode_attention_f64(*(np.asarray(bf(x).astype(jnp.float32), np.float64) for x in (q, k, v)), lengths)
    return (bf(q), bf(k_pages), bf(v_pages), jnp.asarray(tables), jnp.asarray(lengths)), ref


def q8_pools(rng, batch, kv_heads, head_dim, page_size, max_pages, lengths, layers, stale, scale_dtype=jnp.float16):
    """test_paged_kernel's random permuted pools quantized: codes 0 and NaN scales wherever nothing valid lives.
    Returns the four pools, the tables and the dequantized contiguous K/V slabs (float64)."""
    k_pages, v_pages, tables, slabs = random_paged(
        rng, batch, kv_heads, head_dim, page_size, max_pages, lengths, layers, stale
    )
    pools = [*quantize(jnp.asarray(k_pages, jnp.float32), scale_dtype=scale_dtype)]
    pools += [*quantize(jnp.asarray(v_pages, jnp.float32), scale_dtype=scale_dtype)]
    deq = [
        np.asarray(dequantize(*quantize(jnp.asarray(s, jnp.float32), scale_dtype=scale_dtype)), np.float64)
        for s in slabs
    ]
    return pools, tables, deq


def fp8_arrays(x):
    """``x [..., D]`` (float64) in the FP8 format as NumPy arrays: float8_e4m3fn values, float32 scales ``[..., 1]``,
    and the float64 values they hold. A NaN vector stays NaN in both its values and its scale (poison)."""
    values, scales = quantize_fp8(jnp.asarray(x, jnp.float32))
    held = np.asarray(dequantize_fp8(values, scales, jnp.float32), np.float64)
    return np.asarray(values), np.asarray(scales), held
