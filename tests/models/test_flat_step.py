"""``llama.flat_hidden_states``: a flat step of many sequences (a prompt chunk, decode tokens, a first prompt, a
sequence taking no part) gives every token the hidden state it gets when its sequence runs alone, for every cache
kind; a sequence the cache refuses shifts nobody else's rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_compile import FAST_COMPILE

import jkv
from jkv.models import llama

CONFIG = llama.LlamaConfig(61, 64, 64, 2, 4, 2, 32, 1e-5, 1e4)  # head_dim 32: every format, Q8 included
TOL = {"bf16": 5e-2, "q8": 5e-2, "fp8": 1e-1}


def tol(kind):
    return next((v for k, v in TOL.items() if kind.startswith(k)), 2e-5)


@functools.cache
def params():
    return llama.init_params(CONFIG, jax.random.key(3), dtype=jnp.float32, scale=0.15)


def make(kind, batch, max_len=48):
    spec = jkv.CacheSpec(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, max_len, jnp.float32)
    return jkv.make_cache(kind, spec, batch, **({"page_size": 8} if jkv.caches.kind(kind).paged else {}))


flat_step = jax.jit(functools.partial(llama.flat_hidden_states, config=CONFIG), compiler_options=FAST_COMPILE)
padded_step = jax.jit(functools.partial(llama.hidden_states, config=CONFIG), compiler_options=FAST_COMPILE)


# Both layouts and all three formats; every kind runs flat steps through the engine in tests/serving.
@pytest.mark.parametrize("kind", ["f32", "paged", "q8", "fp8-paged"])
def test_flat_steps_equal_each_sequence_alone(rng, kind):
    prompts = [rng.integers(0, 61, n) for n in (9, 4, 6, 1)]
    # Step 1: sequence 0 takes 5 of its prompt, 1 all 4, 2 nothing, 3 its one token; step 2 the rest and a decode.
    plan = [[5, 4, 0, 1], [4, 1, 6, 0]]
    follow = rng.integers(0, 61, 4)  # the decode token of a sequence whose prompt is done
    cache, got = make(kind, 4), [[] for _ in prompts]
    done = np.zeros(4, int)
    for counts in plan:
        rows, owners = [], []
        for b, n in enumerate(counts):
            seq = np.concatenate([prompts[b], follow[b : b + 1]])
            rows += list(seq[done[b] : done[b] + n])
            owners += [b] * n
        tokens = np.zeros(16, np.int32)  # padding rows hold token 0
        tokens[: len(rows)] = rows
        h, cache = flat_step(params(), cache, jnp.asarray(tokens), jnp.asarray(counts, jnp.int32))
        assert h.shape == (16, CONFIG.hidden_size)
        np.testing.assert_array_equal(h[len(rows) :], 0.0)
        for i, b in enumerate(owners):
            got[b].append(np.asarray(h[i]))
        done += counts
    assert not np.asarray(cache.errors).any()
    np.testing.assert_array_equal(cache.lengths, done)
    for b in range(4):  # each alone, padded to 10 tokens after its own (causal: they reach no earlier row)
        seq = np.zeros(10, np.int32)
        seq[: done[b]] = np.concatenate([prompts[b], follow[b : b + 1]])[: done[b]]
        alone, _ = padded_step(params(), make(kind, 1), jnp.asarray(seq)[None])
        want = np.asarray(alone[0, : done[b]])
        err = np.max(np.abs(np.stack(got[b]) - want)) / np.max(np.abs(want))
        assert err < tol(kind), (kind, b, err)


@pytest.mark.parametrize("kind", ["f32", "paged"])
def test_refused_sequence_shifts_no_rows(rng, kind):
    """The middle sequence does not fit (capacity): it gets zeros and ERR_WRITE_OVERFLOW; the others' hidden states
    are those of the same step without it."""
    a, c = rng.integers(0, 61, 5), rng.integers(0, 61, 3)
    big = rng.integers(0, 61, 50)
    tokens = jnp.asarray(np.concatenate([a, big, c, [0, 0]]), jnp.int32)
    h, cache = flat_step(params(), make(kind, 3), tokens, jnp.asarray([5, 50, 3], jnp.int32))
    np.testing.assert_array_equal(cache.lengths, [5, 0, 3])
    np.testing.assert_array_equal(np.asarray(cache.errors) != 0, [False, True, False])
    np.testing.assert_array_equal(h[5:55], 0.0)
    alone = jnp.asarray(np.concatenate([a, c, np.zeros(52, int)]), jnp.int32)
    want, _ = flat_step(params(), make(kind, 3), alone, jnp.asarray([5, 0, 3], jnp.int32))
    np.testing.assert_allclose(h[:5], want[:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h[55:58], want[5:8], rtol=1e-5, atol=1e-5)
