"""The FP8 decode kernels (``pallas_kernels.decode_fp8``), contiguous and paged, against NumPy float64 over the
values the cache holds (e4m3 times its scale): interpret mode on the CPU, the real Triton lowering on a GPU.

Every position past a sequence's length, every other layer and every page no sequence uses holds NaN in its
values and its scale; paged tables are permutations of the pool with stale entries past each length naming NaN
pages; outputs start NaN-poisoned (``poison.poisoned_outputs``). Lengths cover 0, 1, a block's edges and the
capacity. (Windows and soft caps: tests/kernels/test_decode_window.py; through ``jkv.attend``:
tests/attention/test_attend.py.)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import COLUMN_FORMS, KERNEL_TOL, LENGTHS, fp8_arrays, random_paged, run_jitted
from poison import poisoned_outputs
from reference import decode_attention_f64

from pallas_kernels import backend, decode_fp8, decode_q8, reference
from pallas_kernels.formats import FP8_DTYPE

ON_GPU = backend.gpu_backend() == backend.TRITON

# (id, batch, kv_heads, group, head_dim, max_len, q dtype, lengths, layers, block_k, num_splits); layers: None for
# one layer [B, K, S, D], (L, layer) for a whole cache, layer "traced" under jit.
CASES = [
    ("g4_d128_bf16_splits2", 3, 2, 4, 128, 200, "bfloat16", ("bk-1", "bk+1", "S"), None, 64, 2),
    ("g1_d64_f32_splits3", 4, 2, 1, 64, 96, "float32", ("1", "bk-1", "bk", "bk+1"), None, 16, 3),
    ("g8_d64_f32_layer1_of3_default", 2, 1, 8, 64, 64, "float32", ("S", "0"), (3, 1), None, None),
    ("g3_d128_f16_traced_layer", 2, 2, 3, 128, 150, "float16", ("S", "bk+1"), (2, "traced"), 32, None),
    ("g2_d32_f32_tiny_cache", 2, 2, 2, 32, 8, "float32", ("S", "1"), None, None, None),
    ("g2_d256_bf16_splits2", 2, 1, 2, 256, 48, "bfloat16", ("bk+1", "S"), None, 16, 2),
    # head_dims read in power-of-two column parts under the one scale a position (96 = 64 + 32, 80 = 64 + 16)
    ("g4_d96_bf16_splits2", 3, 2, 4, 96, 200, "bfloat16", ("bk-1", "bk+1", "S"), None, 64, 2),
    ("g1_d80_f32_layer1_of2", 2, 2, 1, 80, 48, "float32", ("S", "1"), (2, 1), 16, None),
]
# (id, batch, kv_heads, group, head_dim, page_size, max_pages, q dtype, lengths, layers, pages_per_block, splits,
#  preload); lengths in positions (clipped to the capacity); preload None: the default.
PAGED_CASES = [
    ("g4_d128_bf16_ps16_splits2", 3, 2, 4, 128, 16, 8, "bfloat16", (63, 65, 128), (2, 1), None, 2, None),
    ("g1_d64_f32_ps8_ppb4_traced", 2, 2, 1, 64, 8, 6, "float32", (1, 48), (2, "traced"), 4, 3, None),
    ("g8_d64_f16_ps32_one_split", 2, 1, 8, 64, 32, 3, "float16", (96, 0), None, None, 1, None),
    ("g4_d64_f32_ps16_table_in_loop", 2, 2, 4, 64, 16, 4, "float32", (64, 7), None, None, None, False),
    ("g4_d96_bf16_ps16_splits2", 3, 2, 4, 96, 16, 8, "bfloat16", (63, 65, 128), (2, 1), None, 2, None),
    ("g2_d96_f16_ps8_table_in_loop", 2, 2, 2, 96, 8, 6, "float16", (1, 48), None, 2, None, False),
]
GPU_SCALE, GPU_PAGED_SCALE = 32, 8  # the GPU class reruns the tables with caches this many times longer


attend, paged_attend = decode_fp8.fp8_decode_attention, decode_fp8.paged_fp8_decode_attention


def tolerance(dtype) -> float:
    return KERNEL_TOL[dtype.name + ("-gpu" if dtype == jnp.float32 and jax.default_backend() == "gpu" else "")]


def fp8_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, magnitude=1.0):
    """One of K or V: (values, scales) as device arrays, NaN past each length and in every other layer, and the
    float64 values the attended layer holds; standard normal values times ``magnitude``."""
    slab = rng.standard_normal((batch, kv_heads, max_len, head_dim)) * magnitude
    past = np.arange(max_len)[None, None, :, None] >= np.asarray(lengths)[:, None, None, None]
    slab = np.where(past, np.nan, slab)
    values, scales, held = fp8_arrays(slab)
    if layers is not None:
        poison = lambda x: np.full_like(x, np.nan)
        values, scales = (np.stack([x if i == 1 else poison(x) for i in range(layers[0])]) for x in (values, scales))
    return jnp.asarray(values), jnp.asarray(scales), held


def call(kernel, args, layers, options):
    """``kernel(*args)`` as one jitted program into NaN-filled outputs: one layer, a static or a traced layer."""
    with poisoned_outputs():
        if layers is None:
            return run_jitted(kernel, *args, **options)
        if layers[1] == "traced":
            return run_jitted(lambda *a: kernel(*a[:-1], layer=a[-1], **options), *args, jnp.int32(1))
        return run_jitted(kernel, *args, layer=layers[1], **options)


def check(out, q, k, v, lengths):
    """Shape, dtype, zeros for length 0 and the float64 reference over the held values ``k``, ``v``."""
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(jnp.float32), np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    want = decode_attention_f64(np.asarray(q.astype(jnp.float32), np.float64), k, v, lengths)
    assert rel_err(out, want) < tolerance(q.dtype), lengths


def run_case(rng, case, *, scale_up=1, interpret=None, magnitudes=(1.0, 1.0, 1.0)):
    """``case`` against float64; ``magnitudes`` multiply the query's, the keys' and the values' standard normals."""
    _, batch, kv_heads, group, head_dim, max_len, dtype, names, layers, block_k, num_splits = case
    max_len *= scale_up
    bk = block_k or decode_fp8.fp8_decode_config(batch, kv_heads, max_len, head_dim).block_k
    names = [names[i % len(names)] for i in range(batch)]
    lengths = np.array([min(LENGTHS[name](max_len, bk), max_len) for name in names], np.int32)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)) * magnitudes[0], dtype)
    k, k_scale, k_held = fp8_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, magnitudes[1])
    v, v_scale, v_held = fp8_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, magnitudes[2])
    options = dict(interpret=interpret, block_k=block_k, num_splits=num_splits)
    args = (q, k, k_scale, v, v_scale, jnp.asarray(lengths))
    check(call(attend, args, layers, options), q, k_held, v_held, lengths)


def fp8_paged(rng, batch, kv_heads, head_dim, page_size, max_pages, lengths, layers):
    """``kernel_inputs.random_paged``'s permuted pools (stale entries naming NaN pages) in the FP8 format: the four
    pools and the table as device arrays, and the float64 K and V values the sequences hold."""
    k, v, tables, slabs = random_paged(rng, batch, kv_heads, head_dim, page_size, max_pages, lengths, layers, True)
    (kv, ks, _), (vv, vs, _) = fp8_arrays(k), fp8_arrays(v)
    pools = tuple(jnp.asarray(x) for x in (kv, ks, vv, vs))
    return pools, jnp.asarray(tables), [fp8_arrays(s)[2] for s in slabs]


def run_kind(rng, kind, case, *, interpret):
    """``case`` of ``kind`` ("contiguous" or "paged"); with the real lowering, caches the GPU class's scale longer."""
    if kind == "contiguous":
        return run_case(rng, case, scale_up=1 if interpret else GPU_SCALE, interpret=interpret)
    return run_paged_case(rng, case, scale_up=1 if interpret else GPU_PAGED_SCALE, interpret=interpret)


def run_paged_case(rng, case, *, scale_up=1, interpret=None):
    _, batch, kv_heads, group, head_dim, ps, max_pages, dtype, lengths, layers, ppb, splits, preload = case
    max_pages *= scale_up
    lengths = np.array([min(n * scale_up, max_pages * ps) for n in lengths], np.int32)
    pools, tables, (k, v) = fp8_paged(rng, batch, kv_heads, head_dim, ps, max_pages, lengths, layers)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)), dtype)
    options = dict(interpret=interpret, pages_per_block=ppb, num_splits=splits, preload=preload)
    args = (q, *pools, tables, jnp.asarray(lengths))
    out = call(paged_attend, args, layers, options)
    check(out, q, k, v, lengths)
    if layers is None:  # the kernel's own reference, on the same pools
        own = run_jitted(reference.paged_fp8_decode_attention_reference, *args)
        assert rel_err(out.astype(jnp.float32), own.astype(jnp.float32)) < max(tolerance(q.dtype), 2e-2)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp8_decode_matches_float64_interpret(rng, case):
    run_case(rng, case, interpret=True)


@pytest.mark.parametrize("case", PAGED_CASES, ids=[c[0] for c in PAGED_CASES])
def test_paged_fp8_decode_matches_float64_interpret(rng, case):
    run_paged_case(rng, case, interpret=True)


@pytest.mark.parametrize("kind,case", [("contiguous", CASES[0]), ("contiguous", CASES[5]), ("paged", PAGED_CASES[0])],
                         ids=lambda x: x if isinstance(x, str) else x[0])  # fmt: skip
@pytest.mark.parametrize("form", ["vperm", decode_q8.LOOP_FORMS[-1]])
def test_vperm_form_interpret(rng, kind, case, form, monkeypatch):
    """The Q8 body's loop forms on FP8 values (one chunk): "vperm" (the value tile's columns reordered), all."""
    monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
    run_kind(rng, kind, case, interpret=True)


PAD_CASES = [("contiguous", c) for c in CASES if c[4] & (c[4] - 1)]
PAD_CASES += [("paged", c) for c in PAGED_CASES if c[4] & (c[4] - 1)]


@pytest.mark.parametrize("form", COLUMN_FORMS)
@pytest.mark.parametrize("kind,case", PAD_CASES, ids=lambda x: x if isinstance(x, str) else x[0])
def test_column_forms_interpret(rng, kind, case, form, monkeypatch):
    """Head_dims that are not powers of two (96, 80) read as one padded tile, the columns past the head masked, and
    in power-of-two column parts."""
    monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
    run_kind(rng, kind, case, interpret=True)


# A bf16 query multiplies e4m3 values in float16 (q8_tiles.dot_dtype_for): queries past float16's 65504 (keys as
# much smaller, so the scores stay those of the plain case), values whose scales times the probabilities would
# vanish below float16's smallest or pass its largest.
MAGNITUDES = {"query_2^17": (2.0**17, 2.0**-17, 1.0), "values_2^-30": (1.0, 1.0, 2.0**-30),
              "values_2^30": (1.0, 1.0, 2.0**30)}  # fmt: skip


@pytest.mark.parametrize("magnitudes", MAGNITUDES.values(), ids=MAGNITUDES.keys())
def test_float16_products_keep_range_interpret(rng, magnitudes):
    run_case(rng, CASES[0], interpret=True, magnitudes=magnitudes)


def test_fp8_form_adds_base2_softmax(monkeypatch):
    """FP8 calls run LOOP_FORM with the base-2 softmax added (once); Q8 calls run LOOP_FORM as it is."""
    monkeypatch.setattr(decode_q8, "LOOP_FORM", "vperm")
    assert decode_fp8.FP8.form() == "vperm+exp2" and decode_q8.Q8.form() == "vperm"
    monkeypatch.setattr(decode_q8, "LOOP_FORM", "vperm+exp2")
    assert decode_fp8.FP8.form() == "vperm+exp2"


def test_reference_matches_float64(rng):
    """The contiguous reference (``pallas_kernels.reference``) on a whole NaN-poisoned cache."""
    lengths = np.array([1, 30, 48], np.int32)
    k, k_scale, k_held = fp8_cache(rng, 3, 2, 48, 64, lengths, (2, 1))
    v, v_scale, v_held = fp8_cache(rng, 3, 2, 48, 64, lengths, (2, 1))
    q = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.float32)
    args = (q, k, k_scale, v, v_scale, jnp.asarray(lengths))
    check(run_jitted(reference.fp8_decode_attention_reference, *args, layer=1), q, k_held, v_held, lengths)


def bench_inputs(rng, batch, seq, page_size=None):
    """The benchmark's head layout (N=32, K=8, D=128, bf16 q) full but the first (``seq - 77``): the kernel's
    arguments after ``q`` (contiguous, or pools and table with ``page_size``) and the float64 K and V values."""
    lengths = np.full((batch,), seq, np.int32)
    lengths[0] = seq - 77
    if page_size is None:
        (k, ks, k_held), (v, vs, v_held) = (fp8_cache(rng, batch, 8, seq, 128, lengths, None) for _ in range(2))
        return (k, ks, v, vs, jnp.asarray(lengths)), (k_held, v_held), lengths
    pools, tables, held = fp8_paged(rng, batch, 8, 128, page_size, seq // page_size, lengths, None)
    return (*pools, tables, jnp.asarray(lengths)), held, lengths


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The same tables with the real Triton lowering and longer caches; the benchmark's shapes, default launch."""

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_fp8_decode_matches_float64(self, rng, case):
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False)

    @pytest.mark.parametrize("case", PAGED_CASES, ids=[c[0] for c in PAGED_CASES])
    def test_paged_fp8_decode_matches_float64(self, rng, case):
        run_paged_case(rng, case, scale_up=GPU_PAGED_SCALE, interpret=False)

    @pytest.mark.parametrize("magnitudes", MAGNITUDES.values(), ids=MAGNITUDES.keys())
    def test_float16_products_keep_range(self, rng, magnitudes):
        run_case(rng, CASES[0], scale_up=GPU_SCALE, interpret=False, magnitudes=magnitudes)

    @pytest.mark.parametrize("form", COLUMN_FORMS)
    @pytest.mark.parametrize("kind,case", PAD_CASES, ids=lambda x: x if isinstance(x, str) else x[0])
    def test_column_forms(self, rng, kind, case, form, monkeypatch):
        monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
        run_kind(rng, kind, case, interpret=False)

    @pytest.mark.parametrize("kind,case", [("contiguous", CASES[0]), ("paged", PAGED_CASES[0])],
                             ids=lambda x: x if isinstance(x, str) else x[0])  # fmt: skip
    @pytest.mark.parametrize("form", ["vperm", decode_q8.LOOP_FORMS[-1]])
    def test_vperm_form(self, rng, kind, case, form, monkeypatch):
        monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
        run_kind(rng, kind, case, interpret=False)

    @pytest.mark.parametrize(
        "batch,seq,page_size",
        [(1, 4096, None), (8, 4096, None), (1, 131072, None), (1, 4096, 16), (8, 4096, 64), (1, 131072, 16)],
        ids=str,
    )
    def test_bench_shapes_default_config(self, rng, batch, seq, page_size):
        args, (k, v), lengths = bench_inputs(rng, batch, seq, page_size)
        q = jnp.asarray(rng.standard_normal((batch, 32, 128)), jnp.bfloat16)
        kernel = attend if page_size is None else paged_attend
        with poisoned_outputs():
            out = kernel(q, *args, interpret=False)
        check(out, q, k, v, lengths)


def test_gpu_lowering_reads_the_whole_cache(monkeypatch):
    """With the GPU paths forced, both kernels lower for CUDA through Triton at a benchmark shape with their
    default launch (split-K, so the merge kernel too), with the whole 4-layer cache passed in: no layer slice,
    no dequantized copy in any dtype."""
    monkeypatch.setattr(backend, "gpu_backend", lambda: backend.TRITON)
    sd = jax.ShapeDtypeStruct
    num_layers, batch, kv_heads, seq, head_dim, ps = 4, 2, 8, 4096, 128, 16
    pair = lambda *dims: (sd((num_layers, *dims, head_dim), FP8_DTYPE), sd((num_layers, *dims, 1), jnp.float32))
    q, n = sd((batch, 32, head_dim), jnp.bfloat16), sd((batch,), jnp.int32)
    pages = batch * seq // ps
    contiguous, pools = pair(batch, kv_heads, seq), pair(pages, kv_heads, ps)
    tables = sd((batch, seq // ps), jnp.int32)
    cases = [
        ("jkv_fp8_decode_attention", attend, (q, *contiguous * 2, n), (batch, kv_heads, seq)),
        ("jkv_paged_fp8_attention", paged_attend, (q, *pools * 2, tables, n), (pages, kv_heads, ps)),
    ]
    for name, kernel, args, layer_dims in cases:
        fn = jax.jit(lambda *a, kernel=kernel: kernel(*a[:-1], layer=a[-1], window=1000, softcap=30.0))
        text = fn.trace(*args, sd((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text and name in text and "jkv_merge_splits" in text, name
        layer = "x".join(map(str, layer_dims))
        assert not re.search(rf"tensor<{layer}x(128|1)x", text), name


def _error_args(rng):
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    values, scales, _ = fp8_arrays(rng.standard_normal((2, 2, 32, 64)))
    return q, jnp.asarray(values), jnp.asarray(scales), jnp.array([3, 32], jnp.int32)


ERRORS = [
    ("values-dtype", lambda q, k, s, n: attend(q, k.astype(jnp.bfloat16), s, k, s, n), TypeError,
     "k values must be float8_e4m3fn"),
    ("scales-dtype", lambda q, k, s, n: attend(q, k, s, k, s.astype(jnp.float16), n), TypeError,
     "v scales must be float32"),
    ("scales-shape", lambda q, k, s, n: attend(q, k, s, k, jnp.concatenate([s, s], -1), n), ValueError,
     "do not form an FP8 pair"),
    ("kv-shape", lambda q, k, s, n: attend(q, k, s, k[:1], s[:1], n), ValueError, "same shape and scale dtype"),
    ("lengths-range", lambda q, k, s, n: attend(q, k, s, k, s, n + 30), ValueError, "must lie in [0, S=32]"),
    ("missing-layer", lambda q, k, s, n: attend(q, k[None], s[None], k[None], s[None], n), ValueError, "pass layer="),
    ("block-k", lambda q, k, s, n: attend(q, k, s, k, s, n, block_k=24), ValueError, "block_k=24 must be"),
    ("window", lambda q, k, s, n: attend(q, k, s, k, s, n, window=0), ValueError, "window=0"),
    ("reference-gqa", lambda q, k, s, n: reference.fp8_decode_attention_reference(q[:, :3], k, s, k, s, n),
     ValueError, "num_q_heads=3"),
    ("paged-values-dtype", lambda q, k, s, n: paged_attend(q, k.astype(jnp.int8), s, k, s, n[:, None] * 0, n),
     TypeError, "k_pages values must be float8_e4m3fn"),
    ("paged-table", lambda q, k, s, n: paged_attend(q, k, s, k, s, jnp.array([[0, 0], [2, 0]]), n),
     ValueError, "block_tables[1, 0]=2 must name a page"),
    ("paged-ppb", lambda q, k, s, n: paged_attend(q, k, s, k, s, n[:, None] * 0, n, pages_per_block=3),
     ValueError, "pages_per_block=3 must be a power of two"),
]  # fmt: skip


@pytest.mark.parametrize("fn, exc, text", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(rng, fn, exc, text):
    with pytest.raises(exc) as info:
        fn(*_error_args(rng))
    assert text in str(info.value)
