"""Q8 KV cache: int8 values with one scale per 32 consecutive values along head_dim.

Format. A vector of ``D`` values (``D`` a multiple of 32) is cut into ``D // 32`` blocks of 32. Each block stores
``scale = max|x| / 127`` and ``q = round(x / scale)`` in int8 (``[-127, 127]``); ``dequantize`` returns
``q * scale``. The round trip error of every value is at most half a step of its block, ``scale / 2``.

Scales are float16 by default (llama.cpp's q8_0 stores them the same way), float32 on request: 34 bytes per 32
values instead of 36, with the same error bound (see docs/quant.md for the measured accuracy). A float16 scale is
rounded *up* from ``max|x| / 127`` so that no value of the block clips. Its range bounds what can be stored: a
block with ``max|x| > 65504 * 127`` (about 8.3e6) has no finite float16 scale, and host-side calls raise for it
(under ``jit`` its values dequantize to NaN); blocks below about 7.8e-3 get subnormal scales, still within the
bound above.

``Q8KVCache`` mirrors ``jkv.KVCache`` (same protocol, same error bits): values ``int8[L, B, K, S, D]`` and
scales ``[L, B, K, S, D // 32]`` for K and for V. ``write`` quantizes only the new positions. Its
``spec.dtype`` is the floating dtype the cache stands for: what ``dequantize`` returns.

Rotation. A ``Q8KVCache`` made by ``init`` or ``from_cache`` is ``rotated`` by default: each key and value vector
is multiplied by an orthonormal Walsh-Hadamard matrix ``H`` (``hadamard``) before it is quantized, and by ``H``
again (its own inverse) after it is dequantized. The format is unchanged (int8 codes, one scale per 32 values),
only the basis differs. Attention needs no dequantized values: ``q·k = (qH)·(kH)`` and
``Σ p v = (Σ p vH) H``, so attention rotates the query and the output instead (``jkv.attention``).
Why: a key's head vector has a few channels far larger than the rest; a block's scale follows its largest value,
so those channels make every other value of the block coarse. The rotation spreads each channel over all values,
which makes the blocks' values alike: on the default model's keys the round trip error drops 1.75x, and greedy
generation agrees with a bf16 cache's far more often (docs/quant.md, "Generation").
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Float, Int, Int8

from jkv import _checks
from jkv.cache import ERR_BAD_SLOT, ERR_WRITE_OVERFLOW, CacheSpec, KVCache, LengthsMixin

BLOCK = 32  # values sharing one scale, consecutive along head_dim
QMAX = 127  # int8 codes are symmetric: [-127, 127]
SCALE_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
DEFAULT_SCALE_DTYPE = jnp.dtype(jnp.float16)


def _scale_dtype(scale_dtype) -> jnp.dtype:
    try:
        dtype = jnp.dtype(scale_dtype)
    except TypeError as e:
        raise TypeError(f"scale_dtype must be float16 or float32, got {scale_dtype!r}") from e
    if dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be float16 or float32, got {dtype}")
    return dtype


def hadamard_block(d: int) -> int:
    """Size of the Walsh-Hadamard blocks ``hadamard`` uses for vectors of ``d`` values: the largest power of two
    that divides ``d`` (``d`` itself when it is a power of two, 32 for ``d = 96``)."""
    return d & -d


# How ``hadamard`` computes (the same matrix each way; measured on the GPU in docs/quant.md):
# "sum": products with the matrix summed along the last axis (a reduction XLA fuses with its neighbours: the
# fastest decode step); "dot": a matrix product (float32, highest precision); "butterfly": log2(n) stages of adds
# and subtracts; "auto": on a GPU "sum" up to SUM_MAX_VECTORS vectors (a decode step's queries, keys and values),
# "dot" above (a prefill's: as a reduction, XLA took minutes to compile a Llama-3-8B prefill of 1024 tokens); "dot"
# on other backends (on a CPU the sum made SmolLM2's prefill 5x slower).
HADAMARD_IMPLS = ("auto", "sum", "dot", "butterfly")
HADAMARD_IMPL = "auto"
SUM_MAX_VECTORS = 4096


@functools.cache
def _hadamard_matrix(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
        h = np.block([[h, h], [h, -h]])
    return h / np.float32(np.sqrt(n))


def hadamard(x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    """``x`` times the orthonormal Walsh-Hadamard matrix along the last axis, in float32.

    ``D`` is cut into blocks of ``hadamard_block(D)`` values, each transformed on its own (the matrix is block
    diagonal, so any ``D`` works). The matrix is symmetric and orthogonal: ``hadamard(hadamard(x)) == x`` up to
    float32 rounding, and dot products are kept. ``HADAMARD_IMPL`` picks how it is computed.
    """
    if HADAMARD_IMPL not in HADAMARD_IMPLS:
        raise ValueError(f"jkv.quant.HADAMARD_IMPL={HADAMARD_IMPL!r} is not one of {HADAMARD_IMPLS}")
    d = x.shape[-1]
    n = hadamard_block(d)
    y = x.astype(jnp.float32).reshape(*x.shape[:-1], d // n, n)
    impl = HADAMARD_IMPL
    if impl == "auto":
        gpu = jax.default_backend() == "gpu"
        impl = "sum" if gpu and x.size // d <= SUM_MAX_VECTORS else "dot"
    if impl == "sum":
        y = jnp.sum(y[..., None, :] * _hadamard_matrix(n), axis=-1)
    elif impl == "dot":
        y = jnp.einsum("...i,ij->...j", y, _hadamard_matrix(n), precision=lax.Precision.HIGHEST)
    else:
        h = 1
        while h < n:  # stage h: pairs (i, i + h) within each run of 2h values become (a + b, a - b)
            y = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
            a, b = y[..., 0, :], y[..., 1, :]
            y = jnp.stack([a + b, a - b], axis=-2).reshape(*x.shape[:-1], d // n, n)
            h *= 2
        y = y * np.float32(1 / np.sqrt(n))
    return y.reshape(x.shape)


def check_head_dim(head_dim: int) -> None:
    if head_dim % BLOCK:
        raise ValueError(f"{head_dim=} must be a multiple of {BLOCK} for the Q8 format (one scale per {BLOCK} values)")


def quantize(
    x: Float[Array, "... D"], *, scale_dtype=DEFAULT_SCALE_DTYPE
) -> tuple[Int8[Array, "... D"], Float[Array, "... D//32"]]:
    """``x [..., D]`` → ``(values int8[..., D], scales [..., D // 32])``; see the module docstring."""
    if not jnp.issubdtype(getattr(x, "dtype", None), jnp.floating):
        raise TypeError(f"x must be a floating array, got {getattr(x, 'dtype', type(x).__name__)}")
    scale_dtype = _scale_dtype(scale_dtype)
    d = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or d % BLOCK:
        raise ValueError(f"x.shape={x.shape}: the last axis must be a positive multiple of {BLOCK}")
    values, scales, finite = _quantize(x, scale_dtype)
    _checks.host_all(
        finite,
        lambda: (
            f"x holds a block with max|x| beyond what a {scale_dtype} scale can hold "
            f"({float(jnp.finfo(scale_dtype).max) * QMAX:.4g}); use scale_dtype=float32"
        ),
    )
    return values, scales


@functools.partial(jax.jit, static_argnums=1)
def _quantize(x, scale_dtype):
    """``(values, scales, ok)``: ``ok`` is false where a finite block got no finite scale."""
    d = x.shape[-1]
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], d // BLOCK, BLOCK)  # (..., D/32, 32)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    scale = amax / QMAX
    stored = scale.astype(scale_dtype)
    if scale_dtype != jnp.float32:
        # Round up, never down: with stored >= max|x| / 127 no value needs a code beyond 127.
        stored = jnp.where(_f16_value(stored) < scale, jnp.nextafter(stored, jnp.inf), stored)
        s = jnp.where(jnp.isfinite(stored), _f16_value(stored), jnp.inf)[..., None]
    else:
        s = stored[..., None]
    # An all-zero block has scale 0: its codes are 0 (dividing would give NaN).
    codes = jnp.where(s > 0, jnp.round(blocks / jnp.where(s > 0, s, 1)), 0)
    values = jnp.clip(codes, -QMAX, QMAX).astype(jnp.int8).reshape(x.shape)
    return values, stored, jnp.isfinite(stored) | ~jnp.isfinite(amax)


def _f16_value(x: Array) -> Array:
    """The float32 value of float16 ``x``, computed from its bits.

    Not ``x.astype(float32)``: XLA may drop a float32 -> float16 -> float32 round trip (its excess-precision
    rewrite, on by default on GPUs), and the rounding up above must compare the value actually stored. Inf and
    NaN come out as large finite numbers (the caller handles non-finite scales itself).
    """
    bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)
    sign = jnp.where(bits >> 15, -1.0, 1.0).astype(jnp.float32)
    exponent, mantissa = (bits >> 10) & 31, (bits & 1023).astype(jnp.float32)
    # Normal: (1024 + m) * 2^(e - 25); subnormal (e = 0): m * 2^-24. Both products are exact in float32.
    power = lax.bitcast_convert_type((jnp.maximum(exponent, 1) - 25 + 127) << 23, jnp.float32)
    return sign * jnp.where(exponent > 0, 1024.0 + mantissa, mantissa) * power


def dequantize(
    values: Int8[Array, "... D"], scales: Float[Array, "... D//32"], dtype=jnp.float32
) -> Float[Array, "... D"]:
    """``values * scales`` (each scale over its block of 32), computed in float32 and returned in ``dtype``."""
    if getattr(values, "dtype", None) != jnp.int8:
        raise TypeError(f"values must be int8, got {getattr(values, 'dtype', type(values).__name__)}")
    d = values.shape[-1] if values.ndim else 0
    if values.ndim == 0 or d % BLOCK or scales.shape != (*values.shape[:-1], d // BLOCK):
        raise ValueError(
            f"values.shape={values.shape} and scales.shape={scales.shape} do not form a Q8 pair "
            f"(scales must be values.shape[:-1] + (D // {BLOCK},))"
        )
    return _dequantize(values, scales, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=2)
def _dequantize(values, scales, dtype):
    blocks = values.astype(jnp.float32).reshape(*values.shape[:-1], values.shape[-1] // BLOCK, BLOCK)
    return (blocks * scales.astype(jnp.float32)[..., None]).reshape(values.shape).astype(dtype)


def _rotated(rotated) -> bool:
    if not isinstance(rotated, (bool, np.bool_)):
        raise TypeError(f"rotated must be a bool, got {rotated!r}")
    return bool(rotated)


def encode(k: Array, v: Array, scale_dtype, rotated: bool) -> tuple[Array, ...]:
    """Keys and values ``[..., D]`` as ``(k codes, k scales, v codes, v scales)``: ``quantize``, after
    ``hadamard`` when ``rotated``."""
    if rotated:
        k, v = hadamard(k), hadamard(v)
    return (*quantize(k, scale_dtype=scale_dtype), *quantize(v, scale_dtype=scale_dtype))


def decode(arrays, dtype, rotated: bool) -> tuple[Array, Array]:
    """``(k codes, k scales, v codes, v scales)`` back to keys and values in ``dtype`` (``encode``'s inverse up
    to the format's rounding)."""
    k, k_scale, v, v_scale = arrays
    if not rotated:
        return dequantize(k, k_scale, dtype), dequantize(v, v_scale, dtype)
    k, v = dequantize(k, k_scale, jnp.float32), dequantize(v, v_scale, jnp.float32)
    return hadamard(k).astype(dtype), hadamard(v).astype(dtype)


def check_same_storage(name: str, cache, scale_dtype, rotated: bool) -> None:
    """``cache`` (Q8 codes to be copied into another Q8 cache) must have the same scale dtype and basis."""
    if cache.scale_dtype != scale_dtype:
        raise ValueError(f"{name} has scale_dtype={cache.scale_dtype}, expected {scale_dtype}")
    if cache.rotated != rotated:
        raise ValueError(
            f"{name} has rotated={cache.rotated}, expected {rotated}: its codes are in another basis "
            f"(dequantize it and quantize into this cache instead)"
        )


@jax.jit
def _write(cache: Q8KVCache, layer, k_new, v_new, ok) -> Q8KVCache:
    """``Q8KVCache.write`` after validation (jitted: one dispatch when called eagerly; ``layer`` is traced)."""
    # As in KVCache.write: an in-place scatter with mode="drop"; a refused sequence gets out-of-range positions,
    # so its write drops entirely. Only the T new positions are quantized.
    t = k_new.shape[2]
    positions = jnp.where(ok[:, None], cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32), cache.max_len)
    rows = jnp.arange(cache.batch)[:, None]  # (B, 1) against positions (B, T)

    def put(buf, new):  # new (B, K, T, X) → indexed as (B, T, K, X)
        return buf.at[layer, rows, :, positions, :].set(jnp.swapaxes(new, 1, 2), mode="drop")

    kq, ks, vq, vs = encode(k_new, v_new, cache.scale_dtype, cache.rotated)  # traced: no host check
    return cache.replace(
        k=put(cache.k, kq),
        k_scale=put(cache.k_scale, ks),
        v=put(cache.v, vq),
        v_scale=put(cache.v_scale, vs),
        errors=cache.errors | jnp.where(ok, 0, ERR_WRITE_OVERFLOW),
    )


def bytes_per_token(spec: CacheSpec, scale_dtype=DEFAULT_SCALE_DTYPE) -> int:
    """K + V bytes of one position of one sequence across all layers in the Q8 format."""
    check_head_dim(spec.head_dim)
    per_vector = spec.head_dim + spec.head_dim // BLOCK * _scale_dtype(scale_dtype).itemsize
    return 2 * spec.num_layers * spec.num_kv_heads * per_vector


class Q8Snapshot(NamedTuple):
    """A Q8 cache copied to host memory; ``k``/``v`` and their scales may be trimmed to the longest length."""

    k: np.ndarray  # int8[L, B, K, S', D]
    k_scale: np.ndarray  # [L, B, K, S', D // 32]
    v: np.ndarray  # int8[L, B, K, S', D]
    v_scale: np.ndarray  # [L, B, K, S', D // 32]
    lengths: np.ndarray  # int32[B]
    errors: np.ndarray  # int32[B]
    max_len: int
    dtype: str  # the cache's spec.dtype
    rotated: bool = False  # codes hold Hadamard-rotated vectors (Q8KVCache.rotated)


@struct.dataclass
class Q8KVCache(LengthsMixin):
    """Q8 cache for ``L`` layers and ``B`` sequences; same protocol and error bits as ``jkv.KVCache``."""

    k: Int8[Array, "L B K S D"]
    k_scale: Float[Array, "L B K S D//32"]
    v: Int8[Array, "L B K S D"]
    v_scale: Float[Array, "L B K S D//32"]
    # Arrays (not static fields) so that changing them never recompiles a step.
    lengths: Int[Array, " B"]
    errors: Int[Array, " B"]
    dtype: Any = struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))  # what dequantize returns
    # The codes hold hadamard(k), hadamard(v) (module docstring); init and from_cache set it by default.
    rotated: bool = struct.field(pytree_node=False, default=False)

    # ------------------------------------------------------------------ construction and shape
    @classmethod
    def init(cls, spec: CacheSpec, batch: int, *, scale_dtype=DEFAULT_SCALE_DTYPE, rotated: bool = True) -> Q8KVCache:
        """A cache of ``batch`` empty sequences (codes and scales zero; only ``lengths`` decides validity).

        ``rotated``: quantize Hadamard-rotated vectors (the module docstring; more accurate, same bytes)."""
        if not isinstance(spec, CacheSpec):
            raise TypeError(f"spec must be a jkv.CacheSpec, got {type(spec).__name__}")
        _checks.positive_int("batch", batch)
        check_head_dim(spec.head_dim)
        shape = (spec.num_layers, batch, spec.num_kv_heads, spec.max_len, spec.head_dim)
        scale_shape = (*shape[:-1], spec.head_dim // BLOCK)
        scale_dtype = _scale_dtype(scale_dtype)
        return cls(
            k=jnp.zeros(shape, jnp.int8),
            k_scale=jnp.zeros(scale_shape, scale_dtype),
            v=jnp.zeros(shape, jnp.int8),
            v_scale=jnp.zeros(scale_shape, scale_dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            errors=jnp.zeros((batch,), jnp.int32),
            dtype=spec.dtype,
            rotated=_rotated(rotated),
        )

    @classmethod
    def from_cache(cls, cache: KVCache, *, scale_dtype=DEFAULT_SCALE_DTYPE, rotated: bool = True) -> Q8KVCache:
        """Quantize every position of a ``KVCache`` (lengths and error bits are kept)."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        check_head_dim(cache.spec.head_dim)
        k, k_scale, v, v_scale = encode(cache.k, cache.v, scale_dtype, _rotated(rotated))
        return cls(k, k_scale, v, v_scale, cache.lengths, cache.errors, dtype=cache.spec.dtype, rotated=rotated)

    @property
    def spec(self) -> CacheSpec:
        num_layers, _, num_kv_heads, max_len, head_dim = self.k.shape
        return CacheSpec(num_layers, num_kv_heads, head_dim, max_len, self.dtype)

    @property
    def scale_dtype(self) -> jnp.dtype:
        return self.k_scale.dtype

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Device bytes held by the cache (codes, scales, lengths and error bits)."""
        arrays = (self.k, self.k_scale, self.v, self.v_scale, self.lengths, self.errors)
        return sum(int(x.size) * x.dtype.itemsize for x in arrays)

    # ------------------------------------------------------------------ reading
    def dequantize_layer(self, layer, dtype=None) -> tuple[Float[Array, "B K S D"], Float[Array, "B K S D"]]:
        """Keys and values of ``layer``, dequantized (every position, valid or not) to ``dtype`` (default
        ``spec.dtype``)."""
        _checks.layer_index(layer, self.spec.num_layers)
        dtype = self.dtype if dtype is None else dtype
        arrays = (self.k[layer], self.k_scale[layer], self.v[layer], self.v_scale[layer])
        return decode(arrays, dtype, self.rotated)

    def dequantize(self, dtype=None) -> KVCache:
        """The whole cache as a ``KVCache`` of ``dtype`` (default ``spec.dtype``), lengths and errors kept."""
        dtype = self.dtype if dtype is None else dtype
        k, v = decode((self.k, self.k_scale, self.v, self.v_scale), dtype, self.rotated)
        return KVCache(k=k, v=v, lengths=self.lengths, errors=self.errors)

    # ------------------------------------------------------------------ updates
    def write(self, layer, k_new: Array, v_new: Array, *, reserved: bool = False) -> Q8KVCache:
        """Quantize ``k_new``/``v_new`` ``[B, K, T, D]`` of ``layer`` into positions ``lengths[b] .. +T``.

        Same protocol as ``KVCache.write``: lengths do not move (``advance(T)`` after the last layer); a sequence
        whose write would pass ``max_len`` is left untouched and gets ``ERR_WRITE_OVERFLOW`` (host calls raise).
        ``reserved`` is ignored, as for ``KVCache``.
        """
        del reserved
        return _write(self, layer, k_new, v_new, self._check_write(layer, k_new, v_new))

    def insert_into_slot(self, slot, single: Q8KVCache) -> Q8KVCache:
        """Scatter a one-sequence Q8 cache into batch slot ``slot`` (as ``KVCache.insert_into_slot``)."""
        if not isinstance(single, Q8KVCache):
            raise TypeError(f"single must be a Q8KVCache, got {type(single).__name__}")
        _checks.same_layout("single", single.spec, self.spec)
        check_same_storage("single", single, self.scale_dtype, self.rotated)
        if single.batch != 1:
            raise ValueError(f"single must hold one sequence, got batch={single.batch}")
        if single.max_len > self.max_len:
            raise ValueError(f"single.max_len={single.max_len} exceeds this cache's max_len={self.max_len}")
        ok = self._slot_ok(slot)
        idx = jnp.where(ok, slot, self.batch)  # out of range under jit: dropped by the scatter, and flagged
        m = single.max_len

        def put(buf, new):
            return buf.at[:, idx, :, :m, :].set(new[:, 0], mode="drop")

        hit = jnp.arange(self.batch) == idx
        return self.replace(
            k=put(self.k, single.k),
            k_scale=put(self.k_scale, single.k_scale),
            v=put(self.v, single.v),
            v_scale=put(self.v_scale, single.v_scale),
            lengths=jnp.where(hit, single.lengths[0], self.lengths),
            errors=jnp.where(hit, single.errors[0], self.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def extract_slot(self, slot, max_len: int | None = None) -> Q8KVCache:
        """The one-sequence cache held in ``slot`` (first ``max_len`` positions; default all)."""
        max_len = self._check_extract(slot, max_len)

        def take(buf):
            shape = (buf.shape[0], 1, buf.shape[2], max_len, buf.shape[4])
            return lax.dynamic_slice(buf, (0, slot, 0, 0, 0), shape)

        length = lax.dynamic_slice(self.lengths, (slot,), (1,))
        return Q8KVCache(
            k=take(self.k),
            k_scale=take(self.k_scale),
            v=take(self.v),
            v_scale=take(self.v_scale),
            lengths=jnp.minimum(length, max_len),
            errors=lax.dynamic_slice(self.errors, (slot,), (1,)),
            dtype=self.dtype,
            rotated=self.rotated,
        )

    # ------------------------------------------------------------------ host round trip
    def snapshot(self, trim: bool = True) -> Q8Snapshot:
        """Copy to host NumPy (codes and scales as stored). With ``trim`` only the first ``max(lengths)``
        positions are kept."""
        lengths = np.asarray(self.lengths)
        keep = max(int(lengths.max(initial=0)), 1) if trim else self.max_len
        host = lambda buf: np.asarray(buf[:, :, :, :keep])
        return Q8Snapshot(
            k=host(self.k),
            k_scale=host(self.k_scale),
            v=host(self.v),
            v_scale=host(self.v_scale),
            lengths=lengths.copy(),
            errors=np.asarray(self.errors).copy(),
            max_len=self.max_len,
            dtype=self.dtype.name,
            rotated=self.rotated,
        )

    @classmethod
    def restore(cls, snap: Q8Snapshot, max_len: int | None = None) -> Q8KVCache:
        """Rebuild a device cache from ``snapshot()``; bit-exact on the codes and scales the snapshot kept."""
        if not isinstance(snap, Q8Snapshot):
            raise TypeError(f"snap must be a Q8Snapshot, got {type(snap).__name__}")
        max_len = snap.max_len if max_len is None else max_len
        kept = snap.k.shape[3]
        if kept > max_len or int(snap.lengths.max(initial=0)) > max_len:
            raise ValueError(f"snapshot holds {kept} positions (lengths {snap.lengths}), above {max_len=}")
        pad = [(0, 0)] * 3 + [(0, max_len - kept), (0, 0)]
        device = lambda buf: jnp.asarray(np.pad(buf, pad))
        return cls(
            k=device(snap.k),
            k_scale=device(snap.k_scale),
            v=device(snap.v),
            v_scale=device(snap.v_scale),
            lengths=jnp.asarray(snap.lengths, jnp.int32),
            errors=jnp.asarray(snap.errors, jnp.int32),
            dtype=jnp.dtype(snap.dtype),
            rotated=bool(snap.rotated),
        )
