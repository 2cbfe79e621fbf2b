"""The Llama family as pure functions over a params pytree: Llama 2/3, SmolLM2 (GQA, tied embeddings), Qwen2.

A decoder block is ``h = x + attention(norm(x)); out = h + mlp(norm(h))``. Qwen2 adds biases to q/k/v; SmolLM2
and small Qwen2 reuse the token embedding as the LM head. Rotary embeddings are NEOX style (split halves) over
weights in Hugging Face layout: the GGUF loader un-permutes llama.cpp's interleaved Q/K rows, so every source
ends in the same layout. How the products run (fused weights, padded rows, the norm split around its product)
is in ``fusions.py``.

Every entry point reads and writes a jkv cache through the cache protocol (``begin(T)``, ``jkv.attend_write``
per layer, ``commit()`` after the last layer), so every cache kind plugs in. ``prefill`` takes ``T`` tokens per
sequence, ``decode_step`` one; positions come from ``cache.lengths``, so a ragged batch decodes in one step and one
compiled step serves every position.

Numerics: weights and activations between layers live in ``params`` dtype (bf16 on GPU, f32 on CPU); matmuls
accumulate in f32 (f32 weights multiply at full f32 precision, no TF32); the residual stream, norms, rope and
softmax run in f32; logits are f32.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from jkv.attention import attend_write
from jkv.models.llama import fusions
from jkv.models.llama.config import LlamaConfig
from jkv.models.llama.fusions import DEFAULT_OPTIONS, LlamaOptions, Normed
from jkv.models.llama.params import LayerParams, LlamaParams
from jkv.rope import RopeStyle, apply_rope


def attention(layer: LayerParams, i, normed: Normed, cache, *, rope, config: LlamaConfig, options: LlamaOptions):
    """Self-attention of block ``i`` on the normed stream ``[B', T, H]``: ``(out [B', T, H], cache)``. Rows past
    ``cache.batch`` are padding (``fusions.padded_batch``): they skip attention and are never written."""
    b, (bp, t) = cache.batch, normed.rows.shape[:2]
    q, key, value = fusions.qkv_projection(normed, layer, config, options)
    q, key, value = rope(q[:b]), rope(key[:b]), value[:b]  # (B, T, N, D), (B, T, K, D) x 2
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)  # (B, K, T, D)
    attn, cache = attend_write(q.astype(layer.wqkv.dtype), key, value, cache, i, impl=options.impl)  # (B, T, N, D)
    attn = fusions.pad_rows(attn, bp).reshape(bp, t, config.num_heads * config.head_dim)
    return fusions.project(attn, layer.wo, options), cache


def mlp(layer: LayerParams, normed: Normed, options: LlamaOptions) -> Float[Array, "B T H"]:
    """``down(silu(gate) * up)`` on the normed stream."""
    return fusions.project(fusions.gate_up_projection(normed, layer, options), layer.w_down, options)


def block(layer: LayerParams, i, x: Float[Array, "B T H"], cache, *, rope, config: LlamaConfig, options: LlamaOptions):
    """Decoder block ``i`` on the residual stream ``x`` (f32): the stream after it, and the cache holding its
    keys and values."""
    norm = functools.partial(fusions.rms_norm, eps=config.rms_norm_eps, dtype=layer.wqkv.dtype, options=options)
    attn, cache = attention(layer, i, norm(x, layer.attn_norm), cache, rope=rope, config=config, options=options)
    h = x + attn
    out = h + mlp(layer, norm(h, layer.mlp_norm), options)
    return out, cache


def hidden_states(
    params: LlamaParams,
    cache,
    tokens: Int[Array, "B T"],
    *,
    config: LlamaConfig,
    options: LlamaOptions = DEFAULT_OPTIONS,
):
    """Final-normed hidden states ``[B, T, H]`` (f32) of ``T`` new tokens per sequence, and the advanced cache.

    Token ``t`` of sequence ``b`` sits at position ``cache.lengths[b] + t``.
    """
    options = options.resolve()
    b, t = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # (B, T)
    inv_freq = jnp.asarray(config.inv_freq(), jnp.float32)
    rope = functools.partial(apply_rope, positions=positions, inv_freq=inv_freq, style=RopeStyle.NEOX)
    x = jnp.take(params.embed, tokens, axis=0).astype(jnp.float32)  # (B, T, H)
    x = fusions.pad_rows(x, fusions.padded_batch(b, t, options))  # (B', T, H)
    cache = cache.begin(t)  # the step's T positions (a paged cache allocates their pages here, once per step)
    if params.stacked:  # [L, ...] arrays: one traced block under lax.scan

        def body(carry, layer):
            (x, cache), (layer_params, i) = carry, layer
            return block(layer_params, i, x, cache, rope=rope, config=config, options=options), None

        (x, cache), _ = lax.scan(body, (x, cache), (params.layers, jnp.arange(config.num_layers)))
    else:
        for i, layer_params in enumerate(params.layers):
            x, cache = block(layer_params, i, x, cache, rope=rope, config=config, options=options)
    h = fusions.rms_norm(x[:b], params.norm, config.rms_norm_eps, jnp.float32, options).value()
    return h, cache.commit()


def lm_head(params: LlamaParams, h: Float[Array, "... H"], options: LlamaOptions = DEFAULT_OPTIONS):
    """Logits ``[..., V]`` (f32) from final hidden states; the transposed embedding when tied."""
    options = options.resolve()
    if params.lm_head is None:
        return fusions.project(h, params.embed, options, contract=1)
    return fusions.project(h, params.lm_head, options)


def forward(
    params: LlamaParams,
    cache,
    tokens: Int[Array, "B T"],
    *,
    config: LlamaConfig,
    options: LlamaOptions = DEFAULT_OPTIONS,
):
    """Logits ``[B, T, V]`` of every new token (a full causal pass when the cache starts empty), and the cache."""
    h, cache = hidden_states(params, cache, tokens, config=config, options=options)
    return lm_head(params, h, options), cache


def prefill(
    params: LlamaParams,
    cache,
    tokens: Int[Array, "B T"],
    last: Int[Array, " B"] | None = None,
    *,
    config: LlamaConfig,
    options: LlamaOptions = DEFAULT_OPTIONS,
):
    """Run ``T`` prompt tokens per sequence (causal) and return the logits ``[B, V]`` at index ``last[b]``.

    ``last`` (default ``T - 1``) lets a right-padded ragged batch read each prompt's own last token; the caller
    then rolls the cache back to the true prompt lengths, and the padding is overwritten by later steps. Only the
    selected rows go through the LM head.
    """
    h, cache = hidden_states(params, cache, tokens, config=config, options=options)
    b, t, _ = h.shape
    last = jnp.full((b,), t - 1, jnp.int32) if last is None else last
    h_last = jnp.take_along_axis(h, last[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # (B, H)
    return lm_head(params, h_last, options), cache


def decode_step(
    params: LlamaParams,
    cache,
    tokens: Int[Array, " B"],
    *,
    config: LlamaConfig,
    options: LlamaOptions = DEFAULT_OPTIONS,
):
    """One new token per sequence at its own position ``cache.lengths[b]``: logits ``[B, V]`` and the cache."""
    h, cache = hidden_states(params, cache, tokens[:, None], config=config, options=options)
    return lm_head(params, h[:, 0], options), cache
