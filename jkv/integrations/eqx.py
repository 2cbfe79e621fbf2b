"""An Equinox attention layer over a jkv cache, threaded explicitly: ``out, cache = attn(x, cache, layer)``.

An ``eqx.Module`` is a pytree of its weights, with the head counts, rotary frequencies, window and soft cap as
static fields; the cache is an argument and a result, never a field, so ``jax.jit(..., donate_argnums=...)`` and
``jax.vmap`` apply to a step directly. The caller brackets the layers of a step with ``cache.begin(counts)`` and
``cache.commit()`` (``jkv.integrations.common``; docs/own-model.md). Unlike ``eqx.nn`` layers, which act on one
example, this one takes the cache's batch ``[B, T, H]``: the cache is batched; vmap over batch-1 caches instead.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from jkv.integrations import common


def linear(x: Float[Array, "... I"], w: Float[Array, "I O"], b=None) -> Float[Array, "... O"]:
    """``x @ w (+ b)`` at full float32 precision (a GPU otherwise multiplies float32 in TF32)."""
    y = jnp.einsum("...i,io->...o", x.astype(w.dtype), w, precision=lax.Precision.HIGHEST)
    return y if b is None else y + b


def _normal(key, shape, fan_in, dtype):
    return (jax.random.normal(key, shape, jnp.float32) / fan_in**0.5).astype(dtype)


class Attention(eqx.Module):
    """Causal self-attention with ``num_heads`` query heads over ``num_kv_heads`` kv heads (GQA; MHA when equal),
    rotary embeddings (``rope_style`` ``"neox"`` or ``"norm"``), an optional sliding ``window`` and logit
    ``softcap``, reading and writing one layer of any jkv cache. Weights are ``[in, out]``; ``init`` draws them."""

    wq: Float[Array, "H ND"]
    wk: Float[Array, "H KD"]
    wv: Float[Array, "H KD"]
    wo: Float[Array, "ND H"]
    bq: Float[Array, " ND"] | None
    bk: Float[Array, " KD"] | None
    bv: Float[Array, " KD"] | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    inv_freq: tuple[float, ...] = eqx.field(static=True)
    rope_style: str = eqx.field(static=True, default="neox")
    window: int | None = eqx.field(static=True, default=None)
    softcap: float | None = eqx.field(static=True, default=None)
    impl: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        common.check_heads(self.num_heads, self.num_kv_heads, self.head_dim)
        common.check_settings(self.rope_style, self.window, self.softcap, self.impl)
        half = self.head_dim // 2
        if len(self.inv_freq) != half:
            raise ValueError(f"inv_freq has {len(self.inv_freq)} frequencies, expected {half} for head_dim={2 * half}")
        hidden = self.wq.shape[0] if self.wq.ndim == 2 else None
        nd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for name, shape in (("wq", (hidden, nd)), ("wk", (hidden, kd)), ("wv", (hidden, kd)), ("wo", (nd, hidden))):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name}.shape={getattr(self, name).shape} must be [{shape[0]}, {shape[1]}]")
        for name, n in (("bq", nd), ("bk", kd), ("bv", kd)):
            bias = getattr(self, name)
            if bias is not None and bias.shape != (n,):
                raise ValueError(f"{name}.shape={bias.shape} must be ({n},) or None")

    @classmethod
    def init(
        cls,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        key,
        rope_theta: float = 10000.0,
        inv_freq=None,
        qkv_bias: bool = False,
        dtype=jnp.float32,
        **options,
    ) -> Attention:
        """Random weights (normal, std ``1/sqrt(fan_in)``); ``options``: ``rope_style``, ``window``, ``softcap``,
        ``impl``."""
        common.check_heads(num_heads, num_kv_heads, head_dim)  # before drawing weights it would refuse
        kq, kk, kv, ko = jax.random.split(key, 4)
        nd, kd = num_heads * head_dim, num_kv_heads * head_dim
        bias = (lambda n: jnp.zeros((n,), dtype)) if qkv_bias else (lambda n: None)
        return cls(
            _normal(kq, (hidden_size, nd), hidden_size, dtype), _normal(kk, (hidden_size, kd), hidden_size, dtype),
            _normal(kv, (hidden_size, kd), hidden_size, dtype), _normal(ko, (nd, hidden_size), nd, dtype),
            bias(nd), bias(kd), bias(kd), num_heads, num_kv_heads, head_dim,
            common.rope_frequencies(head_dim, rope_theta, inv_freq), **options,
        )  # fmt: skip

    def __call__(self, x: Float[Array, "B T H"], cache, layer):
        """``x``: the step's ``T`` tokens per sequence (tokens ``t >= cache.counts[b]`` are padding). Returns
        ``(out [B, T, H], cache)`` with this layer's keys and values written at ``cache.lengths[b] + t``."""
        common.check_input(x, self.wq.shape[0], cache)
        b, t, _ = x.shape
        q = linear(x, self.wq, self.bq).reshape(b, t, self.num_heads, self.head_dim)
        k = linear(x, self.wk, self.bk).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = linear(x, self.wv, self.bv).reshape(b, t, self.num_kv_heads, self.head_dim)
        out, cache = common.attend(
            q, k, v, cache, layer, inv_freq=self.inv_freq, rope_style=self.rope_style,
            window=self.window, softcap=self.softcap, impl=self.impl,
        )  # fmt: skip
        return linear(out.reshape(b, t, self.num_heads * self.head_dim), self.wo), cache
