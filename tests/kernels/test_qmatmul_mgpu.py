"""The Mosaic GPU quantized matmul (``pallas_kernels.qmatmul_mgpu``) against NumPy float64 on a Hopper GPU; its
CUDA lowering, launch rule and argument errors everywhere.

Mosaic GPU has no interpret mode that runs a transposed MMA operand, so the value tests need the GPU and skip
elsewhere. They draw fresh planes (every code value, scales of both signs) and compare twice: against the float64
product of the weights rounded to the activations' dtype, as the kernel rounds its dequantized tile (only the
summation order differs: a misplaced group, row or step shows at once), and against the unrounded weights at the
dtype's tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from qweight_inputs import dequantize_f64, planes_like, random_planes

from pallas_kernels import backend
from pallas_kernels import qmatmul_mgpu as mgpu
from pallas_kernels.qmatmul_mgpu import QMatmulMgpuConfig as Config

ON_HOPPER = backend.mosaic_gpu_usable()
ROUNDED_TOL = 1e-4  # tensor-core float32 sums against float64 of the same rounded weights: one wrong weight shows
LLAMA_8B = {"wqkv": (6144, 4096), "wo": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LLAMA_8B["lm_head"] = (128256, 4096)
IDENTITY = [("Q8_0", 256), ("Q4_K", 2048)]  # (format, K = M) of the identity test

# (id, format, M, N, K, activation dtype, config or None for the default)
CASES = [
    ("q8_0_m1_default", "Q8_0", 1, 256, 1024, "bfloat16", None),
    ("q8_0_m3_n200_splits3", "Q8_0", 3, 200, 768, "bfloat16", Config(8, 3, 2)),  # N past its last 64-row block
    ("q8_0_m16_f16_stages4", "Q8_0", 16, 192, 2048, "float16", Config(16, 2, 4)),
    ("q8_0_m64_one_split", "Q8_0", 64, 128, 1280, "bfloat16", Config(64, 1, 2)),
    ("q8_0_m13_more_stages_than_steps", "Q8_0", 13, 64, 512, "bfloat16", Config(16, 1, 4)),
    ("q8_0_m200_row_blocks_slide", "Q8_0", 200, 136, 512, "bfloat16", None),  # the last 64-row block slides back
    ("q8_0_m1_deep_k_default", "Q8_0", 1, 512, 4096, "bfloat16", None),
    ("q4_k_m1_default", "Q4_K", 1, 256, 2048, "bfloat16", None),
    ("q4_k_m3_n200_splits2", "Q4_K", 3, 200, 4096, "bfloat16", Config(8, 2, 3)),  # d windows of two splits
    ("q4_k_m16_f16", "Q4_K", 16, 128, 6144, "float16", None),  # 12 steps: d windows not at a split's start
    ("q4_k_m64_row_blocks", "Q4_K", 64, 64, 2048, "bfloat16", None),  # 16-row blocks
]


def inputs(rng, fmt, m, n, k, dtype):
    planes = random_planes(rng, fmt, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    return x, planes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
@pytest.mark.parametrize("fmt,m,n,k,dtype,config", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_float64(rng, fmt, m, n, k, dtype, config):
    x, planes = inputs(rng, fmt, m, n, k, dtype)
    out = mgpu.qmatmul_mgpu(x, tuple(jnp.asarray(p) for p in planes), fmt, config=config)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    w = dequantize_f64(planes, fmt)
    w_rounded = np.asarray(jnp.asarray(w, jnp.float32).astype(dtype), np.float64)  # exact in f32, then rounded
    x64 = np.asarray(x, np.float64)
    assert rel_err(out, x64 @ w_rounded.T) < ROUNDED_TOL
    assert rel_err(out, x64 @ w.T) < REL_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
@pytest.mark.parametrize("fmt,k", IDENTITY)
def test_identity_activations_read_back_the_rounded_matrix(rng, fmt, k):
    """``I @ W.T = W.T`` exactly (each output one product by 1): every dequantized weight as the kernel rounds it,
    so a wrong group, part, row or step shows where it is."""
    n = 136  # two column blocks and a partial one (136 in the lowering test too)
    planes = random_planes(rng, fmt, n, k)
    out = mgpu.qmatmul_mgpu(jnp.eye(k, dtype=jnp.bfloat16), tuple(jnp.asarray(p) for p in planes), fmt)
    w = np.asarray(jnp.asarray(dequantize_f64(planes, fmt), jnp.float32).astype(jnp.bfloat16), np.float32)
    wrong = np.argwhere(np.asarray(out).T != w)  # (row n, column k) of W
    assert wrong.size == 0, f"{len(wrong)} of {w.size} weights differ, first (n, k): {wrong[:8].tolist()}"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
def test_under_jit_with_the_reference(rng):
    """Traced inside a caller's jit; the same product as ``block_formats.qmatmul_reference`` up to order."""
    from pallas_kernels.block_formats import qmatmul_reference

    for fmt in mgpu.FORMATS:
        x, planes = inputs(rng, fmt, 2, 320, 2048, "bfloat16")
        planes = tuple(jnp.asarray(p) for p in planes)
        out = jax.jit(lambda x, p, fmt=fmt: mgpu.qmatmul_mgpu(x, p, fmt))(x, planes)
        assert rel_err(out, qmatmul_reference(x, planes, fmt)) < ROUNDED_TOL


def lowered(fmt, m, n, k, config, dtype=jnp.bfloat16) -> str:
    sds = jax.ShapeDtypeStruct
    traced = mgpu._qmatmul.trace(sds((m, k), dtype), planes_like(fmt, n, k, sds), fmt=fmt, config=config)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


def launches():
    """Every distinct launch (format, rows, config) of bench_qmatmul's cells and the GPU cases, at its first
    shape: the compiled kernel differs between shapes only in sizes."""
    cells = [
        (f"{f}_{name}_m{m}", f, m, *LLAMA_8B[name], None)
        for f in mgpu.FORMATS
        for name in LLAMA_8B
        for m in (1, 16, 64)
    ]
    seen, out = set(), []
    identity = [(f"{fmt}_identity", fmt, k, 136, k, None) for fmt, k in IDENTITY]
    for name, fmt, m, n, k, config in [*cells, *[(c[0], *c[1:5], c[6]) for c in CASES], *identity]:
        config = config or mgpu.qmatmul_mgpu_config(m, n, k, fmt)
        if (fmt, -(-m // 8), config) not in seen:
            seen.add((fmt, -(-m // 8), config))
            out.append((name, fmt, m, n, k, config))
    return out


LOWERING = launches()


@pytest.mark.parametrize("fmt,m,n,k,config", [c[1:] for c in LOWERING], ids=[c[0] for c in LOWERING])
def test_lowers_for_cuda(fmt, m, n, k, config):
    """Every launch the tests and the benchmark use lowers to a Mosaic GPU kernel on any host (no GPU needed)."""
    text = lowered(fmt, m, n, k, config)
    assert "mosaic_gpu" in text
    assert "triton" not in text


@pytest.mark.parametrize("fmt", mgpu.FORMATS)
def test_lowers_with_f16_activations(fmt):
    assert "mosaic_gpu" in lowered(fmt, 3, 128, 2048, Config(8, 1, 2), jnp.float16)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("name", LLAMA_8B)
@pytest.mark.parametrize("fmt", mgpu.FORMATS)
def test_default_config_fills_the_gpu_and_fits(fmt, name, m):
    n, k = LLAMA_8B[name]
    config = mgpu.qmatmul_mgpu_config(m, n, k, fmt)
    programs = -(-n // mgpu.BLOCK_N) * config.num_splits
    assert config.block_m == (8 if m <= 8 else 16)
    # one wave of long programs may beat two of short ones: wo at M = 16 (Q8_0) 128 programs, wqkv (Q4_K) 96
    assert programs >= 0.7 * backend.num_multiprocessors()
    assert mgpu.check_config(config, fmt, k, 2) == config  # fits shared memory, divides the K steps
    assert config.num_stages >= mgpu.MIN_STAGES


def test_default_config_row_blocks():
    assert mgpu.qmatmul_mgpu_config(200, 4096, 4096, "Q8_0").block_m == 64
    assert mgpu.qmatmul_mgpu_config(40, 4096, 4096, "Q8_0").block_m == 40
    assert mgpu.qmatmul_mgpu_config(64, 4096, 4096, "Q4_K").block_m == 16  # two parts: 16 rows fit two slots


def _args(m=2, n=128, k=512, dtype=jnp.bfloat16, fmt="Q8_0"):
    return jnp.ones((m, k), dtype), planes_like(fmt, n, k, jnp.zeros), fmt


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(fmt="Q6_K"), ValueError, r"takes \('Q8_0', 'Q4_K'\) weights, got 'Q6_K'"),
        (dict(dtype=jnp.float32), TypeError, "16-bit MMA.*got float32"),
        (dict(n=100), ValueError, "N=100 must be a multiple of 8"),
        (dict(n=56), ValueError, "N=56 must be .* at least the Mosaic GPU quantized matmul's 64-row block"),
        (dict(k=288), ValueError, "K=288 must be a multiple of 256 for Q8_0"),
        (dict(k=1536, fmt="Q4_K"), ValueError, "K=1536 must be a multiple of 2048 for Q4_K"),
        (dict(fmt="Q5_0"), ValueError, "'Q5_0' is not one of"),
    ],
    ids=["q6_k", "f32_x", "n_off_tile", "n_below_block", "k_off_step", "q4_k_k_off_d_rows", "unknown_format"],
)
def test_argument_errors(change, error, match):
    with pytest.raises(error, match=match):
        mgpu.qmatmul_mgpu(*_args(**change))


def test_shape_mismatch_is_the_shared_check():
    x, planes, fmt = _args()
    with pytest.raises(ValueError, match=r"x must be \[M, K=512\]"):
        mgpu.qmatmul_mgpu(x[:, :256], planes, fmt)


@pytest.mark.parametrize(
    "config,error,match",
    [
        (Config(12, 1, 2), ValueError, "block_m=12 must be a multiple of 8 up to 64"),
        (Config(128, 1, 2), ValueError, "block_m=128 must be a multiple of 8 up to 64"),
        (Config(8, 3, 2), ValueError, "num_splits=3 must divide the 2 K steps"),
        (Config(8, 1, 1), ValueError, "num_stages=1 must be at least 2"),
        (Config(64, 1, 4), ValueError, "bytes of shared memory"),
        (Config(8, 0, 2), ValueError, "num_splits=0 must be a positive int"),
        ((8, 1, 2), TypeError, "config must be a QMatmulMgpuConfig"),
    ],
    ids=["block_m_off_tile", "block_m_too_big", "splits", "one_stage", "smem", "zero_splits", "tuple"],
)
def test_config_errors(monkeypatch, config, error, match):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    with pytest.raises(error, match=match):
        mgpu.qmatmul_mgpu(*_args(), config=config)


def test_no_rows_give_zeros_without_a_launch(monkeypatch):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    monkeypatch.setattr(mgpu, "_qmatmul", None)  # a launch would fail
    out = mgpu.qmatmul_mgpu(*_args(m=0))
    assert out.shape == (0, 128) and out.dtype == jnp.float32


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal where Mosaic GPU cannot run")
def test_refuses_to_run_without_mosaic_gpu():
    with pytest.raises(RuntimeError, match="the Mosaic GPU quantized matmul cannot run here: "):
        mgpu.qmatmul_mgpu(*_args())
