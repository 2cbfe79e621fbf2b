"""RoPE against NumPy float64 and, for NEOX, against HF transformers' apply_rotary_pos_emb."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from reference import rope_f64

import jkv


@pytest.mark.parametrize("style", ["neox", "norm"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("theta", [10000.0, 100000.0])
def test_rope_matches_float64(rng, style, head_dim, theta):
    x = rng.standard_normal((2, 5, 3, head_dim))
    positions = rng.integers(0, 4096, size=(2, 5))
    out = jkv.apply_rope(
        jnp.asarray(x, jnp.float32), jnp.asarray(positions), jkv.inv_frequencies(head_dim, theta), style
    )
    assert out.dtype == jnp.float32 and out.shape == x.shape
    # Angles are float32 (as in HF): at position p the angle carries ~p * 2**-24 rad of rounding.
    assert rel_err(out, rope_f64(x, positions, theta, style)) < 1e-4


def test_styles_are_related_by_permutation(rng):
    """NORM on x equals NEOX on x with its pairs regrouped: evens first, odds second (llama.cpp's permutation)."""
    x = rng.standard_normal((1, 4, 2, 16)).astype(np.float32)
    pos = jnp.asarray(rng.integers(0, 100, size=(1, 4)))
    inv = jkv.inv_frequencies(16, 10000.0)
    perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)])
    norm = np.asarray(jkv.apply_rope(jnp.asarray(x), pos, inv, "norm"))
    neox = np.asarray(jkv.apply_rope(jnp.asarray(x[..., perm]), pos, inv, "neox"))
    np.testing.assert_allclose(norm[..., perm], neox, rtol=1e-6, atol=1e-6)


def test_neox_matches_transformers(rng):
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    d, theta = 64, 100000.0
    q = rng.standard_normal((2, 7, 4, d)).astype(np.float32)
    pos = rng.integers(0, 2048, size=(2, 7))
    inv = jkv.inv_frequencies(d, theta)
    freqs = torch.tensor(pos, dtype=torch.float64)[..., None] * torch.tensor(inv)[None, None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    qt = torch.tensor(q, dtype=torch.float64).transpose(1, 2)  # HF layout (B, H, T, D)
    ref, _ = llama.apply_rotary_pos_emb(qt, qt, cos, sin)
    ref = ref.transpose(1, 2).numpy()
    out = jkv.apply_rope(jnp.asarray(q), jnp.asarray(pos), inv, jkv.RopeStyle.NEOX)
    # The reference's angles are float64 here; jkv's are float32 (as HF's own are): ~p * 2**-24 rad at position p.
    assert rel_err(out, ref) < 1e-4


def test_bf16_in_bf16_out(rng):
    x = jnp.asarray(rng.standard_normal((1, 3, 2, 64)), jnp.bfloat16)
    out = jkv.apply_rope(x, jnp.zeros((1, 3), jnp.int32) + 7, jkv.inv_frequencies(64), "neox")
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, rope_f64(np.asarray(x, np.float64), np.full((1, 3), 7), 10000.0, "neox")) < 1e-2


def test_llama3_scaling_keeps_high_and_slows_low_frequencies():
    base = jkv.inv_frequencies(128, 500000.0)
    scaled = jkv.llama3_inv_frequencies(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert scaled.shape == base.shape
    np.testing.assert_allclose(scaled[:8], base[:8])  # short wavelengths untouched
    np.testing.assert_allclose(scaled[-8:], base[-8:] / 8.0)  # long wavelengths slowed by the factor
    assert np.all(scaled <= base + 1e-18)


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda: jkv.inv_frequencies(63), ValueError, "even head_dim"),
        (lambda: jkv.inv_frequencies(64, -1.0), ValueError, "theta must be positive"),
        (
            lambda: jkv.apply_rope(jnp.ones((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32), np.ones(3)),
            ValueError,
            "inv_freq.shape=(3,)",
        ),
        (
            lambda: jkv.apply_rope(jnp.ones((1, 2, 1, 8)), jnp.zeros((2, 2), jnp.int32), np.ones(4)),
            ValueError,
            "positions.shape=(2, 2)",
        ),
        (
            lambda: jkv.apply_rope(jnp.ones((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32), np.ones(4), "gptj"),
            ValueError,
            "'gptj' is not a valid RopeStyle",
        ),
    ],
    ids=["odd-dim", "theta", "inv-freq-shape", "positions-shape", "style"],
)
def test_rope_errors(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)
