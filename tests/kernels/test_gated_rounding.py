"""``pallas_kernels.qmatmul_act.gated_rows``: the down product's int8 activations made in one launch from the
split-K partial products of the gate/up product. Its words and factors are XLA's form's (``round_gated`` with
``rounding="xla"``; interpret mode: bit for bit; the real lowering: within one code where a float rounds
differently), and the values they stand for are ``act(gate) * up`` of the summed, scaled partials in float64, up to
the bf16 rows' and the int8 codes' rounding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import fast_jit

from pallas_kernels import backend, block_formats, qmatmul_act

FORMATS = tuple(block_formats.FORMATS)
ON_GPU = backend.gpu_backend() == backend.TRITON


def partials_and_scale(rng, splits, m, width):
    """Partials of mixed signs and sizes (each row its own magnitude), scales of a norm's range."""
    p = rng.standard_normal((splits, m, 2 * width)) * 10.0 ** rng.uniform(-1, 1, (1, m, 1))
    return jnp.asarray(p, jnp.float32), jnp.asarray(rng.uniform(0.05, 3.0, (m, 1)), jnp.float32)


def both(partials, scale, fmt, activation, interpret):
    fn = lambda p, s, rounding: qmatmul_act.round_gated(
        p, s, fmt, activation=activation, dtype=jnp.bfloat16, interpret=interpret, rounding=rounding
    )
    return fast_jit(fn, static_argnums=2)(partials, scale, "xla"), fast_jit(fn, static_argnums=2)(
        partials, scale, "kernel"
    )


def codes_of(words):
    return np.asarray(words).view(np.int8).astype(np.int64)


def act64(x, activation):
    if activation == "silu":
        return x / (1.0 + np.exp(-x))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


CASES = [  # (splits, rows, F): 1,024-column programs; one 32-column program a row; a 96-wide row; one split
    (4, 1, 3072, "silu", "Q4_K"),
    (28, 2, 1024, "silu", "Q8_0"),
    (3, 3, 96, "gelu_tanh", "Q6_K"),
    (1, 2, 160, "silu", "Q4_1"),
    (2, 1, 512, "gelu_tanh", "Q4_0"),
]


@pytest.mark.parametrize("splits,m,width,activation,fmt", CASES, ids=str)
def test_kernel_equals_xla_form_and_float64_interpret(rng, splits, m, width, activation, fmt):
    partials, scale = partials_and_scale(rng, splits, m, width)
    (want_words, want_factors), (words, factors) = both(partials, scale, fmt, activation, True)
    assert words.shape == (m, width // 4) and words.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(words), np.asarray(want_words))
    assert len(factors) == len(want_factors)
    for got, want in zip(factors, want_factors, strict=True):
        assert got.shape == (m, width // 32) and got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_within_float64(partials, scale, words, factors, activation)


def assert_within_float64(partials, scale, words, factors, activation):
    """The values the codes stand for against float64: the bf16 rows' rounding, then half a code of each block."""
    m, width = words.shape[0], 4 * words.shape[1]
    summed = np.asarray(partials, np.float64).sum(0) * np.asarray(scale, np.float64)
    exact = (act64(summed[:, :width], activation) * summed[:, width:]).reshape(m, -1, 32)
    unit = np.asarray(factors[0], np.float64)[:, :, None]
    blocks = codes_of(words).reshape(m, -1, 32) * unit
    bound = unit / 2 * (1 + 1e-6) + np.abs(exact) * 2.0**-8 + 1e-30
    assert np.all(np.abs(blocks - exact) <= bound)


def test_gate_and_up_are_not_interchangeable(rng):
    """A test that could not tell gate from up would pass a kernel that swapped them: here they differ."""
    partials, scale = partials_and_scale(rng, 2, 1, 256)
    swapped = jnp.concatenate([partials[:, :, 256:], partials[:, :, :256]], axis=2)
    one = qmatmul_act.round_gated(partials, scale, "Q8_0", activation="silu", dtype=jnp.bfloat16, interpret=True)
    two = qmatmul_act.round_gated(swapped, scale, "Q8_0", activation="silu", dtype=jnp.bfloat16, interpret=True)
    assert not np.array_equal(np.asarray(one[0]), np.asarray(two[0]))


@pytest.mark.parametrize(
    "shape,scale,activation,match",
    [
        ((2, 1, 100), (1, 1), "silu", "F a multiple of 32"),
        ((2, 64), (1, 1), "silu", "expected float32"),
        ((2, 3, 64), (1, 1), "silu", r"expected \(3, 1\)"),
        ((2, 1, 64), (1, 1), "relu", "activation 'relu' is not one of"),
    ],
)
def test_refuses_bad_arguments(shape, scale, activation, match):
    with pytest.raises(ValueError, match=match):
        qmatmul_act.round_gated(
            jnp.ones(shape, jnp.float32), jnp.ones(scale), "Q8_0", activation=activation, dtype=jnp.bfloat16,
            interpret=True,
        )  # fmt: skip


def test_lowers_to_one_triton_kernel():
    """For CUDA on any host: one Triton kernel, nothing of the sum, the activation or the rounding left to XLA."""
    sds = jax.ShapeDtypeStruct
    fn = lambda p, s: qmatmul_act.round_gated(
        p, s, "Q4_K", activation="silu", dtype=jnp.bfloat16, interpret=False, rounding="kernel"
    )
    text = jax.jit(fn).trace(sds((4, 1, 2048), jnp.float32), sds((1, 1), jnp.float32))
    text = text.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "jkv_gated_rounding_q4_k" in text
    assert "stablehlo.reduce" not in text and "stablehlo.logistic" not in text and "stablehlo.floor" not in text


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
@pytest.mark.parametrize("splits,m,width,activation,fmt", [(4, 1, 14336, "silu", "Q4_K"), *CASES], ids=str)
def test_gpu_within_a_code_of_xla_form_and_float64(rng, splits, m, width, activation, fmt):
    """Compiled by Triton: XLA's codes up to one where the two compilers' rows differ by a bf16 step (the
    exponential, the sum's fused multiply-adds: on an H100 ~3.5 % of the codes), and the values the codes stand
    for within the float64 bound the interpret-mode test asserts."""
    partials, scale = partials_and_scale(rng, splits, m, width)
    (want_words, _), (words, factors) = both(partials, scale, fmt, activation, None)
    got, want = codes_of(words), codes_of(want_words)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() <= 0.1
    assert_within_float64(partials, scale, words, factors, activation)
