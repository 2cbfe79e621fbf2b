"""The ``"dp4a"`` path of ``quantized_matmul`` (``pallas_kernels.qmatmul_dp4a``): interpret mode on CPU against
NumPy float64, its ``dp4a`` emulation against plain integer arithmetic, and its Triton lowering with the PTX.

Two references per case, on fresh random planes (every code value, scales of both signs) and activations:

* the same arithmetic in float64: the activations as the path rounds them (its int8 codes, unpacked from the
  words, times each 32-block's scale) times the exact weights; the kernel within 1e-6 (float32 accumulation);
* the float product ``x @ W.T``: within the activations' rounding, element by element
  ``|out - x @ W.T| <= sum_k |W[n, k]| * scale[m, k // 32] / 2`` (each rounded activation is within half a step
  of ``x``), plus float32 slack ``1e-5 * (|x| @ |W|.T)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from kernel_inputs import fast_jit
from qweight_inputs import dequantize_f64, planes_like, random_planes

from pallas_kernels import backend, block_formats, qmatmul_dp4a
from pallas_kernels import quantized_matmul as qmatmul
from pallas_kernels.quantized_matmul import QMatmulConfig

FORMATS = tuple(block_formats.FORMATS)
N = 37  # odd: the last column block slides back


def rounded_activations(x, fmt):
    """``(x_hat, scales)`` float64 ``[M, K]`` and ``[M, K / 32]``: the activations as the path rounds them, read
    back from its words (in ``K``'s order)."""
    words, factors = qmatmul_dp4a.quantize_activations(x, fmt)
    codes = np.asarray(words).view(np.int8)  # (M, K): little-endian bytes, the first code lowest
    m = codes.shape[0]
    scales = np.asarray(factors[0], np.float64)
    x_hat = codes.astype(np.float64) * np.repeat(scales, 32, axis=1)
    blocks = codes.reshape(m, -1, 32)
    sums = {  # the offsets' sums: of the rounded activations, or (exact integers) of the codes, per part for Q6_K
        "Q4_1": [x_hat.reshape(m, -1, 32).sum(axis=2)],
        "Q4_K": [x_hat.reshape(m, -1, 32).sum(axis=2)],
        "Q4_0": [blocks.sum(axis=2)],
        "Q6_K": [blocks[:, :, :16].sum(axis=2), blocks[:, :, 16:].sum(axis=2)],
    }.get(fmt, [])
    assert len(factors) == 1 + len(sums)
    assert all(f.shape == (m, codes.shape[1] // 32) and f.dtype == jnp.float32 for f in factors)
    for got, want in zip(factors[1:], sums, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6 * max(scales.max(), 1))
    return x_hat, scales


def run(rng, fmt, m, config, n=N, blocks=3, dtype=jnp.float32, interpret=True):
    k = block_formats.FORMATS[fmt].block * blocks
    planes = random_planes(rng, fmt, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 10.0, (m, 1)), dtype)
    w = dequantize_f64(planes, fmt)
    fn = lambda x, p: qmatmul.qmatmul(x, p, fmt, config=config, interpret=interpret)
    out = fast_jit(fn)(x, tuple(jnp.asarray(p) for p in planes))
    assert out.shape == (m, n) and out.dtype == jnp.float32
    x_hat, scales = rounded_activations(x, fmt)
    x64 = np.asarray(x, np.float64)
    bound = (np.repeat(scales, 32, axis=1) / 2) @ np.abs(w).T + 1e-5 * (np.abs(x64) @ np.abs(w).T)
    return np.asarray(out, np.float64), x_hat @ w.T, x64 @ w.T, bound


CASES = [  # every format; M = 1, a padded row block, two row blocks (the last slides back); K split and not
    *[(f, 1, QMatmulConfig(1, 16, 128, 3, 1, 1, "dp4a")) for f in FORMATS],  # each split one K step or two
    *[(f, 3, QMatmulConfig(4, 32, 128, 1, 1, 1, "dp4a")) for f in FORMATS],  # a zero row padded, N slides
    *[(f, 13, QMatmulConfig(8, 16, 128, 3, 1, 1, "dp4a")) for f in ("Q8_0", "Q4_K", "Q6_K")],  # two row blocks
    ("Q4_0", 16, QMatmulConfig(8, 16, 64, 2, 1, 1, "dp4a")),
    ("Q4_1", 6, QMatmulConfig(2, 8, 32, 12, 1, 1, "dp4a")),  # narrow blocks, twelve splits of two units
    *[(f, 2, QMatmulConfig(2, 16, 128, 1, 1, 2, "dp4a")) for f in FORMATS],  # stages 2: each step's reads a step ahead
]


@pytest.mark.parametrize(
    "fmt,m,config", CASES, ids=[f"{f}-m{m}-bm{c.block_m}-s{c.num_splits}-st{c.num_stages}" for f, m, c in CASES]
)
def test_matches_float64(rng, fmt, m, config):
    out, same, exact, bound = run(rng, fmt, m, config, blocks=768 // block_formats.FORMATS[fmt].block)
    assert rel_err(out, same) < REL_TOL["float32"]
    assert np.all(np.abs(out - exact) <= bound)
    assert rel_err(out, exact) > 1e-5  # the activations were rounded: the float product is not what it computes


def test_bf16_activations_and_default_launch(rng):
    """bf16 ``x`` (rounded to int8 from its float32 values) through :func:`quantized_matmul.dp4a_config`."""
    m, k = 5, 512
    config = qmatmul.dp4a_config(m, N, k, "Q4_K")
    assert config.path == "dp4a" and config.block_m == 8 and config.block_n <= N
    out, same, exact, bound = run(rng, "Q4_K", m, config, blocks=2, dtype=jnp.bfloat16)
    assert rel_err(out, same) < REL_TOL["float32"] and np.all(np.abs(out - exact) <= bound)


def test_quantized_activations(rng):
    """Codes in [-127, 127], each block's largest at +-127, every value within half a step; zero blocks stay
    zero (no division by a zero scale); the words hold the codes in ``K``'s order, the first code lowest; each
    format's factors: the scales, then the sums its offsets take (:func:`rounded_activations` checks them)."""
    x = rng.standard_normal((3, 256)).astype(np.float32) * 4
    x[1, 32:64] = 0.0
    for fmt in FORMATS:
        words, _ = qmatmul_dp4a.quantize_activations(jnp.asarray(x), fmt)
        assert words.dtype == jnp.int32 and words.shape == (3, 256 // 4)
        x_hat, scales = rounded_activations(jnp.asarray(x), fmt)
        codes = np.rint(x_hat / np.repeat(np.where(scales > 0, scales, 1), 32, axis=1))
        assert np.abs(codes).max() == 127 and np.all(np.abs(codes).reshape(3, 8, 32).max(axis=2)[scales > 0] == 127)
        assert np.all(np.abs(x - x_hat) <= np.repeat(scales, 32, axis=1) / 2 * (1 + 1e-6))
        assert scales[1, 1] == 0 and np.all(x_hat[1, 32:64] == 0)


def _splat(byte: int) -> int:
    """The int32 word whose four bytes are ``byte`` (a signed 8-bit value)."""
    return int(np.array([byte & 0xFF] * 4, np.uint8).view(np.int32)[0])


def _emulated_reference(a, b, c):
    """``c`` plus the signed bytes' dot product, in int64, wrapped to int32."""
    bytes_of = lambda w: w.astype(np.int32).view(np.int8).reshape(*w.shape, 4).astype(np.int64)
    out = c.astype(np.int64) + (bytes_of(a) * bytes_of(b)).sum(axis=-1)
    return ((out + 2**31) % 2**32 - 2**31).astype(np.int32)


def test_dp4a_emulation_matches_integer_arithmetic(rng):
    words = lambda: rng.integers(-(2**31), 2**31, (64, 8), dtype=np.int64).astype(np.int32)
    a, b, c = words(), words(), words()
    a[0], b[0] = _splat(-128), _splat(-128)  # the extremes: 4 * 16384
    a[1], b[1] = _splat(127), _splat(-128)
    a[2], b[2], c[2] = _splat(-128), _splat(-128), 2**31 - 1  # wraps
    out = jax.jit(qmatmul_dp4a.dp4a_emulated)(a, b, c)
    np.testing.assert_array_equal(np.asarray(out), _emulated_reference(a, b, c))
    assert int(out[0, 0]) == int(c[0, 0]) + 4 * 128 * 128


@pytest.mark.parametrize("fmt", ["Q8_0", "Q6_K"])
def test_word_planes_give_the_same_product(rng, fmt):
    """``qmatmul_words`` over planes made words once equals ``qmatmul`` over the bytes; it refuses other paths."""
    k = 512
    planes = tuple(jnp.asarray(p) for p in random_planes(rng, fmt, N, k))
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
    config = QMatmulConfig(2, 16, 128, 2, 1, 1, "dp4a")
    words = qmatmul_dp4a.weight_words(planes, fmt)
    assert [w.dtype for w in words[: 1 + (fmt == "Q6_K")]] == [jnp.int32] * (1 + (fmt == "Q6_K"))
    out = qmatmul.qmatmul_words(x, words, fmt, config=config, interpret=True)
    np.testing.assert_array_equal(out, qmatmul.qmatmul(x, planes, fmt, config=config, interpret=True))
    with pytest.raises(ValueError, match="path='units'"):
        qmatmul.qmatmul_words(x, words, fmt, config=config._replace(path="units"))


INTERLEAVED = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")  # the formats with 16-byte windows


@pytest.mark.parametrize("fmt", INTERLEAVED)
def test_interleaved_words_give_the_same_product(rng, fmt):
    """Words laid out by ``interleave`` (``[K_words / 4, N, 4]`` codes, K-major per-group planes) give the same
    product as the row-major words, with prefetch and several splits; Q6_K is refused."""
    k = 512
    planes = tuple(jnp.asarray(p) for p in random_planes(rng, fmt, N, k))
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    words = qmatmul_dp4a.weight_words(planes, fmt)
    tiled = qmatmul_dp4a.interleave(words, fmt)
    assert tiled[0].shape == (words[0].shape[1] // 4, N, 4)
    for config in (QMatmulConfig(4, 16, 128, 2, 1, 1, "dp4a"), QMatmulConfig(2, 32, 128, 1, 1, 2, "dp4a")):
        want = qmatmul.qmatmul_words(x, words, fmt, config=config, interpret=True)
        got = qmatmul.qmatmul_words(x, tiled, fmt, config=config, interpret=True, interleaved=True)
        np.testing.assert_array_equal(got, want)


def test_interleave_refuses_q6_k(rng):
    words = qmatmul_dp4a.weight_words(tuple(jnp.asarray(p) for p in random_planes(rng, "Q6_K", N, 256)), "Q6_K")
    with pytest.raises(ValueError, match="16-byte windows, not Q6_K"):
        qmatmul_dp4a.interleave(words, "Q6_K")


def test_dp4a_path_refuses_many_rows():
    with pytest.raises(ValueError, match="dp4a path unrolls its rows"):
        qmatmul.qmatmul(
            jnp.ones((2, 256)),
            planes_like("Q8_0", 64, 256, jnp.zeros),
            "Q8_0",
            config=QMatmulConfig(16, 16, 64, 1, 4, 1, "dp4a"),
            interpret=True,
        )


@pytest.mark.parametrize("fmt", FORMATS)
def test_lowers_through_triton_with_dp4a(fmt):
    """The path lowers to a Triton kernel for CUDA on any host, with the PTX ``dp4a`` in it (not the emulation)."""
    sds = jax.ShapeDtypeStruct
    n, k = 1024, 512
    config = qmatmul.dp4a_config(1, n, k, fmt)
    traced = qmatmul._qmatmul.trace(
        sds((1, k), jnp.bfloat16), planes_like(fmt, n, k, sds), fmt=fmt, config=config, interpret=False
    )
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and qmatmul_dp4a.DP4A_ASM in text
    # the activations reach the kernel as XLA rounds them: no transpose into parts, no stacked factors (each was
    # a launch of its own per product in a decode step)
    assert "stablehlo.transpose" not in text and "stablehlo.concatenate" not in text


@pytest.mark.gpu
@pytest.mark.skipif(backend.gpu_backend() != backend.TRITON, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("m", [1, 3, 8, 13])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_matches_float64(rng, fmt, m):
    """Compiled by Triton with the real ``dp4a``: the same two references, bf16 activations, default launch."""
    k = 1280 if block_formats.FORMATS[fmt].block == 32 else 1536
    config = qmatmul.dp4a_config(m, 301, k, fmt)
    out, same, exact, bound = run(
        rng, fmt, m, config, n=301, blocks=k // block_formats.FORMATS[fmt].block, dtype=jnp.bfloat16, interpret=None
    )
    assert rel_err(out, same) < REL_TOL["float32"]
    assert np.all(np.abs(out - exact) <= bound)


@pytest.mark.gpu
@pytest.mark.skipif(backend.gpu_backend() != backend.TRITON, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_gpu_interleaved_words_give_the_same_product(rng, fmt):
    """Compiled with the real ``dp4a``: interleaved words equal the row-major ones at the default launch."""
    k, m = 1536, 1
    planes = tuple(jnp.asarray(p) for p in random_planes(rng, fmt, 301, k))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    config = qmatmul.dp4a_config(m, 301, k, fmt)
    words = qmatmul_dp4a.weight_words(planes, fmt)
    want = qmatmul.qmatmul_words(x, words, fmt, config=config)
    got = qmatmul.qmatmul_words(x, qmatmul_dp4a.interleave(words, fmt), fmt, config=config, interleaved=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("m,rule", [(1, None), (4, True)])
@pytest.mark.parametrize(
    "n,k,fmt", [(6144, 4096, "Q8_0"), (4096, 14336, "Q4_K"), (128256, 4096, "Q8_0"), (301, 512, "Q4_0")]
)
def test_dp4a_launch_splits(n, k, fmt, m, rule):
    """The fewest splits dividing the K steps that give DP4A_PROGRAMS programs a multiprocessor and at most
    DP4A_MAX_STEPS steps a program, or one step each where the steps run out: at one row by default, at more
    rows with ``programs_rule=True``."""
    from pallas_kernels import qmatmul_configs

    config = qmatmul.dp4a_config(m, n, k, fmt, programs_rule=rule)
    steps = k // block_formats.block_format(fmt).parts // config.block_k
    programs = -(-m // config.block_m) * -(-n // config.block_n)
    ok = lambda s: steps % s == 0 and (
        s == steps
        or (s * programs >= qmatmul_configs.DP4A_PROGRAMS * backend.num_multiprocessors()
            and steps // s <= qmatmul_configs.DP4A_MAX_STEPS)
    )  # fmt: skip
    assert ok(config.num_splits) and not any(ok(s) for s in range(1, config.num_splits))


@pytest.mark.parametrize("m", [1, 2, 16])
def test_dp4a_launch_splits_more_rows(m):
    """More rows keep twice the default split rule's splits (where the steps divide by them), as one row does with
    ``programs_rule=False``."""
    n, k, fmt = 4096, 14336, "Q8_0"
    config = qmatmul.dp4a_config(m, n, k, fmt, programs_rule=False if m == 1 else None)
    steps = k // block_formats.block_format(fmt).parts // config.block_k
    base = qmatmul.default_splits(m, n, steps, config.block_m, config.block_n)
    assert config.num_splits == (2 * base if steps % (2 * base) == 0 else base)
