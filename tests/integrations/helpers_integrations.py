"""Shared pieces of the integration tests: a tiny config, caches of a kind, and each framework's model and step."""

import helpers_params
import jax
import jax.numpy as jnp

import jkv
from jkv.integrations import example_eqx, example_nnx
from jkv.models import llama

# Tiny, GQA 4 (8 query heads over 2 kv heads), untied LM head; head_dim 32 so the Q8 format applies.
CONFIG = llama.LlamaConfig(97, 64, 96, 2, 8, 2, 32, 1e-5, 10000.0)
FRAMEWORKS = ("nnx", "eqx")


def random_params(config=CONFIG, seed=0, layout="layers"):
    # Weights large enough that attention and the MLP move the logits a lot (NumPy draws: nothing compiles).
    return helpers_params.random_params(config, seed, 0.15, layout)


def make_cache(kind, batch, max_len=32, config=CONFIG, nan=True):
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, max_len, jnp.float32)
    cache = jkv.make_cache(kind, spec, batch, **({"page_size": 8} if "paged" in kind else {}))
    if nan and kind == "f32":  # unused positions hold NaN: nothing may read them
        cache = cache.replace(data=tuple(jnp.full_like(x, jnp.nan) for x in cache.data))
    return cache


def model_step(framework, params, config=CONFIG, *, donate=False):
    """``(step, weights)``: ``step(weights, cache, tokens, counts=None) -> (logits, cache)`` jitted."""
    if framework == "nnx":
        return example_nnx.make_step(example_nnx.from_llama_params(params, config), donate=donate)
    model = example_eqx.from_llama_params(params, config)
    step = lambda m, cache, tokens, counts=None: m(tokens, cache, counts)
    return jax.jit(step, donate_argnums=(1,) if donate else ()), model
