"""The NNX and Equinox layers over paged and Q8 caches (MQA: one kv head) against float64 NumPy: ragged
multi-token steps and decode, each layer's output within the cache format's error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import attention_f64, rope_f64

import jkv
from jkv.integrations import common
from jkv.integrations import eqx as jeqx
from jkv.integrations import nnx as jnnx

H, N, K, D, S = 32, 4, 1, 32, 24
TOLERANCE = {"paged": 2e-5, "q8": 3e-2, "q8-paged": 3e-2}  # of the output's largest magnitude


def make_layer(framework, weights):
    if framework == "eqx":
        w = [jnp.asarray(weights[n]) for n in ("wq", "wk", "wv", "wo")]
        return jeqx.Attention(*w, None, None, None, N, K, D, common.rope_frequencies(D))
    layer = nnx.eval_shape(lambda: jnnx.Attention(H, N, K, D, rngs=nnx.Rngs(0)))
    for proj, name in ((layer.q_proj, "wq"), (layer.k_proj, "wk"), (layer.v_proj, "wv"), (layer.o_proj, "wo")):
        proj.kernel.set_value(jnp.asarray(weights[name]))
    return layer


@pytest.mark.parametrize("kind", list(TOLERANCE))
@pytest.mark.parametrize("framework", ["nnx", "eqx"])
def test_layer_over_cache_kind_matches_float64(framework, kind, rng):
    shapes = {"wq": (H, N * D), "wk": (H, K * D), "wv": (H, K * D), "wo": (N * D, H)}
    weights = {n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for n, s in shapes.items()}
    layer = make_layer(framework, weights)
    jit = nnx.jit if framework == "nnx" else jax.jit
    step = jit(lambda layer, x, cache, counts: (lambda o, c: (o, c.commit()))(*layer(x, cache.begin(counts), 1)))
    spec = jkv.CacheSpec(2, K, D, S, jnp.float32)
    cache = jkv.make_cache(kind, spec, 2, **({"page_size": 8} if "paged" in kind else {}))
    keys, values, lengths = np.zeros((2, K, S, D)), np.zeros((2, K, S, D)), np.zeros(2, int)
    for t, counts in ((5, [5, 2]), (3, [1, 3]), (1, [1, 1]), (1, [0, 1])):
        x = rng.standard_normal((2, t, H)).astype(np.float32)
        out, cache = step(layer, jnp.asarray(x), cache, jnp.asarray(counts, jnp.int32))
        positions = lengths[:, None] + np.arange(t)[None]
        x64 = x.astype(np.float64)
        q = rope_f64((x64 @ weights["wq"]).reshape(2, t, N, D), positions, 10000.0, "neox")
        k = rope_f64((x64 @ weights["wk"]).reshape(2, t, K, D), positions, 10000.0, "neox")
        v = (x64 @ weights["wv"]).reshape(2, t, K, D)
        for b in range(2):
            keys[b, :, lengths[b] : lengths[b] + counts[b]] = k[b, : counts[b]].transpose(1, 0, 2)
            values[b, :, lengths[b] : lengths[b] + counts[b]] = v[b, : counts[b]].transpose(1, 0, 2)
        live = np.arange(t)[None, :] < np.asarray(counts)[:, None]
        attn = attention_f64(q, keys, values, positions).reshape(2, t, N * D) @ weights["wo"]
        want = np.where(live[..., None], attn, 0)
        lengths += counts
        np.testing.assert_allclose(np.asarray(out), want, atol=TOLERANCE[kind] * np.abs(want).max(), rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    assert not np.asarray(cache.errors).any()
