"""Q8 pages: the paged KV cache (``jkv.paged``) with its pools in the Q8 format of ``jkv.quant``.

Pools: int8 codes ``k_pages``, ``v_pages`` ``[L, P, K, page_size, D]`` and their scales ``k_scale_pages``,
``v_scale_pages`` ``[L, P, K, page_size, D // 32]`` (float16 by default, one per 32 values along head_dim). A page
is therefore ``D + D // 32 * 2`` bytes per position and kv head instead of ``2 * D`` in bf16: 0.53x at D = 128.

Everything else is ``PagedKVCache``'s, unchanged: block tables, the refcounted allocator, copy-on-write, fork,
pin / unpin, rollback. The allocator moves and copies pages of all four pools alike; this module only says what
the pools hold (the pool-storage hooks of ``PagedKVCache``). ``write`` quantizes only the new positions (each
vector on its own, so a position's codes do not depend on its page or its neighbours: the same writes give the
same codes as a ``Q8KVCache``).

The contiguous counterpart of Q8 pages is ``Q8KVCache``: ``to_contiguous``, ``extract_slot`` and ``read_pinned``
return one (codes and scales as stored: exact, and what a prefill that continues from a pinned prefix must see so
that a prefix hit computes what a miss computes); ``from_contiguous`` and ``insert_into_slot`` take one, or a
float ``KVCache``, which they quantize. ``dequantize()`` gives the logical contents as a float ``KVCache``;
``gather_layer`` dequantizes one layer for the XLA reference attention.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

from jkv import _checks, quant
from jkv.cache import CacheSpec, KVCache
from jkv.paged import PagedKVCache
from jkv.quant import BLOCK, DEFAULT_SCALE_DTYPE, Q8KVCache, Q8Snapshot


@struct.dataclass
class Q8PagedKVCache(PagedKVCache):
    """Paged KV cache with int8 pages and float16 (or float32) scales; the API and guarantees of
    ``PagedKVCache``. ``k_pages``/``v_pages`` hold int8 codes; ``spec.dtype`` is what dequantizing returns."""

    k_scale_pages: Float[Array, "L P K page D//32"]
    v_scale_pages: Float[Array, "L P K page D//32"]
    dtype: Any = struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))  # what dequantize returns
    rotated: bool = struct.field(pytree_node=False, default=False)  # codes of Hadamard-rotated vectors (jkv.quant)

    @classmethod
    def init(
        cls,
        spec: CacheSpec,
        batch: int,
        *,
        page_size: int,
        num_pages: int | None = None,
        scale_dtype=DEFAULT_SCALE_DTYPE,
        rotated: bool = True,
    ) -> Q8PagedKVCache:
        """As ``PagedKVCache.init``, with Q8 pools (``spec.head_dim`` a multiple of 32; codes and scales zero).
        ``rotated`` as for ``Q8KVCache.init``: vectors are Hadamard-rotated before they are quantized."""
        return super().init(
            spec, batch, page_size=page_size, num_pages=num_pages, scale_dtype=scale_dtype, rotated=rotated
        )

    @property
    def spec(self) -> CacheSpec:
        num_layers, _, num_kv_heads, _, head_dim = self.k_pages.shape
        return CacheSpec(num_layers, num_kv_heads, head_dim, self.max_len, self.dtype)

    @property
    def scale_dtype(self) -> jnp.dtype:
        return self.k_scale_pages.dtype

    def dequantize(self, dtype=None) -> KVCache:
        """The logical contents as a float ``KVCache`` of ``dtype`` (default ``spec.dtype``)."""
        return self.to_contiguous().dequantize(dtype)

    # ------------------------------------------------------------------ pool storage hooks (see PagedKVCache)
    @classmethod
    def _empty_pools(cls, spec: CacheSpec, shape, scale_dtype=DEFAULT_SCALE_DTYPE, rotated=True) -> dict[str, Any]:
        quant.check_head_dim(spec.head_dim)
        # Four distinct buffers, not one zeros array twice: a step that donates the cache donates each once.
        scales = (*shape[:-1], spec.head_dim // BLOCK)
        scale_dtype = quant._scale_dtype(scale_dtype)
        return {
            "k_pages": jnp.zeros(shape, jnp.int8),
            "v_pages": jnp.zeros(shape, jnp.int8),
            "k_scale_pages": jnp.zeros(scales, scale_dtype),
            "v_scale_pages": jnp.zeros(scales, scale_dtype),
            "dtype": spec.dtype,
            "rotated": quant._rotated(rotated),
        }

    def _pools(self) -> tuple[Array, ...]:
        return self.k_pages, self.k_scale_pages, self.v_pages, self.v_scale_pages

    def _with_pools(self, pools) -> Q8PagedKVCache:
        k, k_scale, v, v_scale = pools
        return self.replace(k_pages=k, k_scale_pages=k_scale, v_pages=v, v_scale_pages=v_scale)

    def _encode(self, k: Array, v: Array) -> tuple[Array, ...]:
        return quant.encode(k, v, self.scale_dtype, self.rotated)

    def _decode(self, arrays, dtype=None) -> tuple[Array, Array]:
        return quant.decode(arrays, self.dtype if dtype is None else dtype, self.rotated)

    @classmethod
    def _storage_of(cls, cache) -> dict:
        if isinstance(cache, Q8KVCache):
            return {"scale_dtype": cache.scale_dtype, "rotated": cache.rotated}
        if isinstance(cache, KVCache):
            return {}
        raise TypeError(f"cache must be a Q8KVCache or a KVCache, got {type(cache).__name__}")

    @classmethod
    def _restore_contiguous(cls, snap):
        if not isinstance(snap, Q8Snapshot):
            raise TypeError(f"snap must be a Q8Snapshot, got {type(snap).__name__}")
        return Q8KVCache.restore(snap)

    def _contiguous_arrays(self, name: str, cache) -> tuple[Array, ...]:
        if not isinstance(cache, (Q8KVCache, KVCache)):
            raise TypeError(f"{name} must be a Q8KVCache or a KVCache, got {type(cache).__name__}")
        _checks.same_layout(name, cache.spec, self.spec)
        if isinstance(cache, KVCache):  # a float cache: quantized here, every position
            return self._encode(cache.k, cache.v)
        quant.check_same_storage(name, cache, self.scale_dtype, self.rotated)
        return cache.k, cache.k_scale, cache.v, cache.v_scale

    def _contiguous(self, arrays, lengths: Array, errors: Array) -> Q8KVCache:
        k, k_scale, v, v_scale = arrays
        return Q8KVCache(k, k_scale, v, v_scale, lengths, errors, dtype=self.dtype, rotated=self.rotated)
