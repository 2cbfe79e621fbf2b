"""A Flax NNX attention layer over a jkv cache, threaded explicitly: ``out, cache = attn(x, cache, layer)``.

The module holds only weights; the cache is an argument and a result, never a module attribute, so a step is a
pure function of ``(nnx.split(model) state, cache, tokens)`` that ``jax.jit`` can donate the cache to and
``jax.vmap`` can map over sequences. The caller brackets the layers of a step with ``cache.begin(counts)`` and
``cache.commit()`` (``jkv.integrations.common``; docs/own-model.md).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float

from jkv.integrations import common


class Attention(nnx.Module):
    """Causal self-attention with ``num_heads`` query heads over ``num_kv_heads`` kv heads (GQA; MHA when equal),
    rotary embeddings (``rope_style`` ``"neox"`` or ``"norm"``, ``rope_theta`` or explicit ``inv_freq``), an
    optional sliding ``window`` and logit ``softcap``, reading and writing layer ``layer`` of any jkv cache.

    ``impl``: ``jkv.attend``'s (None: Pallas kernels on GPU, the XLA reference elsewhere). ``precision``: of the
    projections (float32 weights on a GPU otherwise multiply in TF32)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rngs: nnx.Rngs,
        rope_theta: float = 10000.0,
        rope_style: str = "neox",
        inv_freq=None,
        window: int | None = None,
        softcap: float | None = None,
        qkv_bias: bool = False,
        impl: str | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        precision=lax.Precision.HIGHEST,
    ):
        common.check_heads(num_heads, num_kv_heads, head_dim)
        common.check_settings(rope_style, window, softcap, impl)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.inv_freq = common.rope_frequencies(head_dim, rope_theta, inv_freq)
        self.rope_style, self.window, self.softcap, self.impl = rope_style, window, softcap, impl

        def linear(n_in, n_out, bias):
            kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
            return nnx.Linear(n_in, n_out, use_bias=bias, **kw)

        self.q_proj = linear(hidden_size, num_heads * head_dim, qkv_bias)
        self.k_proj = linear(hidden_size, num_kv_heads * head_dim, qkv_bias)
        self.v_proj = linear(hidden_size, num_kv_heads * head_dim, qkv_bias)
        self.o_proj = linear(num_heads * head_dim, hidden_size, False)

    def __call__(self, x: Float[Array, "B T H"], cache, layer):
        """``x``: the step's ``T`` tokens per sequence (tokens ``t >= cache.counts[b]`` are padding). Returns
        ``(out [B, T, H], cache)`` with this layer's keys and values written at ``cache.lengths[b] + t``."""
        common.check_input(x, self.q_proj.in_features, cache)
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        out, cache = common.attend(
            q, k, v, cache, layer, inv_freq=self.inv_freq, rope_style=self.rope_style,
            window=self.window, softcap=self.softcap, impl=self.impl,
        )  # fmt: skip
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache
