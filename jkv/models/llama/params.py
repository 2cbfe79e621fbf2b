"""The Llama family's weights as pytrees: ``LayerParams`` (one block), ``LlamaParams`` (the model), random
initialization, shape checks against a config, the two layer layouts, and the fused q/k/v weight layout.

Weights are stored fused where a block multiplies them together: q/k/v as ``[H, K, G + 2, D]`` and gate/up as
``[H, 2, F]`` (``fusions.py`` says why); ``jkv.attention.qkv`` converts from and to separate matrices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float

from jkv.models.llama.config import LlamaConfig


@struct.dataclass
class LayerParams:
    """One decoder block. q/k/v and gate/up are fused so a decode step reads each in one matmul."""

    attn_norm: Float[Array, " H"]
    # Grouped by kv head: for each of the K kv heads, its G query heads, then its key, then its value. A split of
    # the K axis (tensor parallel) gives each device whole groups: its queries with their keys and values.
    wqkv: Float[Array, "H K G2 D"]  # G2 = G + 2
    bqkv: Float[Array, "K G2 D"] | None  # Qwen2 only
    wo: Float[Array, "ND H"]
    mlp_norm: Float[Array, " H"]
    w_gate_up: Float[Array, "H 2 F"]  # [:, 0] gate, [:, 1] up; a split of F keeps each gate beside its up
    w_down: Float[Array, "F H"]
    q_norm: Float[Array, " D"] | None = None  # qk_norm families (Qwen3, Gemma 3): per-head RMSNorm weights
    k_norm: Float[Array, " D"] | None = None
    post_attn_norm: Float[Array, " H"] | None = None  # sandwich_norms families (Gemma 2/3)
    post_mlp_norm: Float[Array, " H"] | None = None


@struct.dataclass
class LlamaParams:
    embed: Float[Array, "V H"]
    # Either a tuple of per-layer pytrees (each layer's weights are their own buffers, so a matmul reads them in
    # place: the fast layout on GPU) or one LayerParams of stacked [L, ...] arrays, run under ``lax.scan`` (one
    # traced block: compiles several times faster, but slicing a layer out can copy its weights).
    layers: tuple[LayerParams, ...] | LayerParams
    norm: Float[Array, " H"]
    lm_head: Float[Array, "H V"] | None  # None: tied to ``embed``

    @property
    def dtype(self):
        return self.embed.dtype

    @property
    def stacked(self) -> bool:
        return isinstance(self.layers, LayerParams)

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

    def check(self, config) -> None:
        """``check_params(self, config)``: raise ``ValueError`` naming the first weight that does not fit ``config``
        (code that may not import ``jkv.models``, such as the integrations, checks weights through this)."""
        check_params(self, config)

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads: every layer, the final norm and the LM head (one embedding row)."""
        nbytes = lambda tree: sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
        head = self.embed if self.lm_head is None else self.lm_head  # a pytree of planes where quantized
        return nbytes(self.layers) + nbytes(self.norm) + nbytes(head)


LAYOUTS = ("auto", "layers", "stacked")


def resolve_layout(layout: str) -> str:
    """``"layers"`` or ``"stacked"``; ``"auto"``: per-layer buffers on GPU (each product reads its weights in
    place), stacked elsewhere (on a CPU compile time dominates a short generation)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if layout == "auto":
        return "layers" if jax.default_backend() == "gpu" else "stacked"
    return layout


def with_layout(params: LlamaParams, layout: str = "auto") -> LlamaParams:
    """``params`` with layers as a tuple (``"layers"``) or stacked (``"stacked"``), ``"auto"`` as
    ``resolve_layout`` picks. The model reads the layout from the params, so it needs no option of its own."""
    layout = resolve_layout(layout)
    if layout == "stacked" and not params.stacked:
        return params.replace(layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers))
    if layout == "layers" and params.stacked:
        n = jax.tree_util.tree_leaves(params.layers)[0].shape[0]
        return params.replace(layers=tuple(jax.tree.map(lambda x, i=i: x[i], params.layers) for i in range(n)))
    return params


def check_params(params: LlamaParams, config: LlamaConfig) -> None:
    """Raise ``ValueError`` naming the first parameter whose shape does not match ``config``."""
    if not isinstance(params, LlamaParams):
        raise TypeError(f"params must be LlamaParams, got {type(params).__name__}")
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv_shape = config.qkv_shape
    nd = config.num_heads * config.head_dim
    if (params.lm_head is None) != config.tie_embeddings:
        state = "absent" if params.lm_head is None else "present"
        raise ValueError(f"params.lm_head is {state} but config.tie_embeddings={config.tie_embeddings}")
    want = {"embed": (v, h), "norm": (h,), "lm_head": None if config.tie_embeddings else (h, v)}
    got = {"embed": params.embed.shape, "norm": params.norm.shape}
    got["lm_head"] = None if params.lm_head is None else params.lm_head.shape
    layer_want = {
        "attn_norm": (h,),
        "wqkv": (h, *qkv_shape),
        "bqkv": qkv_shape if config.qkv_bias else None,
        "wo": (nd, h),
        "mlp_norm": (h,),
        "w_gate_up": (h, 2, f),
        "w_down": (f, h),
    }
    layer_want |= _family_shapes(config)
    if params.stacked:
        layers, prefix = [params.layers], "layers"
        layer_want = {k: None if s is None else (config.num_layers, *s) for k, s in layer_want.items()}
    else:
        layers, prefix = params.layers, "layers[{}]"
        if len(layers) != config.num_layers:
            raise ValueError(f"params has {len(layers)} layers, config.num_layers={config.num_layers}")
    for i, layer in enumerate(layers):
        for name, shape in layer_want.items():
            value = getattr(layer, name)
            key = f"{prefix.format(i)}.{name}"
            want[key], got[key] = shape, None if value is None else tuple(value.shape)
    for name, shape in want.items():
        if got[name] != shape:
            raise ValueError(f"params.{name} has shape {got[name]}, expected {shape} for this config")


def _family_shapes(config: LlamaConfig) -> dict:
    """Shapes of the optional per-layer weights (None: the family has none)."""
    d, h = (config.head_dim,), (config.hidden_size,)
    qk, sandwich = config.qk_norm, config.sandwich_norms
    return {
        "q_norm": d if qk else None,
        "k_norm": d if qk else None,
        "post_attn_norm": h if sandwich else None,
        "post_mlp_norm": h if sandwich else None,
    }


def init_params(
    config: LlamaConfig, key, dtype=jnp.float32, scale: float = 0.02, layout: str = "layers"
) -> LlamaParams:
    """Random weights (normal, std ``scale``; norms near 1, embedding std 1) for tests and benchmarks.

    Generated on the device, a layer at a time by one compiled program (an 8B-shaped model takes seconds, not
    minutes, and the device holds the weights plus one layer's draw at most, not twice the weights).
    """
    dtype, scale = jnp.dtype(dtype), float(scale)
    layer_key, global_key = jax.random.split(key)
    layers = tuple(_init_layer(config, k, dtype, scale) for k in jax.random.split(layer_key, config.num_layers))
    params = LlamaParams(layers=layers, **_init_globals(config, global_key, dtype, scale))
    return with_layout(params, layout)


def _split(flat, shapes: dict, dtype, scale: float) -> dict:
    """``flat`` (one normal draw) cut into ``shapes``' arrays: norms near 1 (std 0.1), the embedding std 1, the
    rest std ``scale``; None where a shape is None."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        if shape is None:
            out[name] = None
            continue
        size = int(np.prod(shape))
        x = flat[offset : offset + size].reshape(shape)
        offset += size
        std = 0.1 if name.endswith("norm") else 1.0 if name == "embed" else scale
        out[name] = ((1.0 if name.endswith("norm") else 0.0) + std * x.astype(jnp.float32)).astype(dtype)
    return out


def _draw(key, shapes: dict, dtype):
    # One normal draw per program: every separate jax.random call adds its own threefry program, and dozens of
    # them take minutes to compile on a CPU.
    n = sum(int(np.prod(s)) for s in shapes.values() if s is not None)
    return jax.random.normal(key, (n,), jnp.float32).astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_layer(config: LlamaConfig, key, dtype, scale: float) -> LayerParams:
    h, f = config.hidden_size, config.intermediate_size
    shapes = {
        "attn_norm": (h,),
        "wqkv": (h, *config.qkv_shape),
        "bqkv": config.qkv_shape if config.qkv_bias else None,
        "wo": (config.num_heads * config.head_dim, h),
        "mlp_norm": (h,),
        "w_gate_up": (h, 2, f),
        "w_down": (f, h),
    } | _family_shapes(config)
    return LayerParams(**_split(_draw(key, shapes, dtype), shapes, dtype, scale))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_globals(config: LlamaConfig, key, dtype, scale: float) -> dict:
    h, v = config.hidden_size, config.vocab_size
    shapes = {"embed": (v, h), "norm": (h,), "lm_head": None if config.tie_embeddings else (h, v)}
    return _split(_draw(key, shapes, dtype), shapes, dtype, scale)
