"""The framework-free half of the attention layers: positions of a step, rotary frequencies, the attention call
through the cache, and stacking single-sequence caches for ``vmap``. Pure functions of arrays; no flax or equinox.

The step protocol every layer follows (docs/own-model.md): the caller runs ``cache = cache.begin(counts)`` once
before the first layer, each layer ``i`` calls ``attend`` here with ``layer=i`` (writing its keys and values, then
attending), and the caller runs ``cache = cache.commit()`` after the last layer. Positions come from
``cache.lengths``, which only ``commit`` advances, so every layer of a step sees the same positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jkv.attention import IMPLS, attend_write
from jkv.attention.qkv import unfuse_qkv
from jkv.caches import checks
from jkv.caches.base import Cache
from jkv.rope import RopeStyle, apply_rope, inv_frequencies


def rope_frequencies(head_dim: int, theta: float = 10000.0, inv_freq=None) -> tuple[float, ...]:
    """Rotary inverse frequencies ``[D/2]`` as a tuple of floats (a hashable, static module attribute):
    ``inv_freq`` as given (e.g. a ``LlamaConfig.inv_freq()`` with Llama 3.1 scaling), else ``theta ** (-2i/D)``."""
    inv = inv_frequencies(head_dim, theta) if inv_freq is None else np.asarray(inv_freq, np.float64)
    if inv.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq has shape {inv.shape}, expected ({head_dim // 2},) for {head_dim=}")
    return tuple(float(x) for x in inv)


def check_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Positive head counts with query heads a multiple of kv heads, and an even head_dim (rotary pairs)."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        checks.positive_int(name, value)
    checks.gqa_heads(num_heads, num_kv_heads)
    if head_dim % 2:
        raise ValueError(f"{head_dim=} must be even (rotary embeddings rotate pairs)")


def check_settings(rope_style, window, softcap, impl) -> None:
    """The layer's static settings, checked when it is built (a bad one would otherwise fail at its first call)."""
    styles = tuple(style.value for style in RopeStyle)
    if rope_style not in styles:
        raise ValueError(f"{rope_style=} must be one of {styles}")
    checks.window_softcap(window, softcap)
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"{impl=} is not one of {IMPLS} (or None: the default for the platform)")


def check_input(x, hidden_size: int, cache) -> None:
    """``x`` is a step's ``[B, T, hidden_size]`` activations over ``cache``'s ``B`` sequences."""
    if getattr(x, "ndim", None) != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"x.shape={getattr(x, 'shape', None)} must be [B, T, {hidden_size}]")
    check_cache(cache, x.shape[0], f"x.shape={x.shape}")


def check_cache(cache, batch: int, what: str) -> None:
    """``cache`` is a jkv cache (``jkv.make_cache``) holding ``batch`` sequences, the batch of the step's ``what``."""
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a jkv cache (jkv.make_cache(kind, spec, batch)), got {type(cache).__name__}")
    if cache.batch != batch:
        raise ValueError(f"{what} has batch {batch}, the cache has batch {cache.batch}")


def check_tokens(tokens) -> None:
    """``tokens`` is a step's ``int [B, T]`` token ids."""
    dtype = getattr(tokens, "dtype", None)
    if getattr(tokens, "ndim", None) != 2 or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens must be integers [B, T], got shape {getattr(tokens, 'shape', None)} {dtype}")


def step_positions(cache, t: int) -> Int[Array, "B T"]:
    """Position of each of the step's ``t`` tokens: ``cache.lengths[b] + t`` (valid between begin and commit)."""
    return cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def attend(
    q: Float[Array, "B T N D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K D"],
    cache,
    layer,
    *,
    inv_freq: tuple[float, ...],
    rope_style: str = "neox",
    window: int | None = None,
    softcap: float | None = None,
    impl: str | None = None,
):
    """Rotate ``q`` and ``k`` to their positions, write ``k``/``v`` into ``layer`` of ``cache`` and attend:
    ``(out [B, T, N, D], cache)``. Tokens ``t >= cache.counts[b]`` are padding: not written, output zero."""
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k, v must be [B, T, N, D], [B, T, K, D] x 2, got {q.shape}, {k.shape}, {v.shape}")
    check_cache(cache, q.shape[0], f"q.shape={q.shape}")
    positions = step_positions(cache, q.shape[1])
    inv = jnp.asarray(inv_freq, jnp.float32)
    q, k = apply_rope(q, positions, inv, RopeStyle(rope_style)), apply_rope(k, positions, inv, RopeStyle(rope_style))
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B, K, T, D): the cache's write layout
    return attend_write(q, k, v, cache, layer, impl=impl, window=window, softcap=softcap)


# Config fields of families the example models do not implement, with the value plain Llama blocks have.
PLAIN_LLAMA = dict(
    qk_norm=False, final_softcap=None, query_scale=None, sandwich_norms=False, activation="silu", embed_scale=None
)


def check_llama(params, config, *, window=None, softcap=None) -> None:
    """``params`` fit ``config`` (``LlamaParams.check``: the integrations do not import ``jkv.models``) and
    ``config`` is a family the example models run as written: plain Llama blocks, its attention window and soft
    cap (if any) the ``window``/``softcap`` passed, one for every layer. Anything else would run and give wrong
    logits."""
    if not callable(getattr(params, "check", None)):
        raise TypeError(f"params must be jkv.models.llama.LlamaParams, got {type(params).__name__}")
    params.check(config)
    for name, plain in PLAIN_LLAMA.items():
        if getattr(config, name, plain) != plain:
            raise ValueError(
                f"config.{name}={getattr(config, name)!r}: the example models implement plain Llama blocks "
                f"({name}={plain!r}); use jkv.models.llama for this family"
            )
    windows = set(getattr(config, "windows", None) or (None,))
    if windows != {None} and windows != {window}:
        raise ValueError(f"config.windows={config.windows}: pass window=... when every layer has that one window")
    if windows != {None} and getattr(config, "rope_local_theta", None) is not None:
        raise ValueError(f"config.rope_local_theta={config.rope_local_theta}: windowed layers with their own rope base")
    cap = getattr(config, "attn_softcap", None)
    if cap is not None and softcap != cap:
        raise ValueError(f"config.attn_softcap={cap}: pass softcap={cap} (the model's attention soft cap)")


def llama_layers(params) -> list:
    """The per-layer weights of a ``jkv.models.llama.LlamaParams`` in either layout (stacked ``[L, ...]`` arrays
    sliced per layer), as dicts with q/k/v split out of the fused ``wqkv [H, K, G + 2, D]``: ``wq [H, N*D]``,
    ``wk``/``wv [H, K*D]`` (query head ``n`` uses kv head ``n // G``), biases ``bq``/``bk``/``bv`` or None,
    and ``wo``, ``gate``/``up [H, F]``, ``down``, ``attn_norm``, ``mlp_norm``. Read by attribute, so the example
    models need no import of ``jkv.models``."""
    layers = params.layers
    if params.stacked:
        n = layers.wqkv.shape[0]
        layers = [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)]
    out = []
    for layer in layers:
        weights = dict(wo=layer.wo, attn_norm=layer.attn_norm, mlp_norm=layer.mlp_norm, down=layer.w_down)
        weights.update(gate=layer.w_gate_up[:, 0], up=layer.w_gate_up[:, 1])
        weights.update(zip(("wq", "wk", "wv"), unfuse_qkv(layer.wqkv), strict=True))
        biases = (None,) * 3 if layer.bqkv is None else unfuse_qkv(layer.bqkv)
        weights.update(zip(("bq", "bk", "bv"), biases, strict=True))
        out.append(weights)
    return out


def _layout(cache) -> tuple:
    """What must agree for caches to stack: the pytree's structure (kind, format) and each leaf's shape/dtype."""
    leaves, treedef = jax.tree.flatten(cache)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def stack_caches(caches):
    """One cache pytree whose every array has a new leading axis over ``caches`` (all of one kind and shape):
    the input of ``jax.vmap(step, in_axes=0)`` for a step written for one sequence's cache."""
    caches = list(caches)
    if not caches:
        raise ValueError("stack_caches got no caches: expected one or more of one kind and shape")
    want = _layout(caches[0])
    for i, cache in enumerate(caches[1:], 1):
        if _layout(cache) != want:
            raise ValueError(
                f"caches[{i}] ({type(cache).__name__}, arrays {_layout(cache)[1]}) differs from caches[0] "
                f"({type(caches[0]).__name__}, arrays {want[1]}): expected one kind, spec and batch"
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


def unstack_caches(stacked, n: int) -> list:
    """The ``n`` caches of ``stack_caches``' output, in order (``n`` must be the stack's length)."""
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(stacked)}
    if sizes != {n}:
        held = sizes.pop() if len(sizes) == 1 else sorted(sizes, key=str)
        raise ValueError(f"unstack_caches({n=}): the stack holds {held} caches, expected {n}")
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
