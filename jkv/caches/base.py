"""The cache protocol: ``CacheSpec``, the error bits, and the abstract ``Cache`` every cache kind implements.

A cache kind is a *layout* (where positions live: ``contiguous`` ``[L, B, K, S, X]`` or ``paged``, a page pool and
block tables) times a *format* (how one K/V vector is stored: ``jkv.caches.formats``). Caches are frozen pytrees;
every operation returns a new cache, and under ``jit`` with the cache donated XLA updates it in place.

A step (decode, prefill chunk or speculative verification alike) is::

    cache = cache.begin(counts)              # counts[b] new tokens for sequence b (int or int32[B], ragged)
    for layer in range(L):
        cache = cache.write(layer, k, v)     # k, v [B, K, T, D]: positions lengths[b] .. lengths[b] + counts[b] - 1
        out = jkv.attend(q, cache, layer)    # query t sits at lengths[b] + t (t >= counts[b]: padding, output 0)
    cache = cache.commit()                   # lengths += counts; counts = 0

``begin`` is where a paged cache allocates pages, once per step. A sequence whose step does not fit (capacity or
pool) gets count 0 and an error bit, and nothing of it is touched.

Errors. Host calls with concrete arguments raise ``ValueError`` / ``TypeError`` naming the values. Inside ``jit``
an operation that cannot be done is dropped for that sequence (indices go out of range into a ``mode="drop"``
scatter: never wrapped, clamped or written elsewhere) and recorded in ``errors``; ``check()`` raises them on the
host; ``checkify_errors()`` turns them into a checkify error on request (not by default: a checkify check takes
a jitted step off JAX's fast C++ dispatch path).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jkv.caches import checks, tokens

# Bits of ``cache.errors`` (int32[B], sticky until ``clear_errors`` / ``reset``).
ERR_WRITE_OVERFLOW = 1  # a step would have reached past max_len: its count became 0, nothing written
ERR_BAD_COUNT = 2  # a negative count (begin) or a count beyond the step's T (write): nothing of it was written
ERR_ROLLBACK_FORWARD = 4  # rollback asked for a length above the current one (or below 0): left unchanged
ERR_BAD_SLOT = 8  # a slot index or prefix out of range inside jit: nothing changed
ERR_POOL_EXHAUSTED = 16  # paged: no free page for a step / admission: that sequence was left as it was
ERR_BAD_LAYER = 32  # a layer index out of range inside jit: nothing written
ERR_VALUE_RANGE = 64  # a value beyond what the format can store: stored saturated (finite), never NaN
ERR_WINDOW = 128  # a windowed ring: a step longer than its slack, or a rollback below what it holds: refused
ERROR_NAMES = {
    ERR_WRITE_OVERFLOW: "step past max_len (count set to 0, nothing written)",
    ERR_BAD_COUNT: "negative count, or a count beyond the written tokens",
    ERR_ROLLBACK_FORWARD: "rollback to a length outside [0, current length] (length unchanged)",
    ERR_BAD_SLOT: "slot index out of range (nothing changed)",
    ERR_POOL_EXHAUSTED: "page pool exhausted (sequence left as it was)",
    ERR_BAD_LAYER: "layer index out of range (nothing written)",
    ERR_VALUE_RANGE: "value beyond the format's range (stored saturated)",
    ERR_WINDOW: "windowed ring: step beyond its slack, or rollback below the positions it holds (refused)",
}


def describe_errors(errors) -> str:
    lines = []
    for b, bits in enumerate(np.asarray(errors).tolist()):
        names = [name for bit, name in ERROR_NAMES.items() if bits & bit]
        if names:
            lines.append(f"sequence {b}: " + "; ".join(names))
    return "jkv cache recorded errors inside jit:\n  " + "\n  ".join(lines)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static description of a cache: everything that fixes array shapes (hashable, usable as a jit static).
    ``dtype`` is the floating dtype the cache stands for: what its layer views return by default."""

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
        """Bytes one position of one sequence occupies across all layers, K and V together, stored as ``dtype``
        (other formats: ``Format.bytes_per_token``)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_sequence(self) -> int:
        return self.bytes_per_token * self.max_len

    def replace(self, **changes) -> CacheSpec:
        return dataclasses.replace(self, **changes)


class Cache(abc.ABC):
    """The protocol of every cache kind (final subclasses only; each holds all of its fields).

    Every kind has the array fields ``lengths`` (committed positions), ``counts`` (tokens of the step in
    progress, 0 outside a step) and ``errors`` (sticky bits), all ``int32[B]``, and the static fields ``spec``
    and ``format``. The methods here are shared and never overridden; the abstract ones are each layout's own.
    """

    layout: ClassVar[str]  # "contiguous" or "paged": with type(format), the key of the kernel registry
    window: ClassVar[int | None] = None  # positions a query may read back (a ring's window); None: all

    # ------------------------------------------------------------------ shape
    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.spec.max_len

    # ------------------------------------------------------------------ step
    def commit(self):
        """End the step: ``lengths += counts``, ``counts = 0``."""
        return self.replace(lengths=self.lengths + self.counts, counts=jnp.zeros_like(self.counts))

    def _on_device(self, what: str) -> None:
        """Refuse, naming the way back, a cache whose arrays are NumPy arrays (a cache brought to the host, as by
        ``jax.device_get``): its functional updates need JAX arrays."""
        if any(isinstance(x, np.ndarray) for x in jax.tree.leaves(self)):
            raise TypeError(
                f"{what} needs a cache of JAX arrays, but this {type(self).__name__} holds NumPy arrays (a cache "
                f"brought to the host, e.g. by jax.device_get): put it back with jax.device_put(cache) first"
            )

    def _declare(self, counts):
        """``(counts int32[B], ok [B])``: the step fits capacity (host calls raise when it does not)."""
        self._on_device("begin")
        counts = checks.per_sequence_ints("counts", counts, self.batch)
        ok = (counts >= 0) & (counts <= self.max_len - self.lengths)
        checks.host_all(
            ok,
            lambda: (
                f"begin(counts={np.asarray(counts)}) at lengths={np.asarray(self.lengths)} must stay within "
                f"[0, max_len={self.max_len}]"
            ),
        )
        bits = jnp.where(counts < 0, ERR_BAD_COUNT, ERR_WRITE_OVERFLOW)
        return jnp.where(ok, counts, 0), ok, jnp.where(ok, 0, bits)

    def write_plan(self, layer, k, v):
        """Validate a write of padded ``[B, K, T, D]`` or flat ``[T, K, D]`` keys and values (``jkv.caches.tokens``);
        return ``(layer index, slot [N], positions [N], errors [B])`` over the write's ``N`` tokens in row-major
        order, every position to drop set to ``max_len`` (padding tokens, everything when the layer is out of
        range, and every token of a sequence whose count the write falls short of: of all of them when flat)."""
        self._on_device("write")
        spec = self.spec
        flat = getattr(k, "ndim", 0) == 3
        checks.new_kv("k", k, self.batch, spec, flat=flat)
        checks.new_kv("v", v, self.batch, spec, flat=flat)
        if k.shape != v.shape:
            raise ValueError(f"k.shape={k.shape} and v.shape={v.shape} must match")
        layer, layer_ok = checks.index_in_range("layer", layer, spec.num_layers)
        t = k.shape[0] if flat else k.shape[2]
        room = jnp.sum(self.counts) <= t if flat else self.counts <= t
        checks.host_all(
            room,
            lambda: (
                f"write of {t} tokens ({'flat' if flat else 'T'}) is shorter than the step's "
                f"counts={np.asarray(self.counts)}"
            ),
        )
        layout = tokens.flat_layout if flat else tokens.padded_layout
        slot, positions, live = layout(self.lengths, self.counts, t)
        fits = room if flat else room[slot]  # a sequence whose count the write falls short of: none of it written
        positions = jnp.where(live & layer_ok & fits, positions, spec.max_len)
        errors = jnp.where(layer_ok, 0, ERR_BAD_LAYER) | jnp.where(room, 0, ERR_BAD_COUNT)
        return checks.clamped(layer, layer_ok), slot, positions, errors

    def encode_new(self, k, v, slot, positions):
        """The format's arrays of the new tokens ``[N, K, X]`` (token-major, ``tokens.token_major``) and the range
        errors ``[B]`` of the live ones."""
        arrays, fits = _encode_checked(self.format, tokens.token_major(k), tokens.token_major(v))  # fits [N, K]
        bad = tokens.any_per_slot(jnp.any(~fits, axis=1) & (positions < self.max_len), slot, self.batch)
        checks.host_all(
            ~bad,
            lambda: f"k/v hold values beyond what the {self.format} format can store (they would be saturated)",
        )
        return arrays, jnp.where(bad, ERR_VALUE_RANGE, 0)

    def _rolled(self, lengths):
        """``(new lengths, errors)`` of ``rollback(lengths)``; the step in progress ends (counts 0)."""
        new = checks.per_sequence_ints("lengths", lengths, self.batch)
        ok = (new >= 0) & (new <= self.lengths)
        checks.host_all(
            ok,
            lambda: f"rollback lengths={np.asarray(new)} must lie in [0, current lengths={np.asarray(self.lengths)}]",
        )
        return jnp.where(ok, new, self.lengths), self.errors | jnp.where(ok, 0, ERR_ROLLBACK_FORWARD)

    # ------------------------------------------------------------------ errors
    def clear_errors(self):
        return self.replace(errors=jnp.zeros_like(self.errors))

    def check(self):
        """Raise ``RuntimeError`` if any operation under ``jit`` recorded an error; otherwise return self."""
        errors = np.asarray(self.errors)
        if errors.any():
            raise RuntimeError(describe_errors(errors))
        return self

    def checkify_errors(self):
        """Raise the recorded error bits as a checkify error; for use inside ``checkify.checkify(step)``."""
        checkify.check(
            jnp.all(self.errors == 0),
            "jkv cache recorded errors inside jit, bits per sequence {errors} (see jkv.caches.ERROR_NAMES)",
            errors=self.errors,
        )
        return self

    @property
    def nbytes(self) -> int:
        """Device bytes held by the cache (every array field)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    # ------------------------------------------------------------------ each layout's own
    @abc.abstractmethod
    def begin(self, counts):
        """Declare a step of ``counts`` new tokens per sequence (int or ``int32[B]``)."""

    @abc.abstractmethod
    def write(self, layer, k, v):
        """Store ``k``, ``v`` ``[B, K, T, D]`` at positions ``lengths[b] .. lengths[b] + counts[b] - 1``."""

    @abc.abstractmethod
    def rollback(self, lengths):
        """Shrink lengths (e.g. rejected speculative tokens); ends the step in progress."""

    @abc.abstractmethod
    def reset(self):
        """Empty every sequence."""

    @abc.abstractmethod
    def reset_slot(self, slot):
        """Empty sequence ``slot``."""

    @abc.abstractmethod
    def insert_into_slot(self, slot, single):
        """Put a one-sequence contiguous cache into slot ``slot``."""

    @abc.abstractmethod
    def extract_slot(self, slot, max_len=None):
        """The one-sequence contiguous cache of slot ``slot``."""

    @abc.abstractmethod
    def fork(self, src, dst):
        """Make sequence ``dst`` a copy of ``src`` (n samples or beams from one prompt): copied, or sharing pages."""

    @abc.abstractmethod
    def with_format(self, format):
        """Every position re-stored in ``format`` (``jkv.caches.formats``)."""

    @abc.abstractmethod
    def layer(self, layer, dtype=None, *, stored: bool = False):
        """K and V of ``layer`` as ``[B, K, S, D]`` (decoded; ``stored``: in the format's stored basis)."""

    @abc.abstractmethod
    def snapshot(self, trim: bool = True):
        """The cache on the host (``jkv.caches.snapshot.Snapshot``)."""

    @abc.abstractmethod
    def partition_specs(self):
        """A pytree like this cache of ``PartitionSpec`` s: kv heads over ``tp``, sequences over ``dp``."""

    @abc.abstractmethod
    def for_layer(self, layer):
        """``(cache, index)``: the cache that stores ``layer`` (its lengths and counts this one's) and the layer's
        index there; ``(self, layer)`` for a kind whose layers are alike (a per-layer plan: its group's)."""

    def with_layer_cache(self, layer, sub):
        """This cache with ``sub`` (``for_layer(layer)[0]`` after an operation on it) in its place, ``sub``'s error
        bits joining this cache's; ``sub`` itself for a kind whose layers are alike."""
        return sub

    @abc.abstractmethod
    def storage(self) -> tuple:
        """The format's arrays as this layout stores them (what a kernel reads)."""


@jax.jit(static_argnums=0)  # an eager write compiles the format's encoding once, not each of its primitives
def _encode_checked(format, k, v):
    return format.encode_checked(k, v)
