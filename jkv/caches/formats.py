"""Storage formats: how one key or value vector of ``D`` values is stored in a cache.

A format is a small frozen (hashable) object: it names its stored arrays and their dtypes and trailing widths,
encodes new K/V into them, decodes them back, says how many bytes a token takes, and gives attention the basis
hooks (a rotated format stores ``x H``: attention moves ``q`` into that basis and the output back, so no layer
is ever rotated back). Layouts (``contiguous``, ``paged``) store every array alike as ``[..., X]``; nothing else
in jkv knows what a format holds. The arithmetic lives in ``pallas_kernels.formats`` (shared with the kernels).

Formats: ``Plain()`` (the spec's floating dtype: bf16 / f16 / f32), ``Q8()`` (int8 + a float16 or float32 scale
per 32 values, Hadamard-rotated by default; docs/quant.md), ``FP8()`` (float8_e4m3fn + a float32 scale per
token and kv head; error per value at most ``|x| / 16 + max|x| / (448 * 1024)``). docs/adding-a-format.md.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jkv.caches import checks
from pallas_kernels import formats as kf

BLOCK = kf.Q8_BLOCK
SCALE_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


class Format(abc.ABC):
    """How K/V vectors are stored. Subclasses are final frozen dataclasses (hashable: a jit static)."""

    names: ClassVar[tuple[str, ...]]  # the stored arrays, K's then V's

    @abc.abstractmethod
    def arrays(self, spec) -> tuple[tuple[Any, int], ...]:
        """``(dtype, trailing width)`` of each stored array for vectors of ``spec.head_dim`` values."""

    @abc.abstractmethod
    def encode_checked(self, k: Float[Array, "... D"], v: Float[Array, "... D"]) -> tuple[tuple[Array, ...], Array]:
        """New keys and values as the stored arrays ``[..., X]`` (in the stored basis), in ``names`` order, and
        ``fits [...]`` per vector: false where a finite value was beyond the format's range (stored saturated)."""

    def encode(self, k: Float[Array, "... D"], v: Float[Array, "... D"]) -> tuple[Array, ...]:
        """``encode_checked`` without the range flags."""
        return self.encode_checked(k, v)[0]

    @abc.abstractmethod
    def decode(self, arrays, dtype) -> tuple[Array, Array]:
        """Keys and values ``[..., D]`` in ``dtype`` from the stored arrays, in the stored basis."""

    def check(self, spec) -> None:
        """Raise ``ValueError`` when ``spec`` cannot be stored in this format (every spec fits by default)."""
        del spec

    def to_stored(self, x: Array) -> Array:
        """``x`` in the stored basis (queries before attention)."""
        return x

    def from_stored(self, x: Array) -> Array:
        """``x`` back from the stored basis (attention outputs, decoded layers)."""
        return x

    def read(self, arrays, dtype, *, stored: bool, ok) -> tuple[Array, Array]:
        """A layer's keys and values in ``dtype`` from its stored arrays, back from the stored basis unless
        ``stored``; NaN where ``ok`` is false (a layer index out of range under ``jit``)."""
        k, v = self.decode(arrays, dtype)
        if not stored:
            k, v = self.from_stored(k).astype(dtype), self.from_stored(v).astype(dtype)
        return jnp.where(ok, k, jnp.nan), jnp.where(ok, v, jnp.nan)

    def bytes_per_token(self, spec) -> int:
        """Bytes of one position of one sequence across all layers, K and V."""
        per_head = sum(jnp.dtype(dtype).itemsize * width for dtype, width in self.arrays(spec))
        return spec.num_layers * spec.num_kv_heads * per_head


@dataclasses.dataclass(frozen=True)
class Plain(Format):
    """K and V as they are, in the cache spec's floating dtype."""

    names: ClassVar = ("k", "v")
    dtype: Any = None  # stored dtype; None: the spec's

    def arrays(self, spec):
        dtype = spec.dtype if self.dtype is None else jnp.dtype(self.dtype)
        return ((dtype, spec.head_dim),) * 2

    def encode_checked(self, k, v):
        dtype = k.dtype if self.dtype is None else self.dtype
        if jnp.finfo(dtype).maxexp >= jnp.finfo(k.dtype).maxexp:  # same exponent range: no check, no operation
            return (k.astype(dtype), v.astype(dtype)), jnp.ones(k.shape[:-1], bool)
        top = float(jnp.finfo(dtype).max)
        over = lambda x: jnp.any(jnp.isfinite(x) & (jnp.abs(x) > top), axis=-1)
        return (k.astype(dtype), v.astype(dtype)), ~(over(k) | over(v))

    def decode(self, arrays, dtype):
        k, v = arrays
        return k.astype(dtype), v.astype(dtype)

    def __str__(self):
        return "plain"


@dataclasses.dataclass(frozen=True)
class Q8(Format):
    """int8 codes with one scale per 32 values along D (``pallas_kernels.formats``). ``rotated``: the codes hold
    Hadamard-rotated vectors (1.75x lower key error on the default model, same bytes; docs/quant.md).
    ``hadamard_impl``: how the rotation is computed (the same matrix each way)."""

    names: ClassVar = ("k", "k_scale", "v", "v_scale")
    scale_dtype: Any = "float16"  # or "float32"
    rotated: bool = True
    hadamard_impl: str = "auto"

    def __post_init__(self):
        try:
            dtype = jnp.dtype(self.scale_dtype)
        except TypeError as e:
            raise TypeError(f"scale_dtype must be float16 or float32, got {self.scale_dtype!r}") from e
        if dtype not in SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be float16 or float32, got {dtype}")
        if not isinstance(self.rotated, bool):
            raise TypeError(f"rotated must be a bool, got {self.rotated!r}")
        if self.hadamard_impl not in kf.HADAMARD_IMPLS:
            raise ValueError(f"hadamard_impl={self.hadamard_impl!r} is not one of {kf.HADAMARD_IMPLS}")
        object.__setattr__(self, "scale_dtype", dtype)

    def check(self, spec):
        if spec.head_dim % BLOCK:
            raise ValueError(f"head_dim={spec.head_dim} must be a multiple of {BLOCK} for the Q8 format")

    def arrays(self, spec):
        scales = (self.scale_dtype, spec.head_dim // BLOCK)
        return ((jnp.dtype(jnp.int8), spec.head_dim), scales) * 2

    def encode_checked(self, k, v):
        kq, ks, k_ok = kf.quantize_q8(self.to_stored(k), self.scale_dtype)
        vq, vs, v_ok = kf.quantize_q8(self.to_stored(v), self.scale_dtype)
        return (kq, ks, vq, vs), jnp.all(k_ok & v_ok, axis=-1)

    def decode(self, arrays, dtype):
        k, ks, v, vs = arrays
        return kf.dequantize_q8(k, ks, dtype), kf.dequantize_q8(v, vs, dtype)

    def to_stored(self, x):
        return kf.hadamard(x, self.hadamard_impl).astype(x.dtype) if self.rotated else x

    def from_stored(self, x):
        return self.to_stored(x)  # the rotation is its own inverse

    def __str__(self):
        return f"q8({self.scale_dtype.name} scales{', rotated' if self.rotated else ''})"


@dataclasses.dataclass(frozen=True)
class FP8(Format):
    """float8_e4m3fn values with one float32 scale per vector (token and kv head): ``max|x| / 448``. Each
    value's error is at most ``|x| / 16 + scale / 1024`` (3 mantissa bits; e4m3's subnormal step)."""

    names: ClassVar = ("k", "k_scale", "v", "v_scale")

    def arrays(self, spec):
        return ((kf.FP8_DTYPE, spec.head_dim), (jnp.dtype(jnp.float32), 1)) * 2

    def encode_checked(self, k, v):
        # A float32 scale holds any finite float32 vector's max / 448: every vector fits.
        return (*kf.quantize_fp8(k), *kf.quantize_fp8(v)), jnp.ones(k.shape[:-1], bool)

    def decode(self, arrays, dtype):
        k, ks, v, vs = arrays
        return kf.dequantize_fp8(k, ks, dtype), kf.dequantize_fp8(v, vs, dtype)

    def __str__(self):
        return "fp8"


def quantize(x: Float[Array, "... D"], *, scale_dtype=jnp.float16):
    """``x [..., D]`` -> ``(codes int8[..., D], scales [..., D // 32])`` in the Q8 format (not rotated); host
    values beyond a float16 scale's range raise (use ``scale_dtype=float32``)."""
    if not jnp.issubdtype(getattr(x, "dtype", None), jnp.floating):
        raise TypeError(f"x must be a floating array, got {getattr(x, 'dtype', type(x).__name__)}")
    fmt = Q8(scale_dtype=scale_dtype, rotated=False)
    if x.ndim == 0 or x.shape[-1] % BLOCK:
        raise ValueError(f"x.shape={x.shape}: the last axis must be a positive multiple of {BLOCK}")
    codes, scales, ok = _quantize(x, fmt.scale_dtype)
    checks.host_all(
        ok,
        lambda: (
            f"x holds a block with max|x| beyond what a {fmt.scale_dtype} scale can hold "
            f"({float(jnp.finfo(fmt.scale_dtype).max) * kf.Q8_MAX:.4g}); use scale_dtype=float32"
        ),
    )
    return codes, scales


_quantize = jax.jit(kf.quantize_q8, static_argnums=1)


def dequantize(codes, scales, dtype=jnp.float32):
    """``codes * scales`` (each scale over its block of 32 values), returned in ``dtype``."""
    if getattr(codes, "dtype", None) != jnp.int8:
        raise TypeError(f"values must be int8, got {getattr(codes, 'dtype', type(codes).__name__)}")
    d = codes.shape[-1] if codes.ndim else 0
    if codes.ndim == 0 or d % BLOCK or scales.shape != (*codes.shape[:-1], d // BLOCK):
        raise ValueError(
            f"values.shape={codes.shape} and scales.shape={scales.shape} do not form a Q8 pair "
            f"(scales must be values.shape[:-1] + (D // {BLOCK},))"
        )
    return jax.jit(kf.dequantize_q8, static_argnums=2)(codes, scales, jnp.dtype(dtype))


def bind(format: Format, spec) -> Format:
    """``format`` made concrete for ``spec`` (a ``Plain()`` stores the spec's dtype), after checking it fits."""
    if not isinstance(format, Format):
        raise TypeError(f"format must be a jkv.caches.formats.Format, got {type(format).__name__}")
    format.check(spec)
    if isinstance(format, Plain) and format.dtype is None:
        return Plain(spec.dtype)
    return format
