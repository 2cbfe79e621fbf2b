"""Contiguous KV cache: a frozen pytree updated functionally.

Layout, stated once: K and V are ``[L, B, K, S, D]`` (layers, batch, kv heads, cache positions, head_dim), so
every ``(layer, b, kv_head)`` slab is one contiguous run of ``S * D`` values that a decode kernel reads coalesced.
``lengths[b]`` says how many leading positions of sequence ``b`` hold valid keys and values.

The decode protocol for one step is: for every layer ``write`` the new keys/values at each sequence's own
position ``lengths[b]``, attend (``jkv.decode_attention`` covers ``lengths[b] + T`` positions), and after the
last layer ``advance(T)``. Lengths are traced ``int32`` arrays, so one compiled step serves every position.
A step may call ``reserve(T)`` once before the layers and then pass ``reserved=True`` to every ``write`` and to
``advance``: a paged cache then runs its page allocator once per step instead of once per layer (the contiguous
caches have nothing to allocate and accept the same calls).

Errors. Host-side calls with concrete arguments validate and raise ``ValueError`` / ``TypeError`` naming the
values. Inside ``jit`` nothing can raise, so an operation that would overflow ``max_len`` (or roll a sequence
*forward*) leaves that sequence untouched — no position already written is ever overwritten — records the reason
in the ``errors`` bitmask. ``cache.check()`` turns recorded errors into an exception on the host; inside a function
transformed by ``jax.experimental.checkify.checkify``, ``cache.checkify_errors()`` turns them into a checkify error.
(The operations themselves carry no checkify check: any check in a jitted step takes it off JAX's C++ dispatch
fast path, which measured ~28x the per-call host overhead: 367 vs 13 us on this CPU.)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.experimental import checkify
from jaxtyping import Array, Int

from jkv import _checks

# Bits of ``KVCache.errors`` (int32[B], sticky until ``clear_errors`` / ``reset``).
ERR_WRITE_OVERFLOW = 1  # a write would have reached past max_len: the write was skipped for that sequence
ERR_ADVANCE_OVERFLOW = 2  # advance would have moved a length past max_len: the length was left unchanged
ERR_ROLLBACK_FORWARD = 4  # rollback asked for a length above the current one (or below 0): left unchanged
ERR_BAD_SLOT = 8  # insert_into_slot / reset_slot got a slot index out of range inside jit: nothing changed
ERR_POOL_EXHAUSTED = 16  # PagedKVCache: no free page for a write / advance / admit: that sequence was left as it was
ERROR_NAMES = {
    ERR_WRITE_OVERFLOW: "write past max_len (write skipped)",
    ERR_ADVANCE_OVERFLOW: "advance past max_len (length unchanged)",
    ERR_ROLLBACK_FORWARD: "rollback to a length outside [0, current length] (length unchanged)",
    ERR_BAD_SLOT: "slot index out of range (nothing changed)",
    ERR_POOL_EXHAUSTED: "page pool exhausted (sequence left as it was)",
}


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static description of a cache: everything that fixes array shapes (hashable, usable as a jit static)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_len: int
    dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CacheSpec.{name} must be a positive int, got {value!r}")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as e:
            raise TypeError(f"CacheSpec.dtype must be a floating dtype, got {self.dtype!r}") from e
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"CacheSpec.dtype must be a floating dtype, got {dtype}")
        object.__setattr__(self, "dtype", dtype)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence occupies across all layers, K and V together."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_sequence(self) -> int:
        return self.bytes_per_token * self.max_len

    def replace(self, **changes) -> CacheSpec:
        return dataclasses.replace(self, **changes)


class KVSnapshot(NamedTuple):
    """A cache copied to host memory (NumPy). ``max_len`` is the capacity to restore into; ``k``/``v`` may be
    trimmed to the longest valid length to save host memory."""

    k: np.ndarray  # [L, B, K, S', D]
    v: np.ndarray  # [L, B, K, S', D]
    lengths: np.ndarray  # int32[B]
    errors: np.ndarray  # int32[B]
    max_len: int


class LengthsMixin:
    """Length and error-bit operations shared by every jkv cache type.

    A cache class using it has array fields ``lengths`` and ``errors`` (``int32[B]``) and properties ``batch``
    and ``max_len``; none of these operations touch the stored keys and values.
    """

    def reserve(self, n=1):
        """Make positions ``[lengths[b], lengths[b] + n)`` writable: nothing to do for a contiguous cache (every
        position up to ``max_len`` exists); part of the step protocol every cache type shares (module docstring).
        """
        _checks.per_sequence_ints("n", n, self.batch)
        return self

    def advance(self, n=1, *, reserved: bool = False):
        """Move every length forward by ``n`` (an int, or ``int32[B]`` for ragged steps). ``reserved`` is for
        the shared step protocol; a contiguous cache has nothing to reserve."""
        del reserved
        n = _checks.per_sequence_ints("n", n, self.batch)
        new = self.lengths + n
        ok = (new <= self.max_len) & (n >= 0)
        _checks.host_all(
            ok,
            lambda: (
                f"advance by n={np.asarray(n)} from lengths={np.asarray(self.lengths)} "
                f"must stay within [current, max_len={self.max_len}]"
            ),
        )
        return self.replace(
            lengths=jnp.where(ok, new, self.lengths),
            errors=self.errors | jnp.where(ok, 0, ERR_ADVANCE_OVERFLOW),
        )

    def rollback(self, lengths):
        """Shrink lengths to ``lengths`` (int or ``int32[B]``), e.g. to drop rejected speculative tokens.

        Positions past the new length become invalid (their data stays until overwritten). Asking for a length
        above the current one would expose unwritten positions: refused (host) or flagged and ignored (jit).
        """
        new = _checks.per_sequence_ints("lengths", lengths, self.batch)
        ok = (new >= 0) & (new <= self.lengths)
        _checks.host_all(
            ok,
            lambda: f"rollback lengths={np.asarray(new)} must lie in [0, current lengths={np.asarray(self.lengths)}]",
        )
        return self.replace(
            lengths=jnp.where(ok, new, self.lengths),
            errors=self.errors | jnp.where(ok, 0, ERR_ROLLBACK_FORWARD),
        )

    def reset(self):
        """Empty every sequence (lengths and error bits to zero; buffers are left as they are)."""
        return self.replace(lengths=jnp.zeros_like(self.lengths), errors=jnp.zeros_like(self.errors))

    def reset_slot(self, slot):
        """Empty sequence ``slot`` (its length and error bits to zero)."""
        ok = self._slot_ok(slot)
        keep = jnp.arange(self.batch) != slot
        return self.replace(
            lengths=jnp.where(keep, self.lengths, 0),
            errors=jnp.where(keep, self.errors, 0) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def clear_errors(self):
        return self.replace(errors=jnp.zeros_like(self.errors))

    def _check_write(self, layer, k_new, v_new):
        """Validate a write of ``k_new``/``v_new`` ``[B, K, T, D]`` to ``layer``; return which sequences fit.

        Shapes, dtypes and the layer are checked on the host; a write past ``max_len`` raises on the host. Under
        ``jit`` the caller skips the sequences that do not fit and records ``ERR_WRITE_OVERFLOW``.
        """
        spec = self.spec
        _checks.new_kv("k_new", k_new, self.batch, spec)
        _checks.new_kv("v_new", v_new, self.batch, spec)
        if k_new.shape != v_new.shape:
            raise ValueError(f"k_new.shape={k_new.shape} and v_new.shape={v_new.shape} must match")
        _checks.layer_index(layer, spec.num_layers)
        t = k_new.shape[2]
        ok = self.lengths + t <= self.max_len
        _checks.host_all(
            ok,
            lambda: f"write of T={t} positions past max_len={self.max_len}: lengths={np.asarray(self.lengths)}",
        )
        return ok

    def checkify_errors(self):
        """Raise the recorded error bits as a checkify error; for use inside ``checkify.checkify(step)``.

        ``err, out = checkify.checkify(step)(...)`` then ``err.throw()`` raises ``JaxRuntimeError`` naming the bits.
        """
        checkify.check(
            jnp.all(self.errors == 0),
            "jkv cache recorded errors inside jit, bits per sequence {errors} (see jkv.cache.ERROR_NAMES)",
            errors=self.errors,
        )
        return self

    def _check_extract(self, slot, max_len):
        """Validate ``extract_slot``'s arguments; return the number of positions to take (default all)."""
        max_len = self.max_len if max_len is None else max_len
        _checks.positive_int("max_len", max_len)
        if max_len > self.max_len:
            raise ValueError(f"{max_len=} exceeds this cache's max_len={self.max_len}")
        self._slot_ok(slot)
        return max_len

    def _slot_ok(self, slot):
        _checks.slot_index(slot, self.batch)
        return (slot >= 0) & (slot < self.batch)

    # ------------------------------------------------------------------ errors
    def check(self):
        """Raise ``RuntimeError`` if any operation under ``jit`` recorded an error; otherwise return self."""
        errors = np.asarray(self.errors)
        if errors.any():
            raise RuntimeError(describe_errors(errors))
        return self


@struct.dataclass
class KVCache(LengthsMixin):
    """Contiguous KV cache for ``L`` layers and ``B`` sequences; see the module docstring for the protocol."""

    k: Array  # [L, B, K, S, D]
    v: Array  # [L, B, K, S, D]
    # Lengths and error bits are arrays (not static fields) so that changing them never recompiles a step.
    lengths: Int[Array, " B"]
    errors: Int[Array, " B"]

    # ------------------------------------------------------------------ construction and shape
    @classmethod
    def init(cls, spec: CacheSpec, batch: int) -> KVCache:
        """A cache of ``batch`` empty sequences. Buffers are zero-filled; only ``lengths`` decides validity."""
        if not isinstance(spec, CacheSpec):
            raise TypeError(f"spec must be a jkv.CacheSpec, got {type(spec).__name__}")
        _checks.positive_int("batch", batch)
        shape = (spec.num_layers, batch, spec.num_kv_heads, spec.max_len, spec.head_dim)
        return cls(
            k=jnp.zeros(shape, spec.dtype),
            v=jnp.zeros(shape, spec.dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            errors=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def spec(self) -> CacheSpec:
        num_layers, _, num_kv_heads, max_len, head_dim = self.k.shape
        return CacheSpec(num_layers, num_kv_heads, head_dim, max_len, self.k.dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Device bytes held by the cache (K, V, lengths and error bits)."""
        return sum(int(x.size) * x.dtype.itemsize for x in (self.k, self.v, self.lengths, self.errors))

    # ------------------------------------------------------------------ updates
    def write(self, layer, k_new: Array, v_new: Array, *, reserved: bool = False) -> KVCache:
        """Write ``k_new``/``v_new`` ``[B, K, T, D]`` of ``layer`` at positions ``lengths[b] .. lengths[b]+T``.

        Lengths do not move: call ``advance(T)`` once every layer has written. A sequence whose write would
        pass ``max_len`` is left untouched and gets ``ERR_WRITE_OVERFLOW`` (host calls raise instead).
        ``reserved`` is for the shared step protocol (module docstring); a contiguous cache ignores it.
        """
        del reserved
        spec = self.spec
        ok = self._check_write(layer, k_new, v_new)
        t = k_new.shape[2]

        # A scatter with mode="drop" updates in place under donation (a vmapped dynamic_update_slice does not
        # on every backend). A refused sequence gets out-of-range positions, so its write drops entirely.
        positions = jnp.where(ok[:, None], self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32), spec.max_len)
        rows = jnp.arange(self.batch)[:, None]  # (B, 1) against positions (B, T)

        def put(buf, new):
            return buf.at[layer, rows, :, positions, :].set(jnp.swapaxes(new, 1, 2).astype(buf.dtype), mode="drop")

        return self.replace(
            k=put(self.k, k_new),
            v=put(self.v, v_new),
            errors=self.errors | jnp.where(ok, 0, ERR_WRITE_OVERFLOW),
        )

    def insert_into_slot(self, slot, single: KVCache) -> KVCache:
        """Scatter a prefilled one-sequence cache into batch slot ``slot`` (its positions, length and errors).

        ``single`` must have the same layers, kv heads, head_dim and dtype, batch 1, and ``max_len`` no larger
        than this cache's (a prompt-sized prefill cache is fine). The slot's old contents are replaced.
        """
        if not isinstance(single, KVCache):
            raise TypeError(f"single must be a KVCache, got {type(single).__name__}")
        _checks.same_layout("single", single.spec, self.spec)
        if single.batch != 1:
            raise ValueError(f"single must hold one sequence, got batch={single.batch}")
        if single.max_len > self.max_len:
            raise ValueError(f"single.max_len={single.max_len} exceeds this cache's max_len={self.max_len}")
        ok = self._slot_ok(slot)
        # An out-of-range slot under jit is dropped by the scatter (and flagged), never clamped onto slot 0/B-1.
        idx = jnp.where(ok, slot, self.batch)
        m = single.max_len

        def put(buf, new):
            return buf.at[:, idx, :, :m, :].set(new[:, 0].astype(buf.dtype), mode="drop")

        hit = jnp.arange(self.batch) == idx
        return self.replace(
            k=put(self.k, single.k),
            v=put(self.v, single.v),
            lengths=jnp.where(hit, single.lengths[0], self.lengths),
            errors=jnp.where(hit, single.errors[0], self.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def extract_slot(self, slot, max_len: int | None = None) -> KVCache:
        """The one-sequence cache held in ``slot`` (first ``max_len`` positions; default all)."""
        max_len = self._check_extract(slot, max_len)
        shape = (self.k.shape[0], 1, self.k.shape[2], max_len, self.k.shape[4])
        take = lambda buf: lax.dynamic_slice(buf, (0, slot, 0, 0, 0), shape)
        length = lax.dynamic_slice(self.lengths, (slot,), (1,))
        return KVCache(
            k=take(self.k),
            v=take(self.v),
            lengths=jnp.minimum(length, max_len),
            errors=lax.dynamic_slice(self.errors, (slot,), (1,)),
        )

    # ------------------------------------------------------------------ host round trip
    def snapshot(self, trim: bool = True) -> KVSnapshot:
        """Copy to host NumPy. With ``trim`` only the first ``max(lengths)`` positions are kept."""
        lengths = np.asarray(self.lengths)
        keep = max(int(lengths.max(initial=0)), 1) if trim else self.max_len
        return KVSnapshot(
            k=np.asarray(self.k[:, :, :, :keep]),
            v=np.asarray(self.v[:, :, :, :keep]),
            lengths=lengths.copy(),
            errors=np.asarray(self.errors).copy(),
            max_len=self.max_len,
        )

    @classmethod
    def restore(cls, snap: KVSnapshot, max_len: int | None = None) -> KVCache:
        """Rebuild a device cache from ``snapshot()``; bit-exact on every position the snapshot kept."""
        if not isinstance(snap, KVSnapshot):
            raise TypeError(f"snap must be a KVSnapshot, got {type(snap).__name__}")
        max_len = snap.max_len if max_len is None else max_len
        kept = snap.k.shape[3]
        if kept > max_len or int(snap.lengths.max(initial=0)) > max_len:
            raise ValueError(f"snapshot holds {kept} positions (lengths {snap.lengths}), above {max_len=}")
        pad = [(0, 0)] * 3 + [(0, max_len - kept), (0, 0)]
        return cls(
            k=jnp.asarray(np.pad(snap.k, pad)),
            v=jnp.asarray(np.pad(snap.v, pad)),
            lengths=jnp.asarray(snap.lengths, jnp.int32),
            errors=jnp.asarray(snap.errors, jnp.int32),
        )


def describe_errors(errors: np.ndarray) -> str:
    lines = []
    for b, bits in enumerate(np.asarray(errors).tolist()):
        names = [name for bit, name in ERROR_NAMES.items() if bits & bit]
        if names:
            lines.append(f"sequence {b}: " + "; ".join(names))
    return "jkv cache recorded errors inside jit:\n  " + "\n  ".join(lines)
