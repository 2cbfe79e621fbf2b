"""The Llama family as pure functions over a params pytree: Llama 2/3, SmolLM2 (GQA, tied embeddings), Qwen2,
and the families that differ from it by a few static options (``LlamaConfig``; docs/model.md, "Model families"):
Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3.

A decoder block is ``h = x + attention(norm(x)); out = h + mlp(norm(h))``. Qwen2 adds biases to q/k/v; SmolLM2
and small Qwen2 reuse the token embedding as the LM head. Qwen3 and Gemma 3 norm each q/k head before rope;
windowed layers, soft caps and Gemma's query scale go to ``attend_write``; Gemma norms each sub-block's output
too (``sandwich_norms``), gates with GELU-tanh and scales the embeddings.

Rotary embeddings are NEOX style (split halves) over weights in Hugging Face layout: the GGUF loader
un-permutes llama.cpp's interleaved Q/K rows, so every source ends in the same layout. How the products run
(fused weights, padded rows, the norm split around its product) is in ``fusions.py``.

Every entry point reads and writes a jkv cache through the cache protocol (``begin(T)``, ``jkv.attend_write``
per layer, ``commit()`` after the last layer), so every cache kind plugs in. ``prefill`` takes ``T`` tokens per
sequence, ``decode_step`` one; positions come from ``cache.lengths``, so a ragged batch decodes in one step and one
compiled step serves every position.

Numerics: weights and activations between layers live in ``params`` dtype (bf16 on GPU, f32 on CPU); matmuls
accumulate in f32 (f32 weights multiply at full f32 precision, no TF32); the residual stream, norms, rope and
softmax run in f32; logits are f32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from jkv.attention import attend_write, attend_write_qkv
from jkv.caches import tokens as cache_tokens
from jkv.models import quant
from jkv.models.llama import fusions
from jkv.models.llama.config import LlamaConfig
from jkv.models.llama.fusions import DEFAULT_OPTIONS, LlamaOptions, Normed
from jkv.models.llama.params import LayerParams, LlamaParams
from jkv.rope import RopeStyle, apply_rope


def attention(layer: LayerParams, i, normed: Normed, cache, *, rope, config: LlamaConfig, options: LlamaOptions):
    """Self-attention of block ``i`` on the normed stream ``[B', T, H]``: ``(out [B', T, H], cache)``. Rows past
    ``cache.batch`` are padding (``fusions.padded_batch``): they skip attention and are never written. A flat step
    (``flat_hidden_states``) is one row of ``T`` tokens of many sequences."""
    b, (bp, t) = cache.batch, normed.scale.shape[:2]
    rope = rope[config.local_rope(i)]
    extra = {}
    if config.windows is not None or config.attn_softcap is not None or config.query_scale is not None:
        extra = {"window": config.window(i), "softcap": config.attn_softcap, "scale": config.query_scale}
    if options.pack_qkv and not config.qk_norm and rope.keywords["positions"].ndim == 2:  # one array of q, k and v
        qkv = packed_rope(fusions.qkv_rows(normed, layer, options)[:b], rope)
        attn, cache = attend_write_qkv(qkv, cache, i, q_dtype=layer.wqkv.dtype, impl=options.impl, **extra)
    else:
        q, key, value = fusions.qkv_projection(normed, layer, config, options)
        if config.qk_norm:  # per head, before rope (Qwen3, Gemma 3)
            q, key = head_norm(q, layer.q_norm, config, options), head_norm(key, layer.k_norm, config, options)
        if rope.keywords["positions"].ndim == 1:  # flat: (T, N, D), (T, K, D) x 2
            q, key, value = rope(q[0]), rope(key[0]), value[0]
        else:
            q, key, value = rope(q[:b]), rope(key[:b]), value[:b]  # (B, T, N, D), (B, T, K, D) x 2
            key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)  # (B, K, T, D)
        attn, cache = attend_write(q.astype(layer.wqkv.dtype), key, value, cache, i, impl=options.impl, **extra)
    attn = fusions.pad_rows(attn.reshape(-1, t, config.num_heads * config.head_dim), bp)
    return fusions.project(attn, layer.wo, options), cache


def packed_rope(qkv: Float[Array, "B T K G2 D"], rope) -> Float[Array, "B T K G2 D"]:
    """``rope`` applied to the query and key rows of a fused ``[B, T, K, G + 2, D]`` projection (each kv head's
    ``G + 1`` first rows), its value rows as they are: one elementwise op over the whole array, which XLA makes one
    fusion with the product's sum (the slices of three were three)."""
    b, t, kh, rows, d = qkv.shape
    roped = rope(qkv.reshape(b, t, kh * rows, d)).reshape(qkv.shape)
    keyed = lax.broadcasted_iota(jnp.int32, qkv.shape, 3) < rows - 1  # queries and the key; not the value
    return jnp.where(keyed, roped, qkv)


def head_norm(x: Float[Array, "B T N D"], weight, config: LlamaConfig, options: LlamaOptions):
    """RMSNorm of each head's ``D`` values (f32; always the reference: a tiny op the norm kernel's shapes omit)."""
    plain = dataclasses.replace(options, norm_kernel=False)
    return fusions.rms_norm(x, weight, config.rms_norm_eps, jnp.float32, plain).value()


def mlp(layer: LayerParams, normed: Normed, options: LlamaOptions, activation: str = "silu") -> Float[Array, "B T H"]:
    """``down(act(gate) * up)`` on the normed stream."""
    return fusions.mlp_projection(normed, layer, options, activation)


def block(layer: LayerParams, i, x: Float[Array, "B T H"], cache, *, rope, config: LlamaConfig, options: LlamaOptions):
    """Decoder block ``i`` on the residual stream ``x`` (f32): the stream after it, and the cache holding its
    keys and values. ``rope``: ``{local: rotation}`` (``local`` True for Gemma 3's windowed layers)."""
    norm = functools.partial(fusions.rms_norm, eps=config.rms_norm_eps, dtype=layer.wqkv.dtype, options=options)
    attn, cache = attention(layer, i, norm(x, layer.attn_norm, matrix=layer.wqkv), cache, rope=rope, config=config,
                            options=options)  # fmt: skip
    if config.sandwich_norms:  # Gemma 2/3 norm each sub-block's output before the residual add
        attn = fusions.rms_norm(attn, layer.post_attn_norm, config.rms_norm_eps, jnp.float32, options).value()
    h = x + attn
    out = mlp(layer, norm(h, layer.mlp_norm, matrix=layer.w_gate_up), options, config.activation)
    if config.sandwich_norms:
        out = fusions.rms_norm(out, layer.post_mlp_norm, config.rms_norm_eps, jnp.float32, options).value()
    return h + out, cache


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
    t = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # (B, T)
    return _stream(params, cache.begin(t), tokens, positions, config=config, options=options)


def flat_hidden_states(
    params: LlamaParams,
    cache,
    tokens: Int[Array, " T"],
    counts: Int[Array, " B"],
    *,
    config: LlamaConfig,
    options: LlamaOptions = DEFAULT_OPTIONS,
):
    """Final-normed hidden states ``[T, H]`` (f32) of a flat step, and the advanced cache: sequence ``b``'s
    ``counts[b]`` tokens are consecutive rows, in sequence order (``jkv.caches.tokens``; rows past
    ``sum(counts)`` are padding and touch no cache). The mixed serving step: decode tokens, verification drafts
    and prompt chunks of many sequences in one pass with no padding per sequence.

    A sequence the cache refuses (past capacity, no free pages: count 0 and an error bit) takes no part: its rows
    are moved out of the cache's layout and come back as zeros, so no other sequence's rows shift."""
    t = tokens.shape[0]
    declared = jnp.maximum(jnp.asarray(counts, jnp.int32), 0)
    cache = cache.begin(counts)
    # Each declared row's place in the layout of the counts the cache accepted (the identity when it took all).
    slot, offset, live = cache_tokens.flat_layout(jnp.zeros_like(declared), declared, t)
    kept = live & (cache.counts[slot] > 0)
    row = jnp.where(kept, cache_tokens.flat_starts(cache.counts)[slot] + offset, t)  # t: not in the layout
    source = jnp.zeros((t,), jnp.int32).at[row].set(jnp.arange(t, dtype=jnp.int32), mode="drop")
    _, positions, _ = cache_tokens.flat_layout(cache.lengths, cache.counts, t)
    h, cache = _stream(params, cache, tokens[source][None], jnp.maximum(positions, 0), config=config, options=options)
    return jnp.where(kept[:, None], h[0][jnp.minimum(row, t - 1)], 0), cache


def _stream(params: LlamaParams, cache, tokens, positions, *, config: LlamaConfig, options: LlamaOptions):
    """The blocks over ``tokens [R, T]`` at ``positions`` (``[R, T]``; ``[T]`` for a flat step's one row) with
    the step begun on ``cache``; the final-normed stream ``[R, T, H]`` and the committed cache."""
    options = options.resolve()
    b, t = tokens.shape
    kinds = (False, True) if config.rope_local_theta is not None else (False,)
    rope = {
        local: functools.partial(
            apply_rope_any, positions=positions, inv_freq=jnp.asarray(config.inv_freq(local), jnp.float32)
        )
        for local in kinds
    }
    x = quant.take_rows(params.embed, tokens).astype(jnp.float32)  # (R, T, H)
    if config.embed_scale is not None:  # rounded to the weight dtype first, as Gemma's checkpoints were trained
        x = x * jnp.asarray(config.embed_scale, params.embed.dtype).astype(jnp.float32)
    if not quant.holds_layout(params.layers, "dp4a"):  # the integer-dot kernel's work grows with its rows: no pad
        x = fusions.pad_rows(x, fusions.padded_batch(b, t, options))  # (R', T, H)
    if params.stacked and not config.uniform_layers:  # layers differ in static options: one traced block each
        for i in range(config.num_layers):
            layer_params = jax.tree.map(lambda w, i=i: w[i], params.layers)
            x, cache = block(layer_params, i, x, cache, rope=rope, config=config, options=options)
    elif params.stacked:  # [L, ...] arrays: one traced block under lax.scan

        def body(carry, layer):
            (x, cache), (layer_params, i) = carry, layer
            return block(layer_params, i, x, cache, rope=rope, config=config, options=options), None

        (x, cache), _ = lax.scan(body, (x, cache), (params.layers, jnp.arange(config.num_layers)))
    else:
        for i, layer_params in enumerate(params.layers):
            x, cache = block(layer_params, i, x, cache, rope=rope, config=config, options=options)
    h = fusions.rms_norm(x[:b], params.norm, config.rms_norm_eps, jnp.float32, options).value()
    return h, cache.commit()


def apply_rope_any(x, *, positions, inv_freq):
    """NEOX rotary embedding of ``x [B, T, H, D]`` at ``positions [B, T]``, or of a flat ``x [T, H, D]`` at
    ``positions [T]``."""
    if positions.ndim == 1:
        return apply_rope(x[None], positions[None], inv_freq, RopeStyle.NEOX)[0]
    return apply_rope(x, positions, inv_freq, RopeStyle.NEOX)


def lm_head(
    params: LlamaParams,
    h: Float[Array, "... H"],
    options: LlamaOptions = DEFAULT_OPTIONS,
    *,
    config: LlamaConfig | None = None,
):
    """Logits ``[..., V]`` (f32) from final hidden states; the transposed embedding when tied. ``config`` brings
    the family's final soft cap (Gemma 2): pass it for every family that has one."""
    options = options.resolve()
    if params.lm_head is None:
        logits = fusions.project(h, params.embed, options, contract=1)
    else:
        logits = fusions.project(h, params.lm_head, options)
    if config is not None and config.final_softcap is not None:
        logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
    return logits


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
    return lm_head(params, h, options, config=config), cache


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
    return lm_head(params, h_last, options, config=config), cache


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
    return lm_head(params, h[:, 0], options, config=config), cache
