"""The contiguous layout: every stored array of the format is ``[L, B, K, S, X]`` (layers, batch, kv heads,
positions, the format's trailing width), so each ``(layer, b, kv_head)`` slab is one contiguous run a decode kernel
reads coalesced. One final class for every format; the step protocol is ``jkv.caches.base``'s."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int

from jkv.caches import checks, snapshot
from jkv.caches.base import ERR_BAD_SLOT, Cache, CacheSpec
from jkv.caches.formats import Format, Plain, bind
from jkv.caches.sharding import DP, TP


@struct.dataclass
class KVCache(Cache):
    """Contiguous KV cache of ``B`` sequences in any format (``KVCache.init(spec, batch, format=jkv.Q8())``)."""

    data: tuple[Array, ...]  # the format's arrays, [L, B, K, S, X] each, in format.names order
    # Arrays (not static fields) so that changing them never recompiles a step.
    lengths: Int[Array, " B"]
    counts: Int[Array, " B"]
    errors: Int[Array, " B"]
    spec: CacheSpec = struct.field(pytree_node=False)
    format: Format = struct.field(pytree_node=False)

    layout = "contiguous"

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(cls, spec: CacheSpec, batch: int, *, format: Format | None = None) -> KVCache:
        """``batch`` empty sequences. Buffers are zero-filled; only ``lengths`` decides validity. ``ValueError``
        before allocating when the arrays cannot exist (element count overflow, beyond the devices' memory)."""
        if not isinstance(spec, CacheSpec):
            raise TypeError(f"spec must be a jkv.CacheSpec, got {type(spec).__name__}")
        checks.positive_int("batch", batch)
        format = bind(Plain() if format is None else format, spec)
        lead = (spec.num_layers, batch, spec.num_kv_heads, spec.max_len)
        shapes = [((*lead, width), dtype) for dtype, width in format.arrays(spec)]
        checks.allocation(shapes, f"a {format} cache of {batch=} and {spec}")
        # Distinct buffers, not one zeros array twice: a step that donates the cache donates each once.
        data = tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes)
        zeros = lambda: jnp.zeros((batch,), jnp.int32)
        return cls(data, zeros(), zeros(), zeros(), spec=spec, format=format)

    def with_format(self, format: Format) -> KVCache:
        """Every position re-stored in ``format`` (e.g. ``Q8()`` to quantize a float cache, ``Plain()`` to
        dequantize one); lengths, counts and errors kept."""
        format = bind(format, self.spec)
        return self.replace(data=convert(self.data, self.format, format, self.spec.dtype), format=format)

    # ------------------------------------------------------------------ step
    def begin(self, counts) -> KVCache:
        counts, _, bits = self._declare(counts)
        return self.replace(counts=counts, errors=self.errors | bits)

    def write(self, layer, k: Array, v: Array) -> KVCache:
        layer, slot, positions, errors = self.write_plan(layer, k, v)
        new, range_errors = self.encode_new(k, v, slot, positions)

        # A scatter with mode="drop" updates in place under donation; dropped positions are max_len.
        def put(buf, x):  # buf[layer, slot, :, positions, :] is (N, K, X), as x
            return buf.at[layer, slot, :, positions, :].set(x.astype(buf.dtype), mode="drop")

        data = tuple(put(buf, x) for buf, x in zip(self.data, new, strict=True))
        return self.replace(data=data, errors=self.errors | errors | range_errors)

    def rollback(self, lengths) -> KVCache:
        lengths, errors = self._rolled(lengths)
        return self.replace(lengths=lengths, counts=jnp.zeros_like(self.counts), errors=errors)

    # ------------------------------------------------------------------ slots
    def reset(self) -> KVCache:
        # Three buffers, not one zeros array thrice: a step that donates the cache donates each once.
        zeros = lambda: jnp.zeros_like(self.lengths)
        return self.replace(lengths=zeros(), counts=zeros(), errors=zeros())

    def reset_slot(self, slot) -> KVCache:
        slot, ok = checks.index_in_range("slot", slot, self.batch)
        keep = ~((jnp.arange(self.batch) == slot) & ok)
        return self.replace(
            lengths=jnp.where(keep, self.lengths, 0),
            counts=jnp.where(keep, self.counts, 0),
            errors=jnp.where(keep, self.errors, 0) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def insert_into_slot(self, slot, single: KVCache) -> KVCache:
        """Put a one-sequence cache (positions, length, errors) into slot ``slot``; ``single`` may be shorter and
        of another format (it is re-stored in this one)."""
        data = slot_arrays("single", single, self.spec, self.format)
        slot, ok = checks.index_in_range("slot", slot, self.batch)
        idx = jnp.where(ok, slot, self.batch)  # out of range under jit: dropped by the scatter, and flagged
        m = single.max_len
        put = lambda buf, x: buf.at[:, idx, :, :m, :].set(x[:, 0].astype(buf.dtype), mode="drop")
        hit = jnp.arange(self.batch) == idx
        return self.replace(
            data=tuple(put(buf, x) for buf, x in zip(self.data, data, strict=True)),
            lengths=jnp.where(hit, single.lengths[0], self.lengths),
            counts=jnp.where(hit, 0, self.counts),
            errors=jnp.where(hit, single.errors[0], self.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def fork(self, src, dst) -> KVCache:
        """Make sequence ``dst`` a copy of ``src``: its positions, length and error bits copied (a contiguous cache
        shares nothing; ``PagedKVCache.fork`` shares pages). ``src == dst`` changes nothing; a slot out of range
        under ``jit`` changes nothing and flags ``ERR_BAD_SLOT`` (host calls raise)."""
        src, src_ok = checks.index_in_range("src", src, self.batch)
        dst, dst_ok = checks.index_in_range("dst", dst, self.batch)
        ok = src_ok & dst_ok
        act = ok & (src != dst)
        at = checks.clamped(src, ok)
        to = dst if act is True else jnp.where(act, dst, self.batch)  # out of range: dropped by the scatter
        hit = jnp.arange(self.batch) == to
        return self.replace(
            data=tuple(buf.at[:, to].set(buf[:, at], mode="drop") for buf in self.data),
            lengths=jnp.where(hit, self.lengths[at], self.lengths),
            counts=jnp.where(hit, 0, self.counts),
            errors=jnp.where(hit, self.errors[at], self.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def extract_slot(self, slot, max_len: int | None = None) -> KVCache:
        """The one-sequence cache of ``slot`` (first ``max_len`` positions; default all). A slot out of range
        under ``jit`` gives an empty cache flagged ``ERR_BAD_SLOT`` (never a neighbouring slot)."""
        max_len = self.max_len if max_len is None else checks.positive_int("max_len", max_len)
        if max_len > self.max_len:
            raise ValueError(f"{max_len=} exceeds this cache's max_len={self.max_len}")
        slot, ok = checks.index_in_range("slot", slot, self.batch)
        at = jnp.where(ok, slot, 0)

        def take(buf):
            x = lax.dynamic_slice_in_dim(buf, at, 1, axis=1)[:, :, :, :max_len]
            return jnp.where(ok, x, jnp.zeros((), x.dtype))

        one = lambda x, fill: jnp.where(ok, lax.dynamic_slice(x, (at,), (1,)), fill)
        return KVCache(
            tuple(map(take, self.data)),
            jnp.minimum(one(self.lengths, 0), max_len),
            jnp.zeros((1,), jnp.int32),
            one(self.errors, ERR_BAD_SLOT),
            spec=self.spec.replace(max_len=max_len),
            format=self.format,
        )

    # ------------------------------------------------------------------ reading
    def layer(self, layer, dtype=None, *, stored: bool = False) -> tuple[Array, Array]:
        """K and V of ``layer`` as ``[B, K, S, D]`` in ``dtype`` (default ``spec.dtype``), decoded (every position,
        valid or not); ``stored``: left in the format's stored basis. A layer out of range under ``jit`` reads NaN."""
        layer, ok = checks.index_in_range("layer", layer, self.spec.num_layers)
        dtype = self.spec.dtype if dtype is None else jnp.dtype(dtype)
        arrays = tuple(x[checks.clamped(layer, ok)] for x in self.data)
        return self.format.read(arrays, dtype, stored=stored, ok=ok)

    def for_layer(self, layer):
        return self, layer

    def storage(self) -> tuple[Array, ...]:
        return self.data

    def partition_specs(self) -> KVCache:
        per_seq = P(DP)
        return self.replace(
            data=tuple(P(None, DP, TP, None, None) for _ in self.data),
            lengths=per_seq,
            counts=per_seq,
            errors=per_seq,
        )

    # ------------------------------------------------------------------ host round trip
    def snapshot(self, trim: bool = True) -> snapshot.Snapshot:
        """Copy to host NumPy (arrays as stored). With ``trim`` only the first ``max(lengths)`` positions."""
        return snapshot.take(self.data, self.lengths, self.errors, self.max_len, self.format, self.spec.dtype, trim)

    @classmethod
    def restore(cls, snap: snapshot.Snapshot, max_len: int | None = None) -> KVCache:
        """Rebuild a device cache from ``snapshot()``; bit-exact on every position the snapshot kept."""
        data, max_len = snapshot.padded(snap, max_len)
        _, _, kh, _, d = data[0].shape
        spec = CacheSpec(data[0].shape[0], kh, d, max_len, jnp.dtype(snap.dtype))
        lengths = jnp.asarray(snap.lengths, jnp.int32)
        return cls(
            tuple(map(jnp.asarray, data)),
            lengths,
            jnp.zeros_like(lengths),
            jnp.asarray(snap.errors, jnp.int32),
            spec=spec,
            format=snap.format,
        )


def slot_arrays(name: str, single: KVCache, spec: CacheSpec, format: Format) -> tuple[Array, ...]:
    """``single``'s arrays ``[L, 1, K, S', X]`` in ``format``, after checking it fits a slot of a ``spec`` cache."""
    if not isinstance(single, KVCache):
        raise TypeError(f"{name} must be a jkv.KVCache, got {type(single).__name__}")
    checks.same_layout(name, single.spec, spec)
    if single.batch != 1:
        raise ValueError(f"{name} must hold one sequence, got batch={single.batch}")
    if single.max_len > spec.max_len:
        raise ValueError(f"{name}.max_len={single.max_len} exceeds this cache's max_len={spec.max_len}")
    return convert(single.data, single.format, format, spec.dtype)


def all_arrays(name: str, cache: KVCache, spec: CacheSpec, format: Format) -> tuple[Array, ...]:
    """``cache``'s arrays ``[L, B, K, S, X]`` in ``format`` (layers, heads, head_dim and dtype as ``spec``)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"{name} must be a jkv.KVCache, got {type(cache).__name__}")
    checks.same_layout(name, cache.spec, spec)
    return convert(cache.data, cache.format, format, spec.dtype)


def convert(data, source: Format, target: Format, dtype) -> tuple[Any, ...]:
    """Arrays of ``source`` re-stored in ``target`` (as they are when the formats agree)."""
    if source == target:
        return data
    return _reencode(tuple(data), source, target, jnp.dtype(dtype))


# Jitted: converting eagerly compiles once per pair of formats and shape, not each primitive.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _reencode(data, source: Format, target: Format, dtype) -> tuple[Any, ...]:
    k, v = source.decode(data, jnp.float32)
    k, v = source.from_stored(k), source.from_stored(v)
    return target.encode(k.astype(dtype), v.astype(dtype))
