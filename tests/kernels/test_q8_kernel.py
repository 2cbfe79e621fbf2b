"""Pallas Q8 kernels against NumPy float64: interpret mode on CPU, the real lowering on a GPU.

Fused Q8 decode attention must equal "dequantize, then attend" (float64 over the dequantized values) to the
rounding of its products, and stay within the Q8 format's measured error of attention over the unquantized
values. Scales past each sequence's length (and in every layer but the attended one) are NaN, and outputs start
NaN-poisoned (``poison.poisoned_outputs``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import (
    COLUMN_FORMS,
    KERNEL_TOL,
    LENGTHS,
    Q8_ATTENTION_REL_TOL,
    Q8_GPU_FORMS,
    Q8_OTHER_FORMS,
    kernel_query,
    run_jitted,
)
from poison import poisoned_outputs
from reference import decode_attention_f64

import jkv
from jkv.caches.formats import quantize
from pallas_kernels import backend, decode_fp8, decode_q8, dequantize, paged_q8, q8_tiles, reference

ON_GPU = backend.gpu_backend() == backend.TRITON

# (id, batch, kv_heads, group, head_dim, max_len, q dtype, scale dtype, lengths, layers, block_k, num_splits)
# layers: None for one layer [B, K, S, D], (L, layer) for a whole cache, layer "traced" under jit.
CASES = [
    ("g4_d128_bf16_splits2", 3, 2, 4, 128, 200, "bfloat16", "float16", ("bk-1", "bk+1", "S"), None, 64, 2),
    ("g1_d64_f32_f32scale_splits3", 4, 2, 1, 64, 96, "float32", "float32", ("1", "bk-1", "bk", "bk+1"), None, 16, 3),
    ("g8_d64_f32_layer1_of3", 2, 1, 8, 64, 64, "float32", "float16", ("S", "0"), (3, 1), None, None),
    ("g3_d128_f32_traced_layer", 2, 2, 3, 128, 150, "float32", "float16", ("S", "bk+1"), (2, "traced"), 32, None),
    ("g2_d32_f16_tiny_cache", 2, 2, 2, 32, 8, "float16", "float16", ("S", "1"), None, None, None),
    ("g4_d128_bf16_tiny_blocks", 2, 1, 4, 128, 40, "bfloat16", "float16", ("bk+1", "0"), None, 16, 2),
    ("g3_d128_bf16_splits2", 3, 2, 3, 128, 72, "bfloat16", "float16", ("bk-1", "bk+1", "S"), None, 16, 2),
    ("g4_d64_f32_layer1_of2", 2, 2, 4, 64, 48, "float32", "float16", ("S", "bk+1"), (2, 1), 16, None),
    # head_dims read in power-of-two column parts (96 = 64 + 32, 160 = 128 + 32, 224 = 128 + 64 + 32)
    ("g4_d96_bf16_splits2", 3, 2, 4, 96, 200, "bfloat16", "float16", ("bk-1", "bk+1", "S"), None, 64, 2),
    ("g1_d96_f32_f32scale_layer1_of2", 2, 2, 1, 96, 48, "float32", "float32", ("S", "1"), (2, 1), 16, None),
    ("g2_d160_f16_traced_layer", 2, 1, 2, 160, 40, "float16", "float16", ("S", "bk+1"), (2, "traced"), 16, None),
    ("g8_d224_bf16", 2, 1, 8, 224, 40, "bfloat16", "float16", ("bk+1", "0"), None, 16, 2),
]
IDS = [c[0] for c in CASES]
GPU_SCALE = 32  # the GPU class reruns the table with caches this many times longer


def q8_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, scale_dtype):
    """One of K or V: (codes, scales) with NaN scales past each length and in every other layer, and the
    float64 slab it was quantized from."""
    slab = rng.standard_normal((batch, kv_heads, max_len, head_dim))
    codes, scales = (np.array(x) for x in quantize(jnp.asarray(slab, jnp.float32), scale_dtype=scale_dtype))
    for b, n in enumerate(lengths):
        scales[b, :, n:] = np.nan
    if layers is not None:
        num_layers, _ = layers
        codes = np.stack(
            [codes if i == 1 else rng.integers(-127, 128, codes.shape, np.int8) for i in range(num_layers)]
        )
        scales = np.stack([scales if i == 1 else np.full_like(scales, np.nan) for i in range(num_layers)])
    return jnp.asarray(codes), jnp.asarray(scales), slab


def run_case(rng, case, *, scale_up=1, interpret=None, **launch):
    _, batch, kv_heads, group, head_dim, max_len, dtype, scale_dtype, names, layers, block_k, num_splits = case
    max_len *= scale_up
    dtype = jnp.dtype(dtype)
    bk = block_k or decode_q8.q8_decode_config(batch, kv_heads, max_len, head_dim).block_k
    names = [names[i % len(names)] for i in range(batch)]
    lengths = np.array([min(LENGTHS[name](max_len, bk), max_len) for name in names], np.int32)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)), dtype)
    k, k_scale, k_slab = q8_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, scale_dtype)
    v, v_scale, v_slab = q8_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, scale_dtype)

    options = dict(interpret=interpret, block_k=block_k, num_splits=num_splits, **launch)
    args = (q, k, k_scale, v, v_scale, jnp.asarray(lengths))
    kernel = decode_q8.q8_decode_attention
    with poisoned_outputs():
        if layers is None:
            out = run_jitted(kernel, *args, **options)
        elif layers[1] == "traced":
            out = run_jitted(lambda *a: kernel(*a[:-1], layer=a[-1], **options), *args, jnp.int32(1))
        else:
            out = run_jitted(kernel, *args, layer=layers[1], **options)
    assert out.shape == q.shape and out.dtype == dtype

    one = (lambda x: x[1]) if layers else (lambda x: x)
    deq = lambda c, s: np.asarray(jkv.dequantize(one(c), one(s)), np.float64)  # NaN past each length
    q64 = np.asarray(q.astype(jnp.float32), np.float64)
    ref_q8 = decode_attention_f64(kernel_query(q), deq(k, k_scale), deq(v, v_scale), lengths)
    out = np.asarray(out).astype(np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    tol = KERNEL_TOL[dtype.name + ("-gpu" if dtype == jnp.float32 and jax.default_backend() == "gpu" else "")]
    assert rel_err(out, ref_q8) < tol, names
    # Against the values before quantization: the format's error, not the kernel's.
    assert rel_err(out, decode_attention_f64(q64, k_slab, v_slab, lengths)) < Q8_ATTENTION_REL_TOL, names


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_q8_attention_matches_dequantize_then_attend_interpret(rng, case):
    run_case(rng, case, interpret=True)


# The loop forms (decode_q8.LOOP_FORMS) on cases of one, two, four and eight scale chunks per head, and of 96.
FORM_CASES = [
    CASES[0],
    CASES[1],
    CASES[4],
    CASES[6],
    ("g2_d256_bf16_splits2", 2, 1, 2, 256, 48, "bfloat16", "float16", ("1", "bk+1"), None, 16, 2),
    CASES[8],  # head_dim 96: parts of two chunks and one
]


@pytest.mark.parametrize("form", Q8_OTHER_FORMS)
@pytest.mark.parametrize("case", FORM_CASES, ids=[c[0] for c in FORM_CASES])
def test_loop_forms_interpret(rng, case, form, monkeypatch):
    monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
    run_case(rng, case, interpret=True)


@pytest.mark.parametrize(
    "form,message", [("vperm+pad+parts", "exclude each other"), ("vperm+bogus", "unknown parts")], ids=str
)
def test_bad_loop_form_is_named(rng, form, message, monkeypatch):
    monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
    with pytest.raises(ValueError, match=message):
        run_case(rng, CASES[8], interpret=True)


@pytest.mark.parametrize("head_dim,default", [(96, "pad"), (160, "parts"), (224, "parts")])
def test_default_column_form(head_dim, default):
    """A Q8 head_dim that is not a power of two lowers (for CUDA) to the padded tile's module up to
    ``PAD_MAX_COLUMNS`` columns and to the parts' past it, and the two forms differ."""
    sd = jax.ShapeDtypeStruct
    b, kh, s = 2, 2, 256
    codes, scales = sd((1, b, kh, s, head_dim), jnp.int8), sd((1, b, kh, s, head_dim // 32), jnp.float16)
    args = (sd((b, 8, head_dim), jnp.bfloat16), codes, scales, codes, scales, sd((b,), jnp.int32), sd((1,), jnp.int32))
    config = decode_q8.q8_decode_config(b, kh, s, head_dim)

    def lowered(form):
        traced = decode_q8._decode.trace(*args, scale=0.1, config=config, interpret=False, form=form)
        return traced.lower(lowering_platforms=("cuda",)).as_text()

    texts = {form: lowered(f"vperm+{form}") for form in ("pad", "parts")}
    assert texts["pad"] != texts["parts"]
    assert lowered("vperm") == texts[default]


@pytest.mark.parametrize("lanes,d", [(32, 128), (16, 128), (8, 64), (64, 64)])
def test_permute_columns(lanes, d):
    """Column ``t * lanes + c`` takes column ``c * T + t``; the inverse undoes it."""
    x = np.arange(3 * d).reshape(3, d)
    y = np.asarray(q8_tiles.permute_columns(jnp.asarray(x), lanes))
    t = max(d // lanes, 1)
    want = [c * t + i for i in range(t) for c in range(min(lanes, d))]
    np.testing.assert_array_equal(y, x[:, want])
    np.testing.assert_array_equal(np.asarray(q8_tiles.permute_columns(jnp.asarray(y), lanes, inverse=True)), x)


DEQUANT_CASES = [  # (id, shape, scale dtype, out dtype, block_rows)
    ("cache_layer_f16scale_to_bf16_tail_window", (3, 2, 37, 128), "float16", "bfloat16", 16),
    ("rows_f32scale_to_f32_default", (40, 64), "float32", "float32", None),
    ("one_row_to_f16", (1, 32), "float16", "float16", None),
]


def run_dequant(rng, case, interpret):
    _, shape, scale_dtype, dtype, block_rows = case
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, (*shape[:-1], 1))
    codes, scales = quantize(jnp.asarray(x, jnp.float32), scale_dtype=scale_dtype)
    with poisoned_outputs():
        out = run_jitted(
            dequantize.dequantize_q8, codes, scales, dtype=dtype, interpret=interpret, block_rows=block_rows
        )
    assert out.shape == shape and out.dtype == jnp.dtype(dtype)
    # Bit-equal to float32 codes * scales rounded once to the output dtype (jkv.dequantize is the reference).
    want = jkv.dequantize(codes, scales).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    ref = reference.dequantize_q8_reference(codes, scales, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(ref.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.mark.parametrize("case", DEQUANT_CASES, ids=[c[0] for c in DEQUANT_CASES])
def test_dequantize_kernel_interpret(rng, case):
    run_dequant(rng, case, interpret=True)


# The splits merged by the last to finish (fused_merge): three splits of G = 1, two of G = 3 (not a power of two)
FUSED_CASES = [c for c in CASES if c[0] in ("g1_d64_f32_f32scale_splits3", "g3_d128_bf16_splits2")]


@pytest.mark.parametrize("case", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
def test_fused_merge_interpret(rng, case):
    run_case(rng, case, interpret=True, fused_merge=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The same tables with the real Triton lowering, caches ``GPU_SCALE`` times longer."""

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_q8_attention_matches_dequantize_then_attend(self, rng, case):
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False)

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_fused_merge(self, rng, case):
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False, fused_merge=True)

    @pytest.mark.parametrize("form", Q8_GPU_FORMS)
    @pytest.mark.parametrize("case", FORM_CASES, ids=[c[0] for c in FORM_CASES])
    def test_loop_forms(self, rng, case, form, monkeypatch):
        monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False)

    @pytest.mark.parametrize("form", COLUMN_FORMS)
    @pytest.mark.parametrize("case", [c for c in CASES if c[4] & (c[4] - 1)], ids=lambda c: c[0])
    def test_column_forms(self, rng, case, form, monkeypatch):
        """Head_dims that are not powers of two read as one padded, column-masked tile, and in parts."""
        monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False)

    @pytest.mark.parametrize("form", ["vperm", "vperm+srot+dsum", "vperm+iq8"])
    @pytest.mark.parametrize("block_k,num_warps", [(64, 4), (64, 2), (32, 1), (128, 4), (128, 8)], ids=str)
    def test_loop_forms_bench_shape(self, rng, form, block_k, num_warps, monkeypatch):
        """Each form at the benchmark's head layout under the launches the bench times (the "vperm" column
        order follows the warps)."""
        monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
        lengths = np.array([4096, 4096 - 77, 1, block_k], np.int32)
        q = jnp.asarray(rng.standard_normal((4, 32, 128)), jnp.bfloat16)
        k, k_scale, _ = q8_cache(rng, 4, 8, 4096, 128, lengths, None, "float16")
        v, v_scale, _ = q8_cache(rng, 4, 8, 4096, 128, lengths, None, "float16")
        args = (q, k, k_scale, v, v_scale, jnp.asarray(lengths))
        with poisoned_outputs():
            out = decode_q8.q8_decode_attention(*args, interpret=False, block_k=block_k, num_warps=num_warps)
        ref = reference.q8_decode_attention_reference(jnp.asarray(kernel_query(q), jnp.float32), *args[1:])
        assert rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) < KERNEL_TOL["bfloat16"]

    @pytest.mark.parametrize("case", DEQUANT_CASES, ids=[c[0] for c in DEQUANT_CASES])
    def test_dequantize_kernel(self, rng, case):
        run_dequant(rng, case, interpret=False)

    @pytest.mark.parametrize(
        "batch,seq,heads",
        [(1, 4096, (32, 8, 128)), (8, 4096, (32, 8, 128)), (32, 2048, (9, 3, 64)), (1, 4096, (9, 3, 64))],
        ids=["B=1_T=4096", "B=8_T=4096", "B=32_T=2048_smollm2", "B=1_T=4096_smollm2"],
    )
    def test_bench_shapes_default_config(self, rng, batch, seq, heads):
        """The benchmark's head layouts (N/K/D 32/8/128, and SmolLM2's 9/3/64: 2-warp programs of 128-key blocks;
        bf16 q, f16 scales) with default launch parameters."""
        n, kh, d = heads
        lengths = np.full((batch,), seq, np.int32)
        lengths[0] = seq - 77
        q = jnp.asarray(rng.standard_normal((batch, n, d)), jnp.bfloat16)
        k, k_scale, _ = q8_cache(rng, batch, kh, seq, d, lengths, None, "float16")
        v, v_scale, _ = q8_cache(rng, batch, kh, seq, d, lengths, None, "float16")
        args = (q, k, k_scale, v, v_scale, jnp.asarray(lengths))
        with poisoned_outputs():
            out = decode_q8.q8_decode_attention(*args, interpret=False)
        ref = reference.q8_decode_attention_reference(*args)
        assert rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) < KERNEL_TOL["bfloat16"]


@pytest.mark.parametrize(
    "batch,kv_heads,max_len,head_dim,want",
    [
        (32, 3, 2048, 64, (128, 5, 2)),  # SmolLM2's heads: 96 programs, four 2-warp programs a multiprocessor
        (8, 3, 16384, 64, (128, 22, 2)),
        (128, 3, 2048, 64, (128, 2, 2)),  # as many programs as multiprocessors or more: the bf16 kernel's rule
        (2, 3, 100, 64, (64, 1, 2)),  # a short cache: its largest power of two, one split
        (32, 8, 2048, 128, (64, 3, 4)),  # head_dim 128: the rule as before
        (8, 8, 16384, 128, (64, 4, 4)),
    ],
    ids=str,
)
def test_launch_rule(monkeypatch, batch, kv_heads, max_len, head_dim, want):
    """Heads of at most SMALL_HEAD_DIM columns take 128-key blocks in 2-warp programs, with as many warps a
    multiprocessor as two 4-warp programs where fewer (b, kv head) programs than multiprocessors run (132 here)."""
    monkeypatch.setattr(backend, "num_multiprocessors", lambda: 132)
    config = decode_q8.q8_decode_config(batch, kv_heads, max_len, head_dim)
    assert (config.block_k, config.num_splits, config.num_warps) == want
    paged = paged_q8.paged_q8_config(batch, kv_heads, max_len // 4, 4, head_dim)  # the same block in whole pages
    assert (paged.pages_per_block * 4, paged.num_splits, paged.num_warps) == want


def test_fp8_keeps_four_warps_at_small_heads(monkeypatch):
    """The FP8 kernels take the Q8 rule without its small-head launch (2 warps made FP8 at 9/3/64 slower)."""
    monkeypatch.setattr(backend, "num_multiprocessors", lambda: 132)
    config = decode_fp8.fp8_decode_config(32, 3, 2048, 64)
    assert (config.block_k, config.num_splits, config.num_warps) == (256, 2, 4)


def test_no_dequantized_cache_in_the_program():
    """On the GPU lowering the whole Q8 cache goes to the kernel as int8: no layer slice, no float copy."""
    num_layers, batch, kv_heads, max_len, head_dim = 4, 2, 2, 256, 64
    k = jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, head_dim), jnp.int8)
    s = jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, head_dim // 32), jnp.float16)
    q = jax.ShapeDtypeStruct((batch, 8, head_dim), jnp.bfloat16)
    config = decode_q8.q8_decode_config(batch, kv_heads, max_len, head_dim)
    args = (q, k, s, k, s, jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    traced = decode_q8._decode.trace(*args, scale=0.125, config=config, interpret=False)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    layer = f"{batch}x{kv_heads}x{max_len}x{head_dim}"
    for dtype in ("i8", "bf16", "f16", "f32"):
        assert f"tensor<{layer}x{dtype}>" not in text, dtype


def test_jkv_dispatch_uses_the_kernel(rng):
    """jkv.attend(impl="pallas") at T = 1 on a Q8 cache agrees with impl="xla" (kernel in interpret mode)."""
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, max_len=80, dtype=jnp.float32)
    new = lambda t: jnp.asarray(rng.standard_normal((2, 2, t, 64)), jnp.float32)

    def both(q, k, v, k_new, v_new):  # one program: eager cache operations would compile one by one
        cache = jkv.KVCache.init(spec, 2, format=jkv.Q8()).begin(37).write(1, k, v).commit()
        cache = cache.begin(1).write(1, k_new, v_new)
        return jkv.attend(q, cache, 1, impl="pallas"), jkv.attend(q, cache, 1, impl="xla")

    q = jnp.asarray(rng.standard_normal((2, 1, 8, 64)), jnp.float32)
    out, ref = run_jitted(both, q, new(37), new(37), new(1), new(1))
    assert rel_err(out, ref) < KERNEL_TOL["float32-gpu" if ON_GPU else "float32"]


attend, attend_ref = decode_q8.q8_decode_attention, reference.q8_decode_attention_reference
deq, deq_ref = dequantize.dequantize_q8, reference.dequantize_q8_reference


def _error_args(rng):
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    k, s = quantize(jnp.asarray(rng.standard_normal((2, 2, 32, 64)), jnp.float32))
    return q, k, s, jnp.array([3, 32], jnp.int32)


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda q, k, s, n: attend(q, k.astype(jnp.int32), s, k, s, n), TypeError, "k codes must be int8"),
        (lambda q, k, s, n: attend(q, k, s, k, s.astype(jnp.bfloat16), n), TypeError, "v scales must be"),
        (
            lambda q, k, s, n: attend(q, k, s[..., :1], k, s, n),
            ValueError,
            "k: codes.shape=(2, 2, 32, 64)",
        ),
        (lambda q, k, s, n: attend(q, k, s, k[:1], s[:1], n), ValueError, "same shape and scale dtype"),
        (
            lambda q, k, s, n: attend(q, k, s, k, s.astype(jnp.float32), n),
            ValueError,
            "same shape and scale dtype",
        ),
        (lambda q, k, s, n: attend(q[:, :3], k, s, k, s, n), ValueError, "num_q_heads=3"),
        (lambda q, k, s, n: attend(q, k, s, k, s, n + 30), ValueError, "must lie in [0, S=32]"),
        (lambda q, k, s, n: attend(q, k[None], s[None], k[None], s[None], n), ValueError, "pass layer="),
        (lambda q, k, s, n: attend(q, k, s, k, s, n, block_k=24), ValueError, "block_k=24 must be"),
        (lambda q, k, s, n: attend(q, k, s, k, s, n, block_k=16.0), TypeError, "block_k must be an int"),
        (lambda q, k, s, n: attend(q, k, s, k, s, n, num_splits=0), ValueError, "num_splits=0"),
        (lambda q, k, s, n: attend(q, k, s, k, s, n, num_warps=3), ValueError, "num_warps=3"),
        (lambda q, k, s, n: attend(q, k, s, k, s, n, num_stages=0), ValueError, "num_stages=0"),
        (lambda q, k, s, n: attend(q, k, s, k, s, n, scale="x"), TypeError, "scale must be"),
        (lambda q, k, s, n: attend_ref(q[0], k, s, k, s, n), ValueError, "q must have shape"),
        (lambda q, k, s, n: deq(k, s, dtype=jnp.int8), TypeError, "dtype must be one of"),
        (lambda q, k, s, n: deq(k, s, dtype="nope"), TypeError, "got 'nope'"),
        (lambda q, k, s, n: deq(k, s, block_rows=24), ValueError, "block_rows=24 must be a power of two"),
        (lambda q, k, s, n: deq(k, s, block_rows=256), ValueError, "number of rows (128)"),
        (lambda q, k, s, n: deq_ref(k[..., :48], s, dtype=jnp.float32), ValueError, "Q8 pair"),
    ],
    ids=[
        "codes-dtype",
        "scales-dtype",
        "scales-shape",
        "kv-shape",
        "kv-scale-dtype",
        "gqa",
        "lengths-range",
        "missing-layer",
        "block-k",
        "block-k-type",
        "splits",
        "warps",
        "stages",
        "scale",
        "reference-q-rank",
        "dequant-out-dtype",
        "dequant-out-dtype-name",
        "dequant-block-rows-pow2",
        "dequant-block-rows-too-many",
        "dequant-reference-shape",
    ],
)
def test_errors(rng, call, exc, text):
    with pytest.raises(exc) as info:
        call(*_error_args(rng))
    assert text in str(info.value)
