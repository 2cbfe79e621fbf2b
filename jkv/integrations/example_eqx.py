"""The Equinox twin of ``example_nnx``: a Llama-shaped model (embedding, blocks of
``h = x + attn(norm(x)); out = h + mlp(norm(h))``, final norm, LM head) over a jkv cache, and
``from_llama_params`` to load jkv's own Llama weights into it.

One step: ``logits, cache = model(tokens, cache)``. The model is a pytree, so
``jax.jit(lambda m, c, t: m(t, c), donate_argnums=1)`` is the whole jitted step (docs/own-model.md).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jkv.integrations import common
from jkv.integrations.eqx import Attention, linear


class RMSNorm(eqx.Module):
    weight: Float[Array, " H"]
    eps: float = eqx.field(static=True)

    def __call__(self, x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.weight


class MLP(eqx.Module):
    """``down(silu(x @ gate) * (x @ up))``."""

    gate: Float[Array, "H F"]
    up: Float[Array, "H F"]
    down: Float[Array, "F H"]

    def __call__(self, x):
        return linear(jax.nn.silu(linear(x, self.gate)) * linear(x, self.up), self.down)


class Block(eqx.Module):
    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: MLP

    def __call__(self, x: Float[Array, "B T H"], cache, layer):
        attn, cache = self.attn(self.attn_norm(x), cache, layer)
        h = x + attn
        return h + self.mlp(self.mlp_norm(h)), cache


class Model(eqx.Module):
    """A Llama-family decoder over any jkv cache kind; ``lm_head`` None: tied to ``embed``."""

    embed: Float[Array, "V H"]
    blocks: tuple[Block, ...]
    norm: RMSNorm
    lm_head: Float[Array, "H V"] | None

    def __call__(self, tokens: Int[Array, "B T"], cache, counts=None):
        """Logits ``[B, T, V]`` (float32) of the step's tokens and the committed cache. ``counts`` (an int or
        ``int32[B]``, default ``T``): real tokens per sequence; the rest of each row is padding, never written."""
        common.check_tokens(tokens)
        cache = cache.begin(tokens.shape[1] if counts is None else counts)
        x = jnp.take(self.embed, tokens, axis=0).astype(jnp.float32)
        for i, block in enumerate(self.blocks):
            x, cache = block(x, cache, i)
        h = self.norm(x)
        logits = linear(h, self.embed.T) if self.lm_head is None else linear(h, self.lm_head)
        return logits.astype(jnp.float32), cache.commit()


def from_llama_params(params, config, *, impl=None, window=None, softcap=None) -> Model:
    """The Equinox ``Model`` holding jkv's Llama weights (``jkv.models.llama.LlamaParams`` and its
    ``LlamaConfig``, either layer layout; fused q/k/v and gate/up split back into separate projections). For
    random weights, pass ``jkv.models.llama.init_params(config, key)``."""
    common.check_llama(params, config, window=window, softcap=softcap)
    norm = lambda w: RMSNorm(w, config.rms_norm_eps)
    inv_freq = tuple(float(x) for x in config.inv_freq())
    blocks = []
    for w in common.llama_layers(params):
        attn = Attention(
            w["wq"], w["wk"], w["wv"], w["wo"], w["bq"], w["bk"], w["bv"], config.num_heads, config.num_kv_heads,
            config.head_dim, inv_freq, window=window, softcap=softcap, impl=impl,
        )  # fmt: skip
        blocks.append(Block(norm(w["attn_norm"]), attn, norm(w["mlp_norm"]), MLP(w["gate"], w["up"], w["down"])))
    return Model(params.embed, tuple(blocks), norm(params.norm), params.lm_head)
