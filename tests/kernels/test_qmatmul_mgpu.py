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
ROUNDED_TOL = 1e-5  # float32 accumulation against float64, same rounded weights
LLAMA_8B = {"wqkv": (6144, 4096), "wo": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LLAMA_8B["lm_head"] = (128256, 4096)

# (id, M, N, K, activation dtype, config or None for the default)
CASES = [
    ("m1_default", 1, 256, 1024, "bfloat16", None),
    ("m3_n200_splits3", 3, 200, 768, "bfloat16", Config(8, 3, 2)),  # N past its last 64-row block
    ("m16_f16_stages4", 16, 192, 2048, "float16", Config(16, 2, 4)),
    ("m64_one_split", 64, 128, 1280, "bfloat16", Config(64, 1, 2)),
    ("m13_more_stages_than_steps", 13, 64, 512, "bfloat16", Config(16, 1, 4)),
    ("m200_row_blocks_slide", 200, 136, 512, "bfloat16", None),  # 208 rows: the last 64-row block slides back
    ("m1_deep_k_default", 1, 512, 4096, "bfloat16", None),
]


def inputs(rng, m, n, k, dtype):
    planes = random_planes(rng, "Q8_0", n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    return x, planes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
@pytest.mark.parametrize("m,n,k,dtype,config", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_float64(rng, m, n, k, dtype, config):
    x, planes = inputs(rng, m, n, k, dtype)
    out = mgpu.qmatmul_mgpu(x, tuple(jnp.asarray(p) for p in planes), "Q8_0", config=config)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    w = dequantize_f64(planes, "Q8_0")
    w_rounded = np.asarray(jnp.asarray(w, jnp.float32).astype(dtype), np.float64)  # exact in f32, then rounded
    x64 = np.asarray(x, np.float64)
    assert rel_err(out, x64 @ w_rounded.T) < ROUNDED_TOL
    assert rel_err(out, x64 @ w.T) < REL_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
def test_under_jit_with_the_reference(rng):
    """Traced inside a caller's jit; the same product as ``block_formats.qmatmul_reference`` up to order."""
    from pallas_kernels.block_formats import qmatmul_reference

    x, planes = inputs(rng, 2, 320, 1536, "bfloat16")
    planes = tuple(jnp.asarray(p) for p in planes)
    out = jax.jit(lambda x, p: mgpu.qmatmul_mgpu(x, p, "Q8_0"))(x, planes)
    assert rel_err(out, qmatmul_reference(x, planes, "Q8_0")) < ROUNDED_TOL


def lowered(m, n, k, config, dtype=jnp.bfloat16) -> str:
    sds = jax.ShapeDtypeStruct
    planes = planes_like("Q8_0", n, k, sds)
    return mgpu._qmatmul.trace(sds((m, k), dtype), *planes, config=config).lower(lowering_platforms=("cuda",)).as_text()


LOWERING = [
    *[(f"{name}_m{m}", m, *shape, None) for name, shape in LLAMA_8B.items() for m in (1, 16)],  # bench_qmatmul's
    *[(c[0], c[1], c[2], c[3], c[5]) for c in CASES],
    ("m64_default", 64, 4096, 4096, None),
]


@pytest.mark.parametrize("m,n,k,config", [c[1:] for c in LOWERING], ids=[c[0] for c in LOWERING])
def test_lowers_for_cuda(m, n, k, config):
    """Every launch the tests and the benchmark use lowers to a Mosaic GPU kernel on any host (no GPU needed)."""
    config = config or mgpu.qmatmul_mgpu_config(m, n, k)
    text = lowered(m, n, k, config)
    assert "mosaic_gpu" in text
    assert "triton" not in text


def test_lowers_with_f16_activations():
    assert "mosaic_gpu" in lowered(3, 128, 512, Config(8, 1, 3), jnp.float16)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("name", LLAMA_8B)
def test_default_config_fills_the_gpu_and_fits(name, m):
    n, k = LLAMA_8B[name]
    config = mgpu.qmatmul_mgpu_config(m, n, k)
    programs = -(-n // mgpu.BLOCK_N) * config.num_splits
    assert config.block_m == (8 if m <= 8 else 16)
    assert programs >= 0.9 * backend.num_multiprocessors()  # wo at M = 16: 128 programs of 9 steps beat 256 of 5
    assert mgpu.check_config(config, k, 2) == config  # fits shared memory, divides the K steps
    assert config.num_stages >= mgpu.MIN_STAGES


def test_default_config_row_blocks():
    assert mgpu.qmatmul_mgpu_config(200, 4096, 4096).block_m == 64
    assert mgpu.qmatmul_mgpu_config(40, 4096, 4096).block_m == 40


def _args(m=2, n=128, k=512, dtype=jnp.bfloat16, fmt="Q8_0"):
    return jnp.ones((m, k), dtype), planes_like(fmt, n, k, jnp.zeros), fmt


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(fmt="Q4_K"), ValueError, r"takes \('Q8_0',\) weights, got 'Q4_K'"),
        (dict(dtype=jnp.float32), TypeError, "16-bit MMA.*got float32"),
        (dict(n=100), ValueError, "N=100 must be a multiple of 8"),
        (dict(n=56), ValueError, "N=56 must be .* at least the Mosaic GPU quantized matmul's 64-row block"),
        (dict(k=288), ValueError, "K=288 must be a multiple of 256"),
        (dict(fmt="Q5_0"), ValueError, "'Q5_0' is not one of"),
    ],
    ids=["q4_k", "f32_x", "n_off_tile", "n_below_block", "k_off_step", "unknown_format"],
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
