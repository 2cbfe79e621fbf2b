"""On-device sampling: greedy, top-k and top-p supports, and the sampled distribution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkv.serving.sampling import kept_tokens, sample


def _draw(logits, n, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    b = n
    logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (b, len(logits)))
    keys = jax.random.split(jax.random.key(seed), b)
    return np.asarray(
        jax.jit(sample)(
            logits,
            keys,
            jnp.full((b,), temperature, jnp.float32),
            jnp.full((b,), top_k, jnp.int32),
            jnp.full((b,), top_p, jnp.float32),
        )
    )


def test_greedy_rows_take_argmax(rng):
    logits = jnp.asarray(rng.standard_normal((5, 100)), jnp.float32)
    keys = jax.random.split(jax.random.key(1), 5)
    zeros = jnp.zeros((5,), jnp.float32)
    out = sample(logits, keys, zeros, jnp.zeros((5,), jnp.int32), jnp.ones((5,), jnp.float32))
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(logits), axis=-1))


def test_greedy_variant_and_mixed_rows(rng):
    """``draw=False`` (every row greedy) is the argmax; with ``draw=True`` greedy rows beside sampling ones still
    take their argmax, and the sampling rows draw."""
    logits = jnp.asarray(rng.standard_normal((6, 50)) * 3, jnp.float32)
    keys = jax.random.split(jax.random.key(2), 6)
    temperature = jnp.asarray([0, 5, 0, 5, 0, 5], jnp.float32)
    k, p = jnp.zeros((6,), jnp.int32), jnp.ones((6,), jnp.float32)
    argmax = np.argmax(np.asarray(logits), axis=-1)
    greedy = sample(logits, keys, jnp.zeros(6, jnp.float32), k, p, draw=False)
    np.testing.assert_array_equal(np.asarray(greedy), argmax)
    mixed = np.asarray(jax.jit(sample)(logits, keys, temperature, k, p))
    np.testing.assert_array_equal(mixed[::2], argmax[::2])
    assert (mixed[1::2] != argmax[1::2]).any()  # hot rows of 50 tokens: some leave the argmax


def test_without_truncation_the_draws_are_the_same(rng):
    """``truncate=False`` (no row limits top-k or top-p) skips the sort and draws the same tokens as the full path
    with top_k 0 and top_p 1 (the same keys, the same logits)."""
    logits = jnp.asarray(rng.standard_normal((64, 40)) * 2, jnp.float32)
    keys = jax.random.split(jax.random.key(4), 64)
    temperature = jnp.asarray(rng.uniform(0, 2, 64) * (np.arange(64) % 3 > 0), jnp.float32)  # some rows greedy
    k, p = jnp.zeros((64,), jnp.int32), jnp.ones((64,), jnp.float32)
    full = jax.jit(sample)(logits, keys, temperature, k, p)
    plain = jax.jit(functools.partial(sample, truncate=False))(logits, keys, temperature, k, p)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(full))


def test_distribution_matches_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    counts = np.bincount(_draw(logits, 20000), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)


@pytest.mark.parametrize("top_k, allowed", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2})])
def test_top_k_support(top_k, allowed):
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert set(_draw(logits, 4000, top_k=top_k).tolist()) == allowed


@pytest.mark.parametrize("top_p, allowed", [(0.3, {0}), (0.5, {0, 1}), (0.75, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_support(top_p, allowed):
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert set(_draw(logits, 4000, top_p=top_p).tolist()) == allowed


def test_temperature_sharpens():
    logits = np.log(np.array([0.6, 0.4]))
    cold = np.mean(_draw(logits, 8000, temperature=0.25) == 0)
    assert cold > 0.8  # 0.6^4 / (0.6^4 + 0.4^4) = 0.835


@pytest.mark.parametrize("top_p", [1e-300, 1e-45])
def test_a_top_p_that_is_zero_in_float32_still_keeps_the_most_likely_token(top_p):
    """``SamplingParams`` takes any top_p in (0, 1]; on the device it is float32, where these are 0 (or flushed to
    0): the most likely token stays, as it always does, instead of none (a draw over -inf everywhere)."""
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    assert set(_draw(logits, 64, top_p=top_p).tolist()) == {3}


def test_top_p_of_one_cuts_nothing():
    """top_p = 1 keeps every token (as top_k = 0 does) although the float32 running sum of a long, peaked row's
    probabilities reaches 1 before its last tokens: a request drawing with neither cut gets the tokens of the
    program without the sort whether or not a neighbour's top-k / top-p sends its step through the sort."""
    logits = jax.random.normal(jax.random.key(0), (4, 32000)) * 2
    zeros, ones = jnp.zeros((4,), jnp.int32), jnp.ones((4,), jnp.float32)
    assert bool(jax.jit(kept_tokens)(logits, zeros, ones).all())
    assert int(jax.jit(kept_tokens)(logits, zeros, jnp.full((4,), 0.5, jnp.float32)).sum()) < 4 * 32000  # it cuts
