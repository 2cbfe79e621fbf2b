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

from jkv.integrations.eqx import Attention, linear
from jkv.models.llama import LlamaConfig, LlamaParams, init_params, unfuse_qkv, with_layout


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
        cache = cache.begin(tokens.shape[1] if counts is None else counts)
        x = jnp.take(self.embed, tokens, axis=0).astype(jnp.float32)
        for i, block in enumerate(self.blocks):
            x, cache = block(x, cache, i)
        h = self.norm(x)
        logits = linear(h, self.embed.T) if self.lm_head is None else linear(h, self.lm_head)
        return logits.astype(jnp.float32), cache.commit()


def from_llama_params(params: LlamaParams, config: LlamaConfig, *, impl=None, window=None, softcap=None) -> Model:
    """The Equinox ``Model`` holding jkv's Llama weights (fused q/k/v and gate/up split back into separate
    projections; stacked or per-layer layouts)."""
    params = with_layout(params, "layers")
    norm = lambda w: RMSNorm(w, config.rms_norm_eps)
    inv_freq = tuple(float(x) for x in config.inv_freq())
    blocks = []
    for layer in params.layers:
        wq, wk, wv = unfuse_qkv(layer.wqkv)
        bq, bk, bv = (None,) * 3 if layer.bqkv is None else unfuse_qkv(layer.bqkv)
        attn = Attention(
            wq, wk, wv, layer.wo, bq, bk, bv, config.num_heads, config.num_kv_heads, config.head_dim, inv_freq,
            window=window, softcap=softcap, impl=impl,
        )  # fmt: skip
        mlp = MLP(layer.w_gate_up[:, 0], layer.w_gate_up[:, 1], layer.w_down)
        blocks.append(Block(norm(layer.attn_norm), attn, norm(layer.mlp_norm), mlp))
    return Model(params.embed, tuple(blocks), norm(params.norm), params.lm_head)


def init_model(config: LlamaConfig, key, dtype=jnp.float32, **options) -> Model:
    """A randomly initialized ``Model`` (jkv's ``init_params`` distribution), e.g. to train from scratch."""
    return from_llama_params(init_params(config, key, dtype=dtype), config, **options)
