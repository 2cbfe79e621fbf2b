"""Block-quantized matmul (``pallas_kernels.quantized_matmul``, its reference in ``block_formats``) against NumPy
float64 of the dequantized matrix: interpret mode on CPU; the Triton lowering of every path everywhere; argument
errors.

Every case draws fresh planes (scales and mins of both signs, every code value), an odd ``N`` and ``K`` an odd
multiple of the format's block, at ``M`` = 1 and 3 (the default: one zero-padded 16-row dot tile) and 64; the
other formulations (the register paths units and fma, dot_expand, grouped) on a few cases each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from kernel_inputs import fast_jit
from qweight_inputs import dequantize_f64, planes_like, random_planes

from pallas_kernels import backend, block_formats, qmatmul_grouped
from pallas_kernels import quantized_matmul as qmatmul
from pallas_kernels.quantized_matmul import QMatmulConfig

FORMATS = tuple(block_formats.FORMATS)
N = 37


def run(rng, fmt, m, n=N, blocks=3, dtype=jnp.float32, config=None, fn=None):
    k = block_formats.FORMATS[fmt].block * blocks
    planes = random_planes(rng, fmt, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    ref = np.asarray(x, np.float64) @ dequantize_f64(planes, fmt).T
    fn = fn or (lambda x, p: qmatmul.qmatmul(x, p, fmt, config=config, interpret=True))
    out = fast_jit(fn)(x, tuple(jnp.asarray(p) for p in planes))  # one program, not the eager calls around it
    assert out.shape == (m, n) and out.dtype == jnp.float32
    return out, ref


@pytest.mark.parametrize("m", [1, 3, 64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_float64(rng, fmt, m):
    out, ref = run(rng, fmt, m)
    assert rel_err(out, ref) < REL_TOL["float32"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_matches_float64(rng, fmt):
    out, ref = run(rng, fmt, 5, fn=lambda x, p: block_formats.qmatmul_reference(x, p, fmt))
    assert rel_err(out, ref) < REL_TOL["float32"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_matrix_is_the_tiles_bit_for_bit(rng, fmt):
    """``block_formats.dequantize`` (the reference's and prefill's matrix; the 4-bit formats as one broadcast
    expression) holds the values the kernels' ``dequantize_tile`` makes, bit for bit on a CPU, in float32 and
    rounded to bf16."""
    k = block_formats.FORMATS[fmt].block * 3
    planes = tuple(jnp.asarray(p) for p in random_planes(rng, fmt, N, k))
    parts = jax.jit(lambda p: block_formats.dequantize_tile(fmt, p))(planes)  # each [N, K / P]
    tiles = np.stack([np.asarray(t).reshape(N, k // 32, -1) for t in parts], axis=2).reshape(N, k)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = np.asarray(jax.jit(block_formats.dequantize, static_argnums=(1, 2))(planes, fmt, dtype), np.float32)
        want = np.asarray(jnp.asarray(tiles).astype(dtype), np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("m", [2, 24])
def test_bf16_activations(rng, m):
    """bf16 x: the register path multiplies in f32, the dot path rounds the dequantized tile to bf16."""
    out, ref = run(rng, "Q4_K", m, dtype=jnp.bfloat16)
    assert rel_err(out, ref) < REL_TOL["bfloat16"]


@pytest.mark.parametrize(
    "fmt,m,n,config",
    [
        ("Q8_0", 1, 19, QMatmulConfig(1, 16, 32, 3, 4, 2)),  # K split three ways, N = 19 slides back
        ("Q4_1", 20, 5, None),  # N below one dot tile: the register path over three row blocks
        ("Q4_0", 40, 33, QMatmulConfig(16, 16, 16, 1, 4, 2)),  # dot path, ragged M and N blocks
    ],
    ids=["splits3", "thin_n", "ragged_dot"],
)
def test_launch_variants(rng, fmt, m, n, config):
    out, ref = run(rng, fmt, m, n=n, config=config)
    assert rel_err(out, ref) < REL_TOL["float32"]


SMALL_M_CASES = [  # units (every format; M = 1 split K), fma and dot at M = 3
    *[(f, 1, QMatmulConfig(1, 16, 128, 3, 4, 2, "units")) for f in ("Q8_0", "Q6_K")],  # K split 3 ways, N slides
    *[(f, 3, QMatmulConfig(4, 16, 128, 1, 4, 2, "units")) for f in ("Q4_0", "Q4_1", "Q4_K")],  # a padded row
    *[(f, 3, QMatmulConfig(2, 16, 128, 1, 4, 2, "fma")) for f in ("Q8_0", "Q4_K")],  # the last row block slides
    *[(f, 3, QMatmulConfig(16, 16, 128, 1, 4, 2, "dot")) for f in ("Q4_1", "Q6_K")],  # 13 zero rows padded
    *[(f, 20, QMatmulConfig(16, 16, 128, 3, 4, 2, "dot_expand")) for f in FORMATS],  # its own dequantization
    *[(f, 3, QMatmulConfig(16, 16, 128, 3, 4, 2, "grouped")) for f in FORMATS],  # codes on the MMA, scales after
]


@pytest.mark.parametrize("fmt,m,config", SMALL_M_CASES, ids=[f"{f}-m{m}-{c.path}" for f, m, c in SMALL_M_CASES])
def test_small_m_paths(rng, fmt, m, config):
    """The candidate small-M formulations (docs/quant.md, "Speed") against float64."""
    out, ref = run(rng, fmt, m, blocks=768 // block_formats.FORMATS[fmt].block, config=config)
    assert rel_err(out, ref) < REL_TOL["float32"]


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "Q6_K"])
def test_groups_major_planes_on_the_grouped_path(rng, fmt):
    """The grouped path over per-group planes stored groups-major (the layout under trial) against float64."""
    config = QMatmulConfig(16, 16, 128, 3, 4, 2, "grouped")
    fn = lambda x, p: qmatmul.qmatmul_groups_major(x, qmatmul_grouped.to_groups_major(p, fmt), fmt, config=config)
    out, ref = run(rng, fmt, 3, blocks=768 // block_formats.FORMATS[fmt].block, fn=fn)
    assert rel_err(out, ref) < REL_TOL["float32"]
    with pytest.raises(ValueError, match="path='dot'"):
        qmatmul.qmatmul_groups_major(jnp.ones((1, 768)), (), fmt, config=config._replace(path="dot"))


def test_default_config_fills_the_gpu_at_batch_one():
    config = qmatmul.qmatmul_config(1, 4096, 4096, "Q8_0")
    programs = 4096 // config.block_n * config.num_splits
    assert (config.block_m, config.path) == (16, "dot") and programs >= backend.num_multiprocessors()
    assert qmatmul.qmatmul_config(1, 8, 4096, "Q8_0").path == "units"  # thinner than a dot tile


def _planes(fmt, n=64, k=256):
    return planes_like(fmt, n, k, jnp.zeros)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (jnp.ones((2, 256)), _planes("Q8_0"), "Q5_0"), ValueError, "is not one of"),
        (lambda: (jnp.ones((2, 256)), _planes("Q8_0")[:1], "Q8_0"), ValueError, "takes 2 planes"),
        (
            lambda: (jnp.ones((2, 256)), (_planes("Q8_0")[0], jnp.zeros((64, 8), jnp.float32)), "Q8_0"),
            ValueError,
            "plane 'scales' is float32",
        ),
        (lambda: (jnp.ones((2, 128)), _planes("Q4_K"), "Q4_K"), ValueError, r"x must be \[M, K=256\]"),
        (lambda: (jnp.ones((2, 256), jnp.int32), _planes("Q6_K"), "Q6_K"), TypeError, "int32"),
        (
            lambda: (jnp.ones((2, 160)), (jnp.zeros((64, 80), jnp.uint8), *_planes("Q4_K")[1:]), "Q4_K"),
            ValueError,
            "K=160 must be a positive multiple of 256",
        ),
    ],
    ids=["unknown_format", "missing_plane", "scale_dtype", "k_mismatch", "int_x", "k_not_block"],
)
def test_bad_arguments_raise(make, error, match):
    x, planes, fmt = make()
    with pytest.raises(error, match=match):
        qmatmul.qmatmul(x, planes, fmt, interpret=True)
    with pytest.raises(error, match=match):
        block_formats.qmatmul_reference(x, planes, fmt)


@pytest.mark.parametrize(
    "config,match",
    [
        (QMatmulConfig(1, 128, 64, 1, 4, 2), "block_n=128"),  # more than N = 64
        (QMatmulConfig(1, 32, 48, 1, 4, 2), "block_k=48"),
        (QMatmulConfig(1, 32, 64, 3, 4, 2), "num_splits=3"),
        (QMatmulConfig(32, 8, 64, 1, 4, 2), "dot path"),
        (QMatmulConfig(1, 16, 64, 1, 4, 2, "dot"), "dot path"),
        (QMatmulConfig(1, 16, 64, 1, 4, 2, "gemv"), "path='gemv'"),
    ],
)
def test_bad_config_raises(config, match):
    with pytest.raises(ValueError, match=match):
        qmatmul.qmatmul(jnp.ones((2, 256)), _planes("Q8_0"), "Q8_0", config=config, interpret=True)


LOWERING_CASES = [
    *[(f, m, None) for f in FORMATS for m in (1, 128)],
    *[(f, 1, "fma") for f in ("Q8_0", "Q4_K")],  # M = 1's default is the 16-row dot
    *[(f, 1, "units") for f in ("Q8_0", "Q4_K")],
    *[(f, 64, "dot_expand") for f in ("Q8_0", "Q6_K")],
    *[(f, 1, "grouped") for f in FORMATS],
]


@pytest.mark.parametrize("fmt,m,path", LOWERING_CASES)
def test_lowers_through_triton(fmt, m, path):
    """Every path lowers to a Triton kernel for CUDA on any host (no GPU needed), bf16 activations."""
    sds = jax.ShapeDtypeStruct
    n, k = 1024, 512
    planes = planes_like(fmt, n, k, sds)
    config = qmatmul.qmatmul_config(m, n, k, fmt)
    if path is not None:
        config = config._replace(path=path, block_m=1 if path in ("units", "fma") else 16)
    traced = qmatmul._qmatmul.trace(sds((m, k), jnp.bfloat16), planes, fmt=fmt, config=config, interpret=False)
    assert "xla.gpu.triton" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("fmt", FORMATS)
def test_dot_tiles_state_their_alignment(fmt):
    """The dot path's plane tiles start at ``k0 / group`` by a truncating division with its divisibility stated
    (``quantized_matmul.group_start``): no floor division's sign fix-up (``arith.remsi`` and a select) in the
    lowered kernel. That fix-up hid the tiles' alignment from Triton, which then read the codes a byte per load."""
    from bench import qmatmul_ir

    n, k = 1024, 512
    for m in (1, 64):
        ttir = qmatmul_ir.lowered_ttir(fmt, m, n, k, qmatmul.qmatmul_config(m, n, k, fmt))
        assert "tt.load" in ttir and "arith.remsi" not in ttir


@pytest.mark.gpu
@pytest.mark.skipif(backend.gpu_backend() != backend.TRITON, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("m", [1, 3, 64, 200])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_matches_float64(rng, fmt, m):
    out, ref = run(rng, fmt, m, n=301, blocks=5, dtype=jnp.bfloat16, fn=lambda x, p: qmatmul.qmatmul(x, p, fmt))
    assert rel_err(out, ref) < REL_TOL["bfloat16"]


@pytest.mark.gpu
@pytest.mark.skipif(backend.gpu_backend() != backend.TRITON, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_prefill_sized_launch(rng, fmt):
    """A prefill-sized product whose programs each walk many K steps (few splits), so that Triton pipelines the
    loop and the default launch takes its most shared memory (the K-quants' 128 x 128 tiles in 3 stages once
    asked for 256 KiB, more than a Hopper block has: the launch failed)."""
    m, n, k = 2048, 1024, 4096
    config = qmatmul.qmatmul_config(m, n, k, fmt)
    assert k // block_formats.FORMATS[fmt].parts // config.block_k // config.num_splits >= 4
    fn = lambda x, p: qmatmul.qmatmul(x, p, fmt)
    out, ref = run(rng, fmt, m, n=n, blocks=k // block_formats.FORMATS[fmt].block, dtype=jnp.bfloat16, fn=fn)
    assert rel_err(out, ref) < REL_TOL["bfloat16"]


@pytest.mark.gpu
@pytest.mark.skipif(backend.gpu_backend() != backend.TRITON, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("path", ["fma", "units", "dot_expand", "grouped", "grouped_f32", "grouped_gm"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_named_paths_match_float64(rng, fmt, path):
    """The non-default formulations compiled by Triton (bench/bench_qmatmul.py times them); ``grouped`` also with
    float32 activations (the codes on the tensor cores at full precision) and over groups-major planes."""
    config = qmatmul.fma_config(3, 301, 1280, fmt)
    if path == "units":
        config = qmatmul.units_config(3, 301, 1280, fmt)
    elif path != "fma":
        config = config._replace(block_m=16, block_n=16, path=path.removesuffix("_f32").removesuffix("_gm"))
    dtype = jnp.float32 if path.endswith("_f32") else jnp.bfloat16
    fn = lambda x, p: qmatmul.qmatmul(x, p, fmt, config=config)
    if path.endswith("_gm"):
        fn = lambda x, p: qmatmul.qmatmul_groups_major(x, qmatmul_grouped.to_groups_major(p, fmt), fmt, config=config)
    out, ref = run(rng, fmt, 3, n=301, blocks=1280 // block_formats.FORMATS[fmt].block, dtype=dtype, fn=fn)
    assert rel_err(out, ref) < REL_TOL["bfloat16" if dtype == jnp.bfloat16 else "float32"]
