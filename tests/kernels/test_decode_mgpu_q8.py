"""Mosaic GPU Q8 decode-attention kernel against NumPy float64 on a Hopper GPU; launch rule, argument errors and
the CUDA lowering of every launch everywhere.

The value tests need the real GPU (Mosaic GPU has no interpret mode for this kernel) and skip elsewhere. Every
case draws fresh random codes and scales of both signs; scales past each sequence's length and in every layer but
the attended one are NaN (codes there random). The reference is float64 attention over ``code * scale``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from kernel_inputs import LENGTHS
from reference import decode_attention_f64

from pallas_kernels import backend, decode_mgpu_q8

ON_HOPPER = backend.mosaic_gpu_usable()

# (id, batch, kv_heads, group, head_dim, max_len, q dtype, scale dtype, lengths, layers, num_splits, num_stages)
# layers: None for one layer [B, K, S, D], (L, layer) for a whole cache, layer "traced" under jit. Lengths are
# named relative to S and bk, the ring block's positions (64 * 8 // (D // 32)). None: the default launch.
CASES = [
    ("g4_d128_bf16_splits3", 4, 2, 4, 128, 1000, "bfloat16", "float16", ("1", "bk-1", "bk", "bk+1"), None, 3, None),
    ("g1_d128_bf16_default", 3, 2, 1, 128, 4096, "bfloat16", "float16", ("S", "bk+1", "S-1"), None, None, None),
    ("g8_d64_f16_f32scale_one_split", 2, 1, 8, 64, 2000, "float16", "float32", ("S", "1"), None, 1, 2),
    ("g4_d64_bf16_traced_layer", 2, 2, 4, 64, 3000, "bfloat16", "float16", ("S", "2bk+1"), (2, "traced"), 4, 2),
    ("g2_d256_bf16_splits2", 2, 2, 2, 256, 600, "bfloat16", "float32", ("S-1", "bk"), None, 2, 2),
    ("g3_d128_f32q_layer1_of3", 2, 2, 3, 128, 500, "float32", "float16", ("S", "0"), (3, 1), None, None),
    ("g5_d128_f16_deep_ring", 3, 1, 5, 128, 1500, "float16", "float16", ("bk-1", "S", "2bk+1"), None, 2, 4),
    ("mha_d128_bf16_default", 2, 8, 1, 128, 700, "bfloat16", "float16", ("S", "1"), None, None, None),
    ("g8_d64_bf16_tiny_cache", 2, 1, 8, 64, 40, "bfloat16", "float16", ("S", "1"), None, None, None),
    ("g6_d256_bf16_more_splits_than_blocks", 3, 2, 6, 256, 200, "bfloat16", "float16", ("S", "1", "0"), None, 8, 2),
]  # fmt: skip
IDS = [c[0] for c in CASES]
# FP8 (float32 scales; head_dim 64 and 128: 256 is refused): ring blocks of 512 positions
FP8_CASES = [
    ("g4_d128_bf16_splits3", 3, 2, 4, 128, 2000, "bfloat16", "float32", ("1", "bk-1", "bk+1"), None, 3, None),
    ("g8_d64_f16_traced_layer", 2, 1, 8, 64, 1500, "float16", "float32", ("S", "2bk+1"), (2, "traced"), 2, 2),
    ("g1_d64_bf16_layer1_of3_default", 3, 2, 1, 64, 700, "bfloat16", "float32", ("S", "0", "bk"), (3, 1), None, None),
    ("mha_d128_f32q_tiny_cache", 2, 4, 1, 128, 40, "float32", "float32", ("S", "1"), None, None, None),
]
FP8_IDS = [c[0] for c in FP8_CASES]


def q8_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, scale_dtype):
    """One of K or V: (codes, scales) with NaN scales past each length and in every other layer, and the float64
    values ``code * scale`` of the attended layer (NaN where the scales are)."""
    shape = (batch, kv_heads, max_len, head_dim)
    codes = rng.integers(-127, 128, shape, np.int8)
    scales = np.array(jnp.asarray(rng.standard_normal((*shape[:-1], head_dim // 32)) * 0.02, scale_dtype))
    for b, n in enumerate(lengths):
        scales[b, :, n:] = np.nan
    values = codes * np.repeat(scales.astype(np.float64), 32, axis=-1)
    if layers is not None:
        num_layers, _ = layers
        other = lambda: rng.integers(-127, 128, shape, np.int8)
        codes = np.stack([codes if i == 1 else other() for i in range(num_layers)])
        scales = np.stack([scales if i == 1 else np.full_like(scales, np.nan) for i in range(num_layers)])
    return jnp.asarray(codes), jnp.asarray(scales), values


def fp8_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, scale_dtype):
    """:func:`q8_cache` in FP8: e4m3 values and a float32 scale per position, values and scales NaN past each
    length and in every other layer."""
    assert scale_dtype == "float32"
    shape = (batch, kv_heads, max_len, head_dim)
    codes = np.array(jnp.asarray(rng.standard_normal(shape) * 30, jnp.float8_e4m3fn).astype(jnp.float32))
    scales = rng.standard_normal((*shape[:-1], 1)).astype(np.float32) * 0.02
    for b, n in enumerate(lengths):
        codes[b, :, n:], scales[b, :, n:] = np.nan, np.nan
    values = codes.astype(np.float64) * scales
    if layers is not None:
        num_layers, _ = layers
        codes = np.stack([codes if i == 1 else np.full_like(codes, np.nan) for i in range(num_layers)])
        scales = np.stack([scales if i == 1 else np.full_like(scales, np.nan) for i in range(num_layers)])
    return jnp.asarray(codes, jnp.float8_e4m3fn), jnp.asarray(scales), values


def run_case(rng, case, fmt="q8"):
    _, batch, kv_heads, group, head_dim, max_len, dtype, scale_dtype, names, layers, num_splits, stages = case
    dtype = jnp.dtype(dtype)
    spec, cache, attend = {
        "q8": (decode_mgpu_q8.Q8, q8_cache, decode_mgpu_q8.q8_decode_attention_mgpu),
        "fp8": (decode_mgpu_q8.FP8, fp8_cache, decode_mgpu_q8.fp8_decode_attention_mgpu),
    }[fmt]
    bk = decode_mgpu_q8.block_positions(head_dim, spec)
    names = [names[i % len(names)] for i in range(batch)]
    lengths = np.array([min(LENGTHS[name](max_len, bk), max_len) for name in names], np.int32)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)), dtype)
    k, k_scale, k_values = cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, scale_dtype)
    v, v_scale, v_values = cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers, scale_dtype)

    options = dict(num_splits=num_splits, num_stages=stages)
    args = (q, k, k_scale, v, v_scale, jnp.asarray(lengths))
    if layers is None:
        out = attend(*args, **options)
    elif layers[1] == "traced":
        out = jax.jit(lambda *a: attend(*a[:-1], layer=a[-1], **options))(*args, jnp.int32(1))
    else:
        out = attend(*args, layer=layers[1], **options)
    assert out.shape == q.shape and out.dtype == dtype

    # the products run in q's 16-bit dtype (bfloat16 for a float32 q)
    mma = dtype if dtype != jnp.float32 else jnp.dtype(jnp.bfloat16)
    q64 = np.asarray(q.astype(mma).astype(jnp.float32), np.float64)
    ref = decode_attention_f64(q64, k_values, v_values, lengths)
    out = np.asarray(out.astype(jnp.float32), np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    assert rel_err(out, ref) < REL_TOL[mma.name], names


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
class TestOnHopper:
    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case):
        run_case(rng, case)

    @pytest.mark.parametrize("case", FP8_CASES, ids=FP8_IDS)
    def test_fp8_kernel_matches_float64(self, rng, case):
        run_case(rng, case, fmt="fp8")

    @pytest.mark.parametrize("batch,seq", [(1, 32768), (8, 4096)], ids=["B=1_T=32k", "B=8_T=4k"])
    def test_bench_shapes_default_config(self, rng, batch, seq):
        """The benchmark's head layout (N=32, K=8, D=128, bf16 q, f16 scales) with the default launch."""
        case = ("bench", batch, 8, 4, 128, seq, "bfloat16", "float16", ("S", "S-1", "bk+1"), None, None, None)
        run_case(rng, case)


@pytest.mark.parametrize(
    "fmt,batch,kv_heads,max_len,head_dim,want",
    [
        ("Q8", 1, 8, 32768, 128, (16, 2)),
        ("Q8", 8, 8, 4096, 128, (2, 2)),
        ("Q8", 64, 8, 8192, 128, (1, 2)),
        ("Q8", 1, 8, 4096, 64, (8, 2)),
        ("Q8", 2, 1, 40, 64, (1, 2)),
        ("FP8", 1, 8, 4096, 128, (8, 1)),
        ("FP8", 1, 8, 4096, 64, (8, 2)),
    ],
    ids=["B=1_T=32k", "B=8_T=4k", "B=64_T=8k", "B=1_T=4k_d64", "B=2_T=40", "fp8_B=1_T=4k", "fp8_B=1_T=4k_d64"],
)
def test_launch_rule(fmt, batch, kv_heads, max_len, head_dim, want):
    """About one program per multiprocessor of an H100 (132), equal shares of at least two of the bf16 kernel's
    64 x 128 blocks in code bytes; FP8 at head_dim 128 has room for one ring slot."""
    fmt = getattr(decode_mgpu_q8, fmt)
    config = decode_mgpu_q8.mgpu_q8_config(batch, kv_heads, max_len, head_dim, fmt, num_multiprocessors=132)
    assert config == decode_mgpu_q8.MgpuQ8Config(*want)


def _args(batch=2, kv_heads=2, group=4, head_dim=128, max_len=256, scale_dtype=jnp.float16, q_dtype=jnp.bfloat16):
    q = jnp.ones((batch, kv_heads * group, head_dim), q_dtype)
    k = jnp.ones((batch, kv_heads, max_len, head_dim), jnp.int8)
    s = jnp.ones((batch, kv_heads, max_len, head_dim // 32), scale_dtype)
    return q, k, s, k, s, jnp.full((batch,), 3, jnp.int32)


@pytest.mark.parametrize(
    "change,options,error,match",
    [
        (dict(head_dim=96), {}, ValueError, "head_dim=96 is not supported"),
        (dict(head_dim=32), {}, ValueError, "head_dim=32 is not supported by the Mosaic GPU Q8 kernel"),
        (dict(kv_heads=1, group=65), {}, ValueError, "65 query heads per kv head exceeds 64"),
        (dict(scale_dtype=jnp.bfloat16), {}, TypeError, "k scales must be float16 or float32"),
        ({}, dict(window=16), ValueError, "takes no window or softcap"),
        ({}, dict(softcap=30.0), ValueError, "takes no window or softcap"),
        ({}, dict(num_splits=0), ValueError, "num_splits=0 must be >= 1"),
        ({}, dict(num_stages=0), ValueError, "num_stages=0 must be >= 1"),
        ({}, dict(num_stages=2.0), TypeError, "num_stages must be an int"),
        ({}, dict(num_stages=9), ValueError, "num_stages=9 needs"),
    ],
    ids=["d96", "d32", "group65", "bf16-scales", "window", "softcap", "splits", "stages", "stages-type", "smem"],
)
def test_argument_errors(monkeypatch, change, options, error, match):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    with pytest.raises(error, match=match):
        decode_mgpu_q8.q8_decode_attention_mgpu(*_args(**change), **options)


def test_shared_checks_of_the_triton_q8_kernel():
    q, k, s, _, _, n = _args()
    with pytest.raises(TypeError, match="v codes must be int8"):
        decode_mgpu_q8.q8_decode_attention_mgpu(q, k, s, k.astype(jnp.int32), s, n)
    with pytest.raises(ValueError, match="pass layer="):
        decode_mgpu_q8.q8_decode_attention_mgpu(q, k[None], s[None], k[None], s[None], n)


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal where Mosaic GPU cannot run")
def test_refuses_to_run_without_mosaic_gpu():
    with pytest.raises(RuntimeError, match="the Mosaic GPU Q8 decode kernel cannot run here: "):
        decode_mgpu_q8.q8_decode_attention_mgpu(*_args())


LAUNCHES = [  # (head_dim, scale dtype, num_splits, batch, group): every interleave, both scale dtypes
    (64, "float16", 1, 2, 4),
    (64, "float32", 3, 3, 8),
    (128, "float16", 1, 8, 4),
    (128, "float32", 3, 2, 1),
    (256, "float16", 3, 2, 3),
    (256, "float32", 1, 2, 2),
]


@pytest.mark.parametrize("head_dim,scale_dtype,num_splits,batch,group", LAUNCHES, ids=str)
def test_lowers_for_cuda_without_slicing_the_layer(head_dim, scale_dtype, num_splits, batch, group):
    """The kernel lowers to a Mosaic GPU custom call on any host (no GPU needed), and the whole [L, B, K, S, D]
    cache goes to it: no layer-sized copy in the module."""
    num_layers, kv_heads, max_len = 3, 2, 512
    codes = jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, head_dim), jnp.int8)
    scales = jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, head_dim // 32), jnp.dtype(scale_dtype))
    q = jax.ShapeDtypeStruct((batch, kv_heads * group, head_dim), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    config = decode_mgpu_q8.MgpuQ8Config(num_splits=num_splits, num_stages=2)
    traced = decode_mgpu_q8._decode.trace(q, codes, scales, codes, scales, *ints, scale=0.1, config=config)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert f"tensor<{batch}x{kv_heads}x{max_len}x{head_dim}xi8>" not in text


@pytest.mark.parametrize("head_dim,num_splits", [(64, 1), (64, 3), (128, 1), (128, 2)], ids=str)
def test_fp8_lowers_for_cuda(head_dim, num_splits):
    num_layers, batch, kv_heads, max_len = 2, 2, 2, 1024
    values = jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, head_dim), jnp.float8_e4m3fn)
    scales = jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, 1), jnp.float32)
    q = jax.ShapeDtypeStruct((batch, kv_heads * 4, head_dim), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    fmt = decode_mgpu_q8.FP8
    config = decode_mgpu_q8.mgpu_q8_config(batch, kv_heads, max_len, head_dim, fmt)._replace(num_splits=num_splits)
    assert config.num_stages == (2 if head_dim == 64 else 1)  # FP8's view rows are 8 * D bytes
    traced = decode_mgpu_q8._decode.trace(
        q, values, scales, values, scales, *ints, scale=0.1, config=config, scale_cols=fmt.scale_cols
    )
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_fp8_argument_errors(monkeypatch):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    attend = decode_mgpu_q8.fp8_decode_attention_mgpu
    q, k, s, _, _, n = _args(head_dim=256)
    values, scales = k.astype(jnp.float8_e4m3fn), s[..., :1].astype(jnp.float32)
    with pytest.raises(ValueError, match="head_dim=256: the Mosaic GPU FP8 kernel's one-slot ring"):
        attend(q, values, scales, values, scales, n)
    q, k, s, _, _, n = _args(head_dim=128)
    values, scales = k.astype(jnp.float8_e4m3fn), s[..., :1].astype(jnp.float32)
    with pytest.raises(TypeError, match="v scales must be float32"):
        attend(q, values, scales, values, scales.astype(jnp.float16), n)
    with pytest.raises(ValueError, match="num_stages=2 needs"):
        attend(q, values, scales, values, scales, n, num_stages=2)
    with pytest.raises(ValueError, match="Mosaic GPU FP8 kernel takes no window"):
        attend(q, values, scales, values, scales, n, window=8)
