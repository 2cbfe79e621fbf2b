"""The Llama family's static hyperparameters (``LlamaConfig``) and the shapes of published models as presets."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jkv.rope import inv_frequencies, llama3_inv_frequencies

# The MLP's gate activations by ``LlamaConfig.activation`` name: SiLU, and GELU's tanh approximation (Gemma)
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


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
    # Family options (docs/model.md); the defaults are Llama's, and each is static, so Llama traces as before.
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm of each query and key head before rope
    windows: tuple[int | None, ...] | None = None  # per layer: a query sees its last `window` positions; None: all
    attn_softcap: float | None = None  # Gemma 2: attention scores capped as c * tanh(s / c)
    final_softcap: float | None = None  # Gemma 2: logits capped the same way
    query_scale: float | None = None  # score scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    sandwich_norms: bool = False  # Gemma 2/3: a norm after each sub-block too, before the residual add
    activation: str = "silu"  # MLP gate: "silu" or "gelu_tanh" (Gemma)
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size), rounded to the weight dtype
    rope_local_theta: float | None = None  # Gemma 3: rope base of windowed layers (unscaled); None: rope_theta

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
        if self.windows is not None:
            if not isinstance(self.windows, tuple) or len(self.windows) != self.num_layers:
                raise ValueError(f"LlamaConfig.windows must be a tuple of num_layers={self.num_layers} entries")
            for w in self.windows:
                if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
                    raise ValueError(f"LlamaConfig.windows holds {w!r}, expected a positive int or None")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LlamaConfig.activation={self.activation!r} is not one of {tuple(ACTIVATIONS)}")
        for name in ("attn_softcap", "final_softcap", "query_scale", "embed_scale", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"LlamaConfig.{name} must be a positive number or None, got {value!r}")

    def window(self, i) -> int | None:
        """Layer ``i``'s attention window (None: full). ``i`` may be traced (``lax.scan``) only when every layer
        has the same window and rope (``uniform_layers``)."""
        if self.windows is None:
            return None
        if self.uniform_layers:
            return self.windows[0]
        return self.windows[int(i)]

    def local_rope(self, i) -> bool:
        """Whether layer ``i`` rotates with ``rope_local_theta`` (a windowed layer of a model that has one)."""
        return self.rope_local_theta is not None and self.window(i) is not None

    @property
    def uniform_layers(self) -> bool:
        """Every layer has the same window and rope, so one traced block (``lax.scan``) serves them all."""
        if self.windows is None:
            return True
        if len(set(self.windows)) > 1:
            return False
        return self.rope_local_theta is None or self.windows[0] is None

    @property
    def qkv_shape(self) -> tuple[int, int, int]:
        """Shape of the fused q/k/v projection's output axes: ``(K, G + 2, D)``."""
        return (self.num_kv_heads, self.num_heads // self.num_kv_heads + 2, self.head_dim)

    @property
    def qkv_size(self) -> int:
        """Width of the fused q/k/v projection: ``(N + 2K) * D``."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def inv_freq(self, local: bool = False) -> np.ndarray:
        """Rotary inverse frequencies ``[D/2]`` (float64 on the host), with Llama 3.1 / linear scaling applied;
        ``local``: those of ``rope_local_theta``, unscaled (Gemma 3's windowed layers)."""
        if local:
            return inv_frequencies(self.head_dim, self.rope_local_theta)
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
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        per_layer += 2 * h if self.sandwich_norms else 0
        return v * h + n_layers * per_layer + h + (0 if self.tie_embeddings else h * v)

    # ------------------------------------------------------------------ presets (shapes of published models)
    @classmethod
    def from_name(cls, name: str) -> LlamaConfig:
        """The preset ``name`` (one of ``PRESETS``)."""
        if name not in PRESETS:
            raise ValueError(f"no LlamaConfig preset named {name!r}; presets: {sorted(PRESETS)}")
        return getattr(cls, PRESETS[name])()

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


# Preset name -> the LlamaConfig classmethod that builds it.
PRESETS = {"smollm2-135m": "smollm2_135m", "llama3-8b": "llama3_8b", "qwen2-0.5b": "qwen2_0_5b"}
