"""The Llama family as pure functions over a params pytree: Llama 2/3, SmolLM2 (GQA, tied embeddings), Qwen2.

One decoder block: ``x += o(attn(rope(q), rope(k), v))`` on ``rmsnorm(x)``, then ``x += down(silu(gate) * up)`` on
``rmsnorm(x)``. Qwen2 adds biases to q/k/v; SmolLM2 and small Qwen2 reuse the token embedding as the LM head.
Rotary embeddings are NEOX style (split halves) over weights in Hugging Face layout: the GGUF loader un-permutes
llama.cpp's interleaved Q/K rows, so every source ends in the same layout.

Both entry points read and write a jkv cache through the cache protocol (``begin(T)``, ``jkv.attend_write`` per
layer, ``commit()`` after the last layer), so every cache kind plugs in.
``prefill`` takes ``T`` tokens per sequence, ``decode_step`` one; positions come from
``cache.lengths``, so a ragged batch decodes in one step and one compiled step serves every position.

Numerics: weights and activations between layers live in ``params`` dtype (bf16 on GPU, f32 on CPU); matmuls
accumulate in f32 (f32 weights multiply at full f32 precision, no TF32); the residual stream, norms, rope and
softmax run in f32; logits are f32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Float, Int

from jkv.attention import attend_write, resolve_impl
from jkv.rope import RopeStyle, apply_rope, inv_frequencies, llama3_inv_frequencies
from pallas_kernels import rms_norm


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static hyperparameters (hashable: safe as a ``jit`` static argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1 scaling as (factor, low_freq_factor, high_freq_factor, original_max_position), or None.
    rope_llama3: tuple[float, float, float, int] | None = None
    # Linear position interpolation (HF ``rope_scaling: {"type": "linear"}``): frequencies divided by this.
    rope_linear_factor: float = 1.0
    # Per-frequency divisors ``[D/2]`` (llama.cpp stores Llama 3.1 scaling as a ``rope_freqs`` tensor), or None.
    rope_factors: tuple[float, ...] | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position: int = 8192
    architecture: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be a positive even int, got {self.head_dim!r}")
        if self.rope_factors is not None and len(self.rope_factors) != self.head_dim // 2:
            raise ValueError(
                f"rope_factors has {len(self.rope_factors)} values, expected head_dim/2={self.head_dim // 2}"
            )

    @property
    def qkv_shape(self) -> tuple[int, int, int]:
        """Shape of the fused q/k/v projection's output axes: ``(K, G + 2, D)``."""
        return (self.num_kv_heads, self.num_heads // self.num_kv_heads + 2, self.head_dim)

    @property
    def qkv_size(self) -> int:
        """Width of the fused q/k/v projection: ``(N + 2K) * D``."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies ``[D/2]`` (float64 on the host), with Llama 3.1 / linear scaling applied."""
        if self.rope_llama3 is not None:
            factor, low, high, original = self.rope_llama3
            inv = llama3_inv_frequencies(self.head_dim, self.rope_theta, factor, low, high, int(original))
        else:
            inv = inv_frequencies(self.head_dim, self.rope_theta)
        if self.rope_factors is not None:
            inv = inv / np.asarray(self.rope_factors, np.float64)
        return inv / self.rope_linear_factor

    def num_params(self) -> int:
        h, f, v, n_layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        qkv = self.qkv_size
        per_layer = 2 * h + h * qkv + self.num_heads * self.head_dim * h + 3 * h * f
        per_layer += qkv if self.qkv_bias else 0
        return v * h + n_layers * per_layer + h + (0 if self.tie_embeddings else h * v)

    # ------------------------------------------------------------------ presets (shapes of published models)
    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        return cls(49152, 576, 1536, 30, 9, 3, 64, 1e-5, 100000.0, tie_embeddings=True)

    @classmethod
    def llama3_8b(cls) -> LlamaConfig:
        return cls(
            128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, rope_llama3=(8.0, 1.0, 4.0, 8192), max_position=131072
        )

    @classmethod
    def qwen2_0_5b(cls) -> LlamaConfig:
        return cls(151936, 896, 4864, 24, 14, 2, 64, 1e-6, 1000000.0, tie_embeddings=True, qkv_bias=True)


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

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads: every layer, the final norm and the LM head (one embedding row)."""
        layers = sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.layers))
        head = self.embed if self.lm_head is None else self.lm_head
        return layers + int(self.norm.size) * self.norm.dtype.itemsize + int(head.size) * head.dtype.itemsize


LAYOUTS = ("auto", "layers", "stacked")


def resolve_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if layout == "auto":
        return "layers" if jax.default_backend() == "gpu" else "stacked"
    return layout


def with_layout(params: LlamaParams, layout: str = "auto") -> LlamaParams:
    """``params`` with layers as a tuple (``"layers"``) or stacked (``"stacked"``); ``"auto"``: the tuple on GPU,
    stacked elsewhere (on a CPU compile time dominates a short generation)."""
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


def init_params(
    config: LlamaConfig, key, dtype=jnp.float32, scale: float = 0.02, layout: str = "layers"
) -> LlamaParams:
    """Random weights (normal, std ``scale``; norms near 1, embedding std 1) for tests and benchmarks.

    Generated on the device by one compiled program (an 8B-shaped model takes seconds, not minutes).
    """
    params = _init_params(config, key, jnp.dtype(dtype), float(scale))
    return with_layout(params, layout)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_params(config: LlamaConfig, key, dtype, scale: float) -> LlamaParams:
    # Two normal draws in all (one flat vector per layer under lax.map, one for the rest): every separate
    # jax.random call adds its own threefry program, and dozens of them take minutes to compile on a CPU.
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv_shape = config.qkv_shape
    layer_shapes = {
        "attn_norm": (h,),
        "wqkv": (h, *qkv_shape),
        "bqkv": qkv_shape if config.qkv_bias else None,
        "wo": (config.num_heads * config.head_dim, h),
        "mlp_norm": (h,),
        "w_gate_up": (h, 2, f),
        "w_down": (f, h),
    }
    global_shapes = {"embed": (v, h), "norm": (h,), "lm_head": None if config.tie_embeddings else (h, v)}

    def split(flat, shapes, lead=()):
        out, offset = {}, 0
        for name, shape in shapes.items():
            if shape is None:
                out[name] = None
                continue
            size = int(np.prod(shape))
            x = flat[..., offset : offset + size].reshape(*lead, *shape)
            offset += size
            std = 0.1 if name.endswith("norm") else 1.0 if name == "embed" else scale
            out[name] = ((1.0 if name.endswith("norm") else 0.0) + std * x.astype(jnp.float32)).astype(dtype)
        return out

    def total(shapes):
        return sum(int(np.prod(s)) for s in shapes.values() if s is not None)

    layer_key, global_key = jax.random.split(key)
    draw = lambda k, n: jax.random.normal(k, (n,), jnp.float32).astype(dtype)
    flat = lax.map(lambda k: draw(k, total(layer_shapes)), jax.random.split(layer_key, config.num_layers))
    layers = LayerParams(**split(flat, layer_shapes, (config.num_layers,)))
    rest = split(draw(global_key, total(global_shapes)), global_shapes)
    per_layer = tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(config.num_layers))
    return LlamaParams(layers=per_layer, **rest)


# ---------------------------------------------------------------------------------------------- the forward pass
# Whether ``impl="pallas"`` runs the residual add and RMSNorm as one Pallas kernel (pallas_kernels.rms_norm)
# instead of XLA's two fusions. Off until measured on a GPU: the kernel passes its tests in interpret mode, but
# its Triton lowering and its effect on a decode step have not been run yet (docs/BENCHMARKS.md, "End-to-end
# decode", says what the profile predicts). scripts/profile_step.py and scripts/bench_decode.py --norm-kernel
# turn it on.
RESIDUAL_NORM_KERNEL = False


def _residual_norm(x, y, weight, eps: float, dtype, impl):
    """The residual add ``x + y`` (``y=None``: none) and the RMSNorm after it, split around the next product:
    ``(x + y, ((x + y) * weight).astype(dtype), rsqrt(mean((x + y)**2) + eps))``. The per-row scale commutes
    with the product (``rmsnorm(x) @ W == scale * ((x * weight) @ W)``), so the block applies it to the
    product's output inside the fusion that consumes it, and the norm's only work of its own is the sum of
    squares. See ``RESIDUAL_NORM_KERNEL`` for the Pallas kernel that does all three in one launch."""
    if RESIDUAL_NORM_KERNEL and resolve_impl(impl) == "pallas":
        return rms_norm.residual_rms_norm(x, y, weight, eps=eps, dtype=dtype)
    return rms_norm.residual_rms_norm_reference(x, y, weight, eps=eps, dtype=dtype)


def fuse_qkv(wq, wk, wv, num_kv_heads: int):
    """Fuse q/k/v projections ``[..., N*D]``, ``[..., K*D]``, ``[..., K*D]`` (input features first, or biases)
    into the grouped layout ``[..., K, G + 2, D]`` (NumPy or JAX arrays)."""
    xp = jnp if isinstance(wq, jax.Array) else np
    lead, k = wq.shape[:-1], num_kv_heads
    d = wk.shape[-1] // k
    g = wq.shape[-1] // (k * d)
    parts = [wq.reshape(*lead, k, g, d), wk.reshape(*lead, k, 1, d), wv.reshape(*lead, k, 1, d)]
    return xp.concatenate(parts, axis=-2)


def unfuse_qkv(wqkv):
    """Inverse of ``fuse_qkv``: ``(wq [..., N*D], wk [..., K*D], wv [..., K*D])``."""
    *lead, k, g2, d = wqkv.shape
    g = g2 - 2
    return (
        wqkv[..., :g, :].reshape(*lead, k * g * d),
        wqkv[..., g, :].reshape(*lead, k * d),
        wqkv[..., g + 1, :].reshape(*lead, k * d),
    )


# Fewest rows a projection runs with, per backend. On GPU, XLA's kernels for a one-row product (batch-1 decode)
# read the weights more slowly than its small-GEMM kernels, so zero rows are added there: a Llama-3-8B step at
# batch 1 went from 6.32 to 6.13 ms on an H100 (docs/BENCHMARKS.md, "End-to-end decode"). The residual stream is
# padded once per step (``_padded_batch``), not before every projection: a pad before each of a layer's four
# products was a kernel of its own (~1.5 us each, 4 x 32 per 8B step). scripts/bench_decode.py changes this
# table to compare.
MIN_MATMUL_ROWS = {"gpu": 8}


def _padded_batch(batch: int, tokens: int) -> int:
    """Rows of the residual stream for ``batch`` sequences of ``tokens`` new tokens: ``batch``, or more so that
    every projection gets ``MIN_MATMUL_ROWS`` rows (the extra sequences are zeros, never written to a cache)."""
    rows = MIN_MATMUL_ROWS.get(jax.default_backend(), 1)
    return max(batch, -(-rows // tokens))


def _project(x: Float[Array, "... H"], w, contract: int = 0) -> Float[Array, "..."]:
    """``x`` times ``w`` over ``x``'s last axis and ``w``'s axis ``contract``: operands in the weight dtype,
    f32 accumulation and result. Output axes: ``x``'s leading ones, then ``w``'s others in order. Float32 weights
    multiply at full float32 precision: XLA's default on a GPU rounds float32 operands to TF32 (~1e-3 relative),
    which is not what a user who asks for float32 weights wants."""
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, x.shape[-1]).astype(w.dtype)
    pad = MIN_MATMUL_ROWS.get(jax.default_backend(), 1) - rows
    if pad > 0:
        x2 = jnp.pad(x2, ((0, pad), (0, 0)))
    precision = lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    y = lax.dot_general(x2, w, (((1,), (contract,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
    out = [n for axis, n in enumerate(w.shape) if axis != contract]
    return y[:rows].reshape(*lead, *out)


def _block(layer_params: LayerParams, i, x, pending, cache, positions, config: LlamaConfig, inv_freq, impl):
    """Decoder block ``i`` on the residual stream ``x + pending`` (``[B', T, H]`` f32, ``B' >= cache.batch``: the
    rows past the cache's batch are padding; ``pending`` is the previous block's MLP output, or None). Writes
    the keys/values of the first ``cache.batch`` rows into ``cache``; returns ``(x, pending, cache)`` with this
    block's MLP output pending, so that its residual add joins the next norm."""
    bp, t, _ = x.shape
    b = cache.batch
    n, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    dtype, eps = layer_params.wqkv.dtype, config.rms_norm_eps
    x, h, scale = _residual_norm(x, pending, layer_params.attn_norm, eps, dtype, impl)
    qkv = _project(h, layer_params.wqkv) * scale[..., None, None]  # (B, T, K, G + 2, D)
    if layer_params.bqkv is not None:
        qkv = qkv + layer_params.bqkv.astype(jnp.float32)
    g = n // k
    q = qkv[:b, :, :, :g].reshape(b, t, n, d)  # query head n = kv head n // G, as GQA reads it
    key, value = qkv[:b, :, :, g], qkv[:b, :, :, g + 1]  # (B, T, K, D)
    q = apply_rope(q, positions, inv_freq, RopeStyle.NEOX)
    key = apply_rope(key, positions, inv_freq, RopeStyle.NEOX)
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)  # (B, K, T, D)
    q = q.astype(layer_params.wqkv.dtype)
    attn, cache = attend_write(q, key, value, cache, i, impl=impl)  # (B, T, N, D)
    if bp > b:
        attn = jnp.pad(attn, ((0, bp - b), (0, 0), (0, 0), (0, 0)))
    x, h, scale = _residual_norm(
        x, _project(attn.reshape(bp, t, n * d), layer_params.wo), layer_params.mlp_norm, eps, dtype, impl
    )
    gate_up = _project(h, layer_params.w_gate_up) * scale[..., None]  # (B, T, 2, F)
    act = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    return x, _project(act, layer_params.w_down), cache


def hidden_states(
    params: LlamaParams, cache, tokens: Int[Array, "B T"], *, config: LlamaConfig, impl: str | None = None
):
    """Final-normed hidden states ``[B, T, H]`` (f32) of ``T`` new tokens per sequence, and the advanced cache.

    Token ``t`` of sequence ``b`` sits at position ``cache.lengths[b] + t``.
    """
    t = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # (B, T)
    inv_freq = jnp.asarray(config.inv_freq(), jnp.float32)
    b = tokens.shape[0]
    bp = _padded_batch(b, t)
    x = jnp.take(params.embed, tokens, axis=0).astype(jnp.float32)  # (B, T, H)
    if bp > b:
        x = jnp.pad(x, ((0, bp - b), (0, 0), (0, 0)))
    # The step's T positions (a paged cache allocates their pages here, once for every layer).
    cache = cache.begin(t)
    if isinstance(params.layers, LayerParams):  # stacked [L, ...]: one traced block under lax.scan

        def body(carry, layer):
            layer_params, i = layer
            return _block(layer_params, i, *carry, positions, config, inv_freq, impl), None

        carry = (x, jnp.zeros_like(x), cache)
        (x, pending, cache), _ = lax.scan(body, carry, (params.layers, jnp.arange(config.num_layers)))
    else:
        pending = None
        for i, layer_params in enumerate(params.layers):
            x, pending, cache = _block(layer_params, i, x, pending, cache, positions, config, inv_freq, impl)
    _, h, scale = _residual_norm(x[:b], pending[:b], params.norm, config.rms_norm_eps, jnp.float32, impl)
    return h * scale, cache.commit()


def lm_head(params: LlamaParams, h: Float[Array, "... H"]) -> Float[Array, "... V"]:
    """Logits (f32) from final hidden states; the transposed embedding when tied."""
    if params.lm_head is None:
        return _project(h, params.embed, contract=1)
    return _project(h, params.lm_head)


def forward(params: LlamaParams, cache, tokens: Int[Array, "B T"], *, config: LlamaConfig, impl: str | None = None):
    """Logits ``[B, T, V]`` of every new token (a full causal pass when the cache starts empty), and the cache."""
    h, cache = hidden_states(params, cache, tokens, config=config, impl=impl)
    return lm_head(params, h), cache


def prefill(
    params: LlamaParams,
    cache,
    tokens: Int[Array, "B T"],
    last: Int[Array, " B"] | None = None,
    *,
    config: LlamaConfig,
    impl: str | None = None,
):
    """Run ``T`` prompt tokens per sequence (causal) and return the logits ``[B, V]`` at index ``last[b]``.

    ``last`` (default ``T - 1``) lets a right-padded ragged batch read each prompt's own last token; the caller
    then rolls the cache back to the true prompt lengths, and the padding is overwritten by later steps. Only the
    selected rows go through the LM head.
    """
    h, cache = hidden_states(params, cache, tokens, config=config, impl=impl)
    b, t, _ = h.shape
    last = jnp.full((b,), t - 1, jnp.int32) if last is None else last
    h_last = jnp.take_along_axis(h, last[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # (B, H)
    return lm_head(params, h_last), cache


def decode_step(params: LlamaParams, cache, tokens: Int[Array, " B"], *, config: LlamaConfig, impl: str | None = None):
    """One new token per sequence at its own position ``cache.lengths[b]``: logits ``[B, V]`` and the cache."""
    h, cache = hidden_states(params, cache, tokens[:, None], config=config, impl=impl)
    return lm_head(params, h[:, 0]), cache
