"""Token selection on device: greedy argmax and temperature / top-k / top-p sampling, per row.

Every parameter is an array with one entry per row, so one compiled function serves a batch whose requests
sample differently (the engine's slots). Only the chosen token ids leave the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def sample(
    logits: Float[Array, "B V"],
    keys,
    temperature: Float[Array, " B"],
    top_k: Int[Array, " B"],
    top_p: Float[Array, " B"],
) -> Int[Array, " B"]:
    """One token per row.

    ``temperature[b] == 0`` picks the argmax (greedy, deterministic). Otherwise the logits are divided by the
    temperature, restricted to the ``top_k[b]`` most likely tokens (``0``: no limit) and to the smallest set whose
    probability reaches ``top_p[b]`` (``1.0``: no limit), and one token is drawn with ``keys[b]`` (typed PRNG keys).
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The sampling path sorts every row (a 128k-entry sort per row for Llama 3): skipped when no row samples, so a
    # batch of greedy requests costs an argmax only.
    return jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: jnp.where(temperature > 0, _draw(logits, keys, temperature, top_k, top_p), greedy),
        lambda: greedy,
    )


def _draw(logits, keys, temperature, top_k, top_p) -> Int[Array, " B"]:
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # (B, V) descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # (B, 1): smallest logit kept by top-k
    ordered = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep token i (in descending order) while the mass before it is below top_p: the first token always stays.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit
    masked = jnp.where((scaled >= jnp.maximum(kth, cutoff)), scaled, -jnp.inf)
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked).astype(jnp.int32)
