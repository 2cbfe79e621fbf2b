"""The Llama family's static hyperparameters (``LlamaConfig``) and the shapes of published models as presets."""

from __future__ import annotations

import dataclasses

import numpy as np

from jkv.rope import inv_frequencies, llama3_inv_frequencies


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
