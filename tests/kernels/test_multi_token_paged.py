"""The multi-token kernel over paged caches and over Q8 / FP8 caches (contiguous and paged) against NumPy float64,
in interpret mode on CPU (the real Triton lowering on a GPU).

Quantized caches are compared with the float64 attention over the values they store (dequantized), so the
tolerance is the kernel's own. NaN sits wherever no query reads: positions before a sequence's first window
start and past its last query, other layers, pages nobody owns (stale table entries name them); Q8 pages carry
it in their scales, FP8 pages in values and scales. Tables are permuted; windows start inside pages; tiles
straddle pages.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import KERNEL_TOL, fast_jit, run_jitted
from multi_token_inputs import make_step, page_table, paginate, poisoned, random_counts, whole_cache
from reference import multi_token_attention_f64

from pallas_kernels import backend, formats, multi_token_paged, multi_token_quant, reference
from pallas_kernels.multi_token import multi_token_attention
from pallas_kernels.multi_token_args import MultiTokenConfig, multi_token_config

ON_GPU = backend.gpu_backend() == backend.TRITON

KERNELS = {  # (format, paged): (kernel, reference)
    ("plain", False): (multi_token_attention, reference.multi_token_attention_reference),
    ("plain", True): (multi_token_paged.paged_multi_token_attention, reference.paged_multi_token_attention_reference),
    ("q8", False): (multi_token_quant.q8_multi_token_attention, reference.q8_multi_token_attention_reference),
    ("q8", True): (
        multi_token_quant.paged_q8_multi_token_attention,
        reference.paged_q8_multi_token_attention_reference,
    ),
    ("fp8", False): (multi_token_quant.fp8_multi_token_attention, reference.fp8_multi_token_attention_reference),
    ("fp8", True): (
        multi_token_quant.paged_fp8_multi_token_attention,
        reference.paged_fp8_multi_token_attention_reference,
    ),
}

# (id, page_size (None: contiguous), format, scale dtype, kv_heads, group, head_dim, S, q dtype (the values' for
#  Plain), counts, lengths, window, softcap, layers, (block_q, block_k))
CASES = [
    ("page64_one_page_bf16_softcap_layer", 64, "plain", None, 1, 3, 128, 128, "bfloat16", (9, 1), (62, 127), None,
     30.0, (2, 1), (4, 32)),
    ("q8_f16_scales_f32_window", None, "q8", "float16", 2, 3, 64, 64, "float32", (7, 1, 0), (0, 40, 10), 9, None,
     None, (3, 16)),
    ("paged_q8_f32_scales_bf16_traced", 16, "q8", "float32", 1, 8, 64, 80, "bfloat16", (12, 2), (30, 60), None,
     None, (2, "traced"), None),
    ("fp8_f32_softcap_layer", None, "fp8", "float32", 2, 2, 128, 48, "float32", (5, 16), (43, 0), None, 20.0,
     (2, 1), (8, 16)),
    ("paged_fp8_page32_one_page_bf16_window", 32, "fp8", "float32", 1, 4, 64, 96, "bfloat16", (3, 20), (70, 10),
     16, None, None, (4, 32)),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def stored(rng, fmt, shape, step, scale_dtype, rounded):
    """The arrays a cache of ``fmt`` stores for random values (float64, NaN where no query reads) and the values
    they hold (dequantized, float64)."""
    x = rng.standard_normal(shape)
    if fmt == "plain":
        values = poisoned(rounded(x), step)
        return [values], values
    if fmt == "q8":
        codes, scales, _ = formats.quantize_q8(jnp.asarray(x, jnp.float32), scale_dtype)
        codes, scales = np.asarray(codes, np.float64), np.asarray(scales.astype(jnp.float32), np.float64)
        values = (codes.reshape(*shape[:-1], -1, formats.Q8_BLOCK) * scales[..., None]).reshape(shape)
        return [codes, poisoned(scales, step)], poisoned(values, step)
    values, scales = formats.quantize_fp8(jnp.asarray(x, jnp.float32))
    values, scales = np.asarray(values.astype(jnp.float32), np.float64), np.asarray(scales, np.float64)
    return [poisoned(values, step), poisoned(scales, step)], poisoned(values * scales, step)


def as_stored_dtypes(fmt, arrays, dtype, scale_dtype):
    if fmt == "plain":
        return [jnp.asarray(arrays[0], dtype)]
    if fmt == "q8":  # codes: 0 where the pools' filler is NaN (the scales there are NaN)
        return [jnp.asarray(np.nan_to_num(arrays[0]), jnp.int8), jnp.asarray(arrays[1], scale_dtype)]
    return [jnp.asarray(arrays[0], jnp.float32).astype(formats.FP8_DTYPE), jnp.asarray(arrays[1], jnp.float32)]


def run_case(rng, case, *, interpret, with_reference=False):
    _, page_size, fmt, scale_dtype, kv_heads, group, head_dim, max_len, dtype = case[:9]
    counts, lengths, window, softcap, layers, launch = case[9:]
    dtype = jnp.dtype(dtype)
    step = make_step(rng, counts, lengths, window)
    rounded = lambda x: np.asarray(jnp.asarray(x, dtype)).astype(np.float64)
    q = rounded(rng.standard_normal((step.tokens, kv_heads * group, head_dim)))
    shape = (len(counts), kv_heads, max_len, head_dim)
    (k_arrays, k_values), (v_arrays, v_values) = (stored(rng, fmt, shape, step, scale_dtype, rounded) for _ in "kv")
    ref = multi_token_attention_f64(q, k_values, v_values, *step[1:4], window=window, softcap=softcap)
    arrays = [*k_arrays, *v_arrays]
    tables = []
    if page_size is not None:
        tables, owned, num_pages = page_table(rng, step, page_size, max_len // page_size)
        arrays = [paginate(x, tables, owned, num_pages, page_size) for x in arrays]
        tables = [jnp.asarray(tables)]
    where = None if layers is None else (layers[0], 1 if layers[1] == "traced" else layers[1])
    arrays = [whole_cache(x, where) for x in arrays]
    half = len(arrays) // 2
    arrays = as_stored_dtypes(fmt, arrays[:half], dtype, scale_dtype) + as_stored_dtypes(
        fmt, arrays[half:], dtype, scale_dtype
    )
    args = [jnp.asarray(q, dtype), *arrays, *tables, *(jnp.asarray(x) for x in step[1:4])]
    kernel, kernel_reference = KERNELS[fmt, page_size is not None]
    config = launch if launch is None or isinstance(launch, MultiTokenConfig) else MultiTokenConfig(*launch, 4, 1)
    options = dict(window=window, softcap=softcap, config=config)
    if layers is not None and layers[1] == "traced":
        out = run_jitted(lambda *a: kernel(*a[:-1], layer=a[-1], **options), *args, jnp.int32(1))
    else:
        layer = None if layers is None else layers[1]
        out = run_jitted(kernel, *args, layer=layer, **options, interpret=interpret)
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out).astype(np.float64)
    np.testing.assert_array_equal(out[~step.owned_rows()], 0.0)
    tol = KERNEL_TOL["float32-gpu" if dtype == jnp.float32 and ON_GPU else dtype.name]
    assert rel_err(out, ref) < tol, case[0]
    if with_reference:
        layer = None if where is None else where[1]
        out = run_jitted(kernel_reference, *args, layer=layer, window=window, softcap=softcap)
        assert rel_err(out.astype(jnp.float32), ref) < KERNEL_TOL[dtype.name], case[0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_float64_interpret(rng, case):
    run_case(rng, case, interpret=True, with_reference=True)


def test_random_paged_steps_one_launch(rng):
    """Fifteen random steps through one compiled paged launch: fresh permuted tables with stale entries, pages of
    8 positions under 16-key blocks (a row gather), tiles straddling pages, a window that starts inside pages."""
    tokens, batch, kv_heads, group, head_dim, page_size, max_pages, window = 24, 3, 2, 4, 64, 8, 8, 13
    config = MultiTokenConfig(2, 16, 4, 1)
    num_pages = batch * max_pages + 3  # a fixed pool shape: the launch compiles once
    kernel = multi_token_paged.paged_multi_token_attention
    launch = fast_jit(lambda *a: kernel(*a, window=window, config=config, interpret=True))
    for _ in range(15):
        step = make_step(rng, *random_counts(rng, batch, tokens, 8, page_size * max_pages), window, tokens)
        q = rng.standard_normal((tokens, kv_heads * group, head_dim))
        k, v = (poisoned(rng.standard_normal((batch, kv_heads, page_size * max_pages, head_dim)), step) for _ in "kv")
        ref = multi_token_attention_f64(q, k, v, *step[1:4], window=window)
        tables, owned, _ = page_table(rng, step, page_size, max_pages, num_pages=num_pages)
        pools = [jnp.asarray(paginate(x, tables, owned, num_pages, page_size), jnp.float32) for x in (k, v)]
        ints = lambda x: jnp.asarray(x, jnp.int32)
        out = launch(jnp.asarray(q, jnp.float32), *pools, ints(tables), *(ints(x) for x in step[1:4]))
        np.testing.assert_array_equal(np.asarray(out)[~step.owned_rows()], 0.0)
        assert rel_err(out, ref) < KERNEL_TOL["float32"], step


def test_table_entry_without_page_is_refused():
    """A concrete table entry a query reads must name a page (entries no query reads are -1 or stale in the
    table above)."""
    pool = jnp.zeros((4, 1, 16, 64), jnp.float32)
    q = jnp.zeros((4, 2, 64), jnp.float32)
    ints = lambda x: jnp.asarray(x, jnp.int32)
    args = (q, pool, pool, ints([[-1, 0, 1]]), ints([0]), ints([30]), ints([4]))
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\]=-1"):
        multi_token_paged.paged_multi_token_attention(*args, interpret=True)
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\]=-1"):
        reference.paged_multi_token_attention_reference(*args)
    reference.paged_multi_token_attention_reference(*args, window=8)  # reads 23..33 only: accepted


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_float64_gpu(rng, case):
    run_case(rng, case, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
def test_verification_t5_paged_gpu(rng):
    """Speculative verification at a realistic shape: 8 sequences x 5 queries after 2048 positions, pages of 16,
    32/8/128 bf16, the launch rule told the most queries a sequence brings."""
    config = multi_token_config(32, 8, 128, jnp.bfloat16, max_count=5)
    case = ("verify", 16, "plain", None, 8, 4, 128, 2064, "bfloat16", (5,) * 8, (2048,) * 8, None, None, None, config)
    run_case(rng, case, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
def test_prefill_chunk_paged_gpu(rng):
    """A 512-token chunk after 7680 cached positions through a permuted table of 16-position pages (bf16,
    32/8/128); a spread of its rows against float64."""
    cached, chunk, page_size, kv_heads, group, head_dim = 7680, 512, 16, 8, 4, 128
    step = make_step(rng, [chunk], [cached])
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float64)
    q = bf(rng.standard_normal((step.tokens, kv_heads * group, head_dim)))
    k, v = (poisoned(bf(rng.standard_normal((1, kv_heads, cached + chunk, head_dim))), step) for _ in "kv")
    tables, owned, num_pages = page_table(rng, step, page_size, (cached + chunk) // page_size)
    pools = [jnp.asarray(paginate(x, tables, owned, num_pages, page_size), jnp.bfloat16) for x in (k, v)]
    ints = lambda x: jnp.asarray(x, jnp.int32)
    out = multi_token_paged.paged_multi_token_attention(
        jnp.asarray(q, jnp.bfloat16), *pools, ints(tables), *(ints(x) for x in step[1:4]), interpret=False
    )
    out = np.asarray(out).astype(np.float64)
    start = int(step.q_starts[0])
    picks = np.arange(0, chunk, 37)
    one = lambda i: multi_token_attention_f64(q[start + i : start + i + 1], k, v, [0], [cached + i], [1])[0]
    assert rel_err(out[start + picks], np.stack([one(i) for i in picks])) < KERNEL_TOL["bfloat16"]
