"""A small complete Llama-shaped model in Flax NNX over a jkv cache: embedding, blocks of
``h = x + attn(norm(x)); out = h + mlp(norm(h))``, final norm, LM head. ``from_llama_params`` loads jkv's own
Llama weights (``jkv.models.llama.LlamaParams``, either layer layout) into it, so it runs any model jkv loads.

One step: ``logits, cache = model(tokens, cache)`` (``begin`` before the first block, ``commit`` after the last,
both inside ``__call__``). For ``jax.jit`` with the cache donated, split the model once and merge inside the step
(``make_step``); docs/own-model.md walks through it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

from jkv.integrations import common
from jkv.integrations.nnx import Attention

HIGHEST = lax.Precision.HIGHEST


class MLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        linear = functools.partial(nnx.Linear, use_bias=False, param_dtype=param_dtype, precision=HIGHEST, rngs=rngs)
        self.gate = linear(hidden_size, intermediate_size)
        self.up = linear(hidden_size, intermediate_size)
        self.down = linear(intermediate_size, hidden_size)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs, impl=None, window=None, softcap=None, param_dtype):
        norm = functools.partial(nnx.RMSNorm, config.hidden_size, epsilon=config.rms_norm_eps, rngs=rngs)
        self.attn_norm, self.mlp_norm = norm(param_dtype=param_dtype), norm(param_dtype=param_dtype)
        self.attn = Attention(
            config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, rngs=rngs,
            inv_freq=config.inv_freq(), window=window, softcap=softcap, qkv_bias=config.qkv_bias, impl=impl,
            param_dtype=param_dtype,
        )  # fmt: skip
        self.mlp = MLP(config.hidden_size, config.intermediate_size, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Float[Array, "B T H"], cache, layer):
        attn, cache = self.attn(self.attn_norm(x), cache, layer)
        h = x + attn
        return h + self.mlp(self.mlp_norm(h)), cache


class Model(nnx.Module):
    """A Llama-family decoder over any jkv cache kind. ``config``: a ``jkv.models.llama.LlamaConfig`` (read by
    attribute: sizes, ``rms_norm_eps``, ``inv_freq()``, ``qkv_bias``, ``tie_embeddings``)."""

    def __init__(self, config, *, rngs: nnx.Rngs, impl=None, window=None, softcap=None, param_dtype=None):
        param_dtype = jnp.float32 if param_dtype is None else param_dtype
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                Block(config, rngs=rngs, impl=impl, window=window, softcap=softcap, param_dtype=param_dtype)
                for _ in range(config.num_layers)
            ]
        )
        self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.tied = config.tie_embeddings
        if not self.tied:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, param_dtype=param_dtype, precision=HIGHEST,
                rngs=rngs,
            )  # fmt: skip

    def __call__(self, tokens: Int[Array, "B T"], cache, counts=None):
        """Logits ``[B, T, V]`` (float32) of the step's tokens and the committed cache. ``counts`` (an int or
        ``int32[B]``, default ``T``): real tokens per sequence; the rest of each row is padding, never written."""
        common.check_tokens(tokens)
        cache = cache.begin(tokens.shape[1] if counts is None else counts)
        x = self.embed(tokens).astype(jnp.float32)
        for i, block in enumerate(self.blocks):
            x, cache = block(x, cache, i)
        h = self.norm(x)
        if self.tied:
            logits = jnp.einsum("bth,vh->btv", h, self.embed.embedding[...], precision=HIGHEST)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32), cache.commit()


def from_llama_params(params, config, *, impl=None, window=None, softcap=None) -> Model:
    """The NNX ``Model`` holding jkv's Llama weights (fused q/k/v and gate/up split back into separate
    projections; stacked or per-layer layouts). Built abstractly first, so no random weights are drawn."""
    common.check_llama(params, config, window=window, softcap=softcap)
    dtype = params.embed.dtype
    model = nnx.eval_shape(
        lambda: Model(config, rngs=nnx.Rngs(0), impl=impl, window=window, softcap=softcap, param_dtype=dtype)
    )
    model.embed.embedding.set_value(params.embed)
    model.norm.scale.set_value(params.norm)
    if not config.tie_embeddings:
        model.lm_head.kernel.set_value(params.lm_head)
    for block, w in zip(model.blocks, common.llama_layers(params), strict=True):
        attn = block.attn
        block.attn_norm.scale.set_value(w["attn_norm"])
        block.mlp_norm.scale.set_value(w["mlp_norm"])
        for proj, name in ((attn.q_proj, "q"), (attn.k_proj, "k"), (attn.v_proj, "v")):
            proj.kernel.set_value(w["w" + name])
            if w["b" + name] is not None:
                proj.bias.set_value(w["b" + name])
        attn.o_proj.kernel.set_value(w["wo"])
        for proj, name in ((block.mlp.gate, "gate"), (block.mlp.up, "up"), (block.mlp.down, "down")):
            proj.kernel.set_value(w[name])
    return model


def make_step(model: Model, *, donate: bool = True):
    """``step(state, cache, tokens, counts=None) -> (logits, cache)``, jitted with the cache donated, and the
    model's ``state`` to pass it: the graph is split off once, so the step is a pure function of arrays that
    ``jax.vmap`` maps as well."""
    graphdef, state = nnx.split(model)

    def step(state, cache, tokens, counts=None):
        return nnx.merge(graphdef, state)(tokens, cache, counts)

    return jax.jit(step, donate_argnums=(1,) if donate else ()), state
