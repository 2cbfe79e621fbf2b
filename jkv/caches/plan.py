"""Per-layer cache plans: layers that attend to all positions keep ``max_len`` of them, windowed layers keep a ring.

``PlannedCache`` is one cache kind like the others (the protocol of ``jkv.caches.base``): it holds *groups*, each
an ordinary cache over some of the layers. The full layers form one group of the plan's layout (a ``KVCache``, or
a ``PagedKVCache`` over its own pool); the layers of each window form a ``PagedKVCache`` with a ``Ring``
(``jkv.caches.ring``): its pages that fall out of the window go back to its own pool at each ``begin`` and are
reused, so a windowed layer holds about ``window + slack`` positions per sequence whatever the context length.

* ``layout="contiguous"``: rings are bounded (a fixed pool of ``Ring.pages_per_sequence`` pages per slot, never
  exhausted; a step of more than ``slack`` tokens is refused with ``ERR_WINDOW``);
* ``layout="paged"``: rings share a pool per window like the full group's, and a longer step (a prompt chunk)
  takes the pages it needs from it.

``slack`` (static) is the most tokens one step adds and the deepest rollback (speculation) every ring supports:
a ring keeps ``window - 1 + slack`` positions behind a step's end (``Ring.keep_from``). A rollback below what a
ring holds is refused for that sequence in every group alike (``ERR_WINDOW``; host calls raise).

The plan shares ``lengths``, ``counts`` and ``errors`` with its groups: its own fields are the truth, and each
group gets them before an operation and gives back its error bits after. ``for_layer(i)`` hands attention the
group of layer ``i`` (with its own layout's kernels: the paged kernels read a ring through its block table, from
the window's first page on). A layer index must be static unless the plan has one group (every layer alike).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int

from jkv.caches import checks, pool
from jkv.caches.base import ERR_BAD_SLOT, ERR_WINDOW, Cache, CacheSpec
from jkv.caches.contiguous import KVCache
from jkv.caches.formats import Format, Plain, bind
from jkv.caches.paged import PagedKVCache
from jkv.caches.ring import Ring
from jkv.caches.sharding import DP

LAYOUTS = ("contiguous", "paged")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static: each layer's window (None: full), the rings' ``slack``, the layout and the page size of rings (and
    of a paged full group)."""

    windows: tuple[int | None, ...]
    slack: int
    layout: str = "contiguous"
    page_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "windows", tuple(self.windows))
        for w in self.windows:
            if w is not None and (not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w < 1):
                raise ValueError(f"windows holds {w!r}, expected a positive int or None")
        checks.positive_int("slack", self.slack)
        checks.positive_int("page_size", self.page_size)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not one of {LAYOUTS}")

    @property
    def groups(self) -> tuple[tuple[int | None, tuple[int, ...]], ...]:
        """``(window, layers)`` of each group: the full layers first, then each window, smallest first."""
        keys = sorted(set(self.windows), key=lambda w: -1 if w is None else w)
        return tuple((w, tuple(i for i, x in enumerate(self.windows) if x == w)) for w in keys)

    def where(self, layer: int) -> tuple[int, int]:
        """``(group, index in it)`` of ``layer``."""
        for g, (_, layers) in enumerate(self.groups):
            if layer in layers:
                return g, layers.index(layer)
        raise ValueError(f"layer={layer} out of range: expected an index in [0, {len(self.windows)})")

    def ring(self, g: int) -> Ring | None:
        window = self.groups[g][0]
        return None if window is None else Ring(int(window), self.slack, self.layout == "contiguous")

    def paged(self, g: int) -> bool:
        return self.layout == "paged" or self.groups[g][0] is not None

    def group_spec(self, spec: CacheSpec, g: int) -> CacheSpec:
        n = len(self.groups[g][1])
        if not self.paged(g):
            return spec.replace(num_layers=n)
        return spec.replace(num_layers=n, max_len=pool.cdiv(spec.max_len, self.page_size) * self.page_size)


def take_layers(cache: KVCache, layers: tuple[int, ...]) -> KVCache:
    """The contiguous cache of ``layers`` of ``cache`` (a slice when they are consecutive)."""
    lo, n = layers[0], len(layers)
    pick = (lambda x: x[lo : lo + n]) if layers == tuple(range(lo, lo + n)) else (lambda x: x[np.asarray(layers)])
    part = cache.spec.replace(num_layers=n)
    data = tuple(map(pick, cache.data))
    return KVCache(data, cache.lengths, cache.counts, cache.errors, spec=part, format=cache.format)


@struct.dataclass
class PlannedCache(Cache):
    """A cache whose layers differ: full layers and windowed rings (module docstring). Build with ``init`` (or
    ``jkv.make_cache(kind, spec, batch, windows=..., slack=...)``)."""

    groups: tuple  # one cache per LayerPlan.groups entry
    lengths: Int[Array, " B"]
    counts: Int[Array, " B"]
    errors: Int[Array, " B"]
    spec: CacheSpec = struct.field(pytree_node=False)
    format: Format = struct.field(pytree_node=False)
    plan: LayerPlan = struct.field(pytree_node=False)

    layout = "plan"

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(
        cls,
        spec: CacheSpec,
        batch: int,
        *,
        windows,
        slack: int,
        layout: str = "contiguous",
        format: Format | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        window_pages: int | None = None,
    ) -> PlannedCache:
        """``batch`` empty sequences. ``windows``: one entry per layer (None: full). ``num_pages``: the paged full
        group's pool; ``window_pages``: each ring's pool (default: every slot can fill its ring)."""
        plan = cls._plan(spec, windows, slack, layout, page_size)
        checks.positive_int("batch", batch)
        format = bind(Plain() if format is None else format, spec)
        groups = []
        for g, (window, _) in enumerate(plan.groups):
            gs = plan.group_spec(spec, g)
            if not plan.paged(g):
                groups.append(KVCache.init(gs, batch, format=format))
            else:
                pages = num_pages if window is None else window_pages
                paging = dict(page_size=page_size, num_pages=pages, format=format, ring=plan.ring(g))
                groups.append(PagedKVCache.init(gs, batch, **paging))
        zeros = lambda: jnp.zeros((batch,), jnp.int32)
        return cls(tuple(groups), zeros(), zeros(), zeros(), spec=spec, format=format, plan=plan)

    @staticmethod
    def _plan(spec, windows, slack, layout, page_size) -> LayerPlan:
        if not isinstance(spec, CacheSpec):
            raise TypeError(f"spec must be a jkv.CacheSpec, got {type(spec).__name__}")
        plan = LayerPlan(tuple(windows), slack, layout, page_size)
        if len(plan.windows) != spec.num_layers:
            raise ValueError(f"windows has {len(plan.windows)} entries, expected num_layers={spec.num_layers}")
        if layout == "paged" and spec.max_len % page_size:
            raise ValueError(f"spec.max_len={spec.max_len} must be a multiple of {page_size=}")
        return plan

    @classmethod
    def from_contiguous(cls, cache: KVCache, *, windows, slack: int, layout: str = "contiguous", page_size=16,
                        num_pages=None, window_pages=None) -> PlannedCache:  # fmt: skip
        """The plan of a contiguous cache's contents (rings keep what they would have kept)."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a jkv.KVCache, got {type(cache).__name__}")
        plan = cls._plan(cache.spec, windows, slack, layout, page_size)
        groups = []
        for g, (window, layers) in enumerate(plan.groups):
            part = take_layers(cache, layers)
            if not plan.paged(g):
                groups.append(part)
                continue
            pages = num_pages if window is None else window_pages
            groups.append(PagedKVCache.from_contiguous(part, page_size=page_size, num_pages=pages, ring=plan.ring(g)))
        lengths = groups[0].lengths
        for group in groups[1:]:  # a pool that could not take a sequence left it empty: empty it everywhere
            lengths = jnp.minimum(lengths, group.lengths)
        out = cls(tuple(groups), lengths, jnp.zeros_like(lengths), cache.errors, spec=cache.spec, format=cache.format,
                  plan=plan)  # fmt: skip
        return out._with(groups).rollback(lengths)

    @classmethod
    def restore(cls, snap, **plan_options) -> PlannedCache:
        """Rebuild from a ``Snapshot`` (``from_contiguous``'s options)."""
        return cls.from_contiguous(KVCache.restore(snap), **plan_options)

    # ------------------------------------------------------------------ groups
    def _synced(self, g: int, errors=None):
        """Group ``g`` with this plan's lengths and counts, and ``errors`` (default none)."""
        errors = jnp.zeros_like(self.errors) if errors is None else errors
        return self.groups[g].replace(lengths=self.lengths, counts=self.counts, errors=errors)

    def _where(self, layer):
        """``(group, index)`` of ``layer``; a traced index only when there is one group."""
        if len(self.plan.groups) == 1:
            return 0, layer
        if not isinstance(layer, (int, np.integer)):
            raise TypeError(f"a cache plan of {len(self.plan.groups)} groups needs a static layer index, got {layer}")
        checks.index_in_range("layer", layer, self.spec.num_layers)
        return self.plan.where(int(layer))

    def _with(self, groups, **fields):
        """The plan with ``groups`` after an operation: their error bits join its own (and leave them)."""
        errors = fields.pop("errors", self.errors)
        for group in groups:
            errors = errors | group.errors
        groups = tuple(group.replace(errors=jnp.zeros_like(group.errors)) for group in groups)
        return self.replace(groups=groups, errors=errors, **fields)

    @staticmethod
    def _agreed(groups):
        """``[B]``: every group holds each sequence at the same length."""
        ok = jnp.ones_like(groups[0].lengths, bool)
        for group in groups[1:]:
            ok = ok & (group.lengths == groups[0].lengths)
        return ok

    def for_layer(self, layer):
        g, i = self._where(layer)
        return self._synced(g, self.errors), i

    @property
    def windows(self) -> tuple[int | None, ...]:
        return self.plan.windows

    # ------------------------------------------------------------------ step
    def begin(self, counts) -> PlannedCache:
        counts, _, bits = self._declare(counts)
        if self.plan.layout == "contiguous":  # bounded rings: refused here, so that no group takes it
            long = (counts > self.plan.slack) & any(w is not None for w in self.plan.windows)
            message = lambda: f"begin(counts={np.asarray(counts)}) exceeds the rings' slack={self.plan.slack}"
            checks.host_all(~long, message)
            counts, bits = jnp.where(long, 0, counts), jnp.where(long, ERR_WINDOW, bits)
        groups, agreed = [], counts
        for g in range(len(self.groups)):
            groups.append(self._synced(g).begin(agreed))
            agreed = groups[-1].counts
        if self.plan.layout == "paged" and len(groups) > 1:  # a pool refused a sequence: the others let it go too
            again = lambda c: c.rollback(c.lengths).begin(agreed)
            groups = [lax.cond(jnp.any(c.counts != agreed), again, lambda c: c, c) for c in groups]
        return self._with(groups, counts=agreed, errors=self.errors | bits)

    def write(self, layer, k, v) -> PlannedCache:
        g, i = self._where(layer)
        groups = list(self.groups)
        groups[g] = self._synced(g).write(i, k, v)
        return self._with(groups)

    def rollback(self, lengths) -> PlannedCache:
        new, errors = self._rolled(lengths)
        held = jnp.ones_like(new, bool)
        for g, group in enumerate(self.groups):
            ring = self.plan.ring(g)
            if ring is not None:
                held = held & ring.can_roll_back(new, group.block_tables, group.page_size)
        checks.host_all(held, lambda: f"rollback to {np.asarray(new)} reads positions a ring let go (slack)")
        new, errors = jnp.where(held, new, self.lengths), errors | jnp.where(held, 0, ERR_WINDOW)
        groups = [self._synced(g).rollback(new) for g in range(len(self.groups))]
        return self._with(groups, lengths=new, counts=jnp.zeros_like(self.counts), errors=errors)

    # ------------------------------------------------------------------ slots
    def reset(self) -> PlannedCache:
        zeros = lambda: jnp.zeros_like(self.lengths)
        groups = [g.reset() for g in self.groups]
        return self.replace(groups=tuple(groups), lengths=zeros(), counts=zeros(), errors=zeros())

    def reset_slot(self, slot) -> PlannedCache:
        at, ok = checks.index_in_range("slot", slot, self.batch)
        keep = ~((jnp.arange(self.batch) == at) & ok)
        groups = [self._synced(g).reset_slot(slot) for g in range(len(self.groups))]
        return self._with(
            groups,
            lengths=jnp.where(keep, self.lengths, 0),
            counts=jnp.where(keep, self.counts, 0),
            errors=jnp.where(keep, self.errors, 0) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def insert_into_slot(self, slot, single: KVCache, prefix=None) -> PlannedCache:
        """Put a one-sequence contiguous cache of every layer into ``slot`` (each group takes its layers; a ring
        only what it keeps). ``prefix=(pages, n)`` (paged plans): ``pages`` one vector per group, from ``pin``.
        A group that cannot take it (a pool) leaves the slot empty in every group."""
        if not isinstance(single, KVCache):
            raise TypeError(f"single must be a jkv.KVCache, got {type(single).__name__}")
        checks.same_layout("single", single.spec, self.spec)
        at, ok = checks.index_in_range("slot", slot, self.batch)
        groups = []
        for g, (_, layers) in enumerate(self.plan.groups):
            part = take_layers(single, layers)
            extra = {} if prefix is None else {"prefix": (prefix[0][g], prefix[1])}
            groups.append(self._synced(g).insert_into_slot(slot, part, **extra))
        hit = (jnp.arange(self.batch) == at) & ok
        failed = hit & ~self._agreed(groups)
        if len(groups) > 1:
            groups = [lax.cond(jnp.any(failed), lambda c: c.reset_slot(slot), lambda c: c, c) for c in groups]
        errors = jnp.zeros_like(self.errors)
        for group in groups:
            errors = errors | group.errors
        length = jnp.where(failed, 0, groups[0].lengths)
        return self._with(
            groups,
            lengths=jnp.where(hit, length, self.lengths),
            counts=jnp.where(hit, 0, self.counts),
            errors=jnp.where(hit, errors, self.errors) | jnp.where(ok, 0, ERR_BAD_SLOT),
        )

    def extract_slot(self, slot, max_len: int | None = None) -> KVCache:
        """The one-sequence contiguous cache of every layer of ``slot`` (a ring's positions it let go read 0)."""
        max_len = self.max_len if max_len is None else checks.positive_int("max_len", max_len)
        if max_len > self.max_len:
            raise ValueError(f"{max_len=} exceeds this cache's max_len={self.max_len}")
        parts = [self._synced(g, self.errors).extract_slot(slot, max_len) for g in range(len(self.groups))]
        return self._merge(parts, max_len)

    def to_contiguous(self) -> KVCache:
        """Every layer as one contiguous cache (a ring's positions it let go read 0)."""
        parts = []
        for g in range(len(self.groups)):
            group = self._synced(g, self.errors)
            parts.append(group.to_contiguous() if self.plan.paged(g) else group)
        return self._merge(parts, self.max_len)

    def _merge(self, parts, max_len: int) -> KVCache:
        order = np.argsort(np.concatenate([layers for _, layers in self.plan.groups]))
        data = []
        for arrays in zip(*(p.data for p in parts), strict=True):
            stacked = jnp.concatenate([x[:, :, :, :max_len] for x in arrays], axis=0)
            data.append(stacked[order] if (order != np.arange(order.size)).any() else stacked)
        first = parts[0]
        spec = self.spec.replace(max_len=max_len)
        return KVCache(tuple(data), first.lengths, first.counts, first.errors, spec=spec, format=self.format)

    # ------------------------------------------------------------------ paged plans: prefix pages
    def pin(self, slot, length):
        """``PagedKVCache.pin`` in every group: ``(cache, pages)`` with ``pages`` a tuple, one vector per group
        (a ring's pages it let go are ``NO_PAGE``)."""
        if self.plan.layout != "paged":
            raise TypeError("pin needs a paged plan")
        groups, pages = [], []
        for g in range(len(self.groups)):
            group, held = self._synced(g).pin(slot, length)
            groups.append(group)
            pages.append(held)
        return self._with(groups), tuple(pages)

    def unpin(self, pages) -> PlannedCache:
        groups = [group.unpin(p) for group, p in zip(self.groups, pages, strict=True)]
        return self.replace(groups=tuple(groups))

    # ------------------------------------------------------------------ reading
    def layer(self, layer, dtype=None, *, stored: bool = False):
        g, i = self._where(layer)
        k, v = self._synced(g).layer(i, dtype, stored=stored)
        return k[:, :, : self.max_len], v[:, :, : self.max_len]

    def storage(self) -> tuple:
        return tuple(group.storage() for group in self.groups)

    def partition_specs(self) -> PlannedCache:
        per_seq = P(DP)
        groups = tuple(group.partition_specs() for group in self.groups)
        return self.replace(groups=groups, lengths=per_seq, counts=per_seq, errors=per_seq)

    def snapshot(self, trim: bool = True):
        """Every layer's logical contents on the host (a ``Snapshot``; ``restore`` rebuilds the plan)."""
        return self.to_contiguous().snapshot(trim=trim)
