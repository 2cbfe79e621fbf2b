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

Every operation of the uniform kinds works group by group: the step, rollback, reset / reset_slot, insert / extract
a slot, ``fork`` (a paged group, every ring included, shares ``src``'s pages copy-on-write; a contiguous full group
copies the row), ``with_format``, snapshot / ``restore`` (of any kind's snapshot), ``to_contiguous`` /
``from_contiguous``, shard specs; paged plans also ``pin`` / ``unpin`` / ``read_pinned`` and ``insert_into_slot
(prefix=)``, with one page vector per group. Refused, with why: prefix pages on a contiguous plan (its groups
share no pages: a prefix is a device copy), and one pool's attributes (``block_tables``, ``num_free_pages`` ...:
``PER_GROUP``), which a plan has once per group (``cache.groups[g]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int

from jkv.caches import checks
from jkv.caches.base import ERR_BAD_SLOT, ERR_WINDOW, Cache, CacheSpec
from jkv.caches.contiguous import KVCache
from jkv.caches.formats import Format, Plain, bind
from jkv.caches.layer_plan import LayerPlan, join_layers, take_layers
from jkv.caches.paged import PagedKVCache
from jkv.caches.sharding import DP

# What one contiguous array or one page pool answers: a plan holds one per group, so it answers none of them.
PER_GROUP = frozenset(
    ("data", "pages", "block_tables", "refcounts", "pins", "ring", "page_size", "num_pages", "max_pages",
     "num_free_pages", "pages_held", "first_page")
)  # fmt: skip


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
    def restore(cls, snap, max_len: int | None = None, **plan_options) -> PlannedCache:
        """Rebuild from a ``Snapshot`` of any kind (``max_len`` as ``KVCache.restore``; ``from_contiguous``'s
        options)."""
        return cls.from_contiguous(KVCache.restore(snap, max_len), **plan_options)

    def with_format(self, format: Format) -> PlannedCache:
        """Every group re-stored in ``format`` (``KVCache.with_format``, ``PagedKVCache.with_format``: pages,
        tables and sharing kept); lengths, counts and errors kept."""
        format = bind(format, self.spec)
        return self.replace(groups=tuple(group.with_format(format) for group in self.groups), format=format)

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

    def with_layer_cache(self, layer, sub) -> PlannedCache:
        g, _ = self._where(layer)
        groups = list(self.groups)
        groups[g] = sub
        return self._with(groups)

    @property
    def windows(self) -> tuple[int | None, ...]:
        return self.plan.windows

    def __getattr__(self, name):  # only reached for names the class lacks
        if name in PER_GROUP:
            raise AttributeError(
                f"a PlannedCache has no {name!r}: each layer group has its own arrays (a paged group its own pool); "
                f"read cache.groups[g].{name}, group g holding the layers cache.plan.groups[g] (window, layers)"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ step
    def begin(self, counts) -> PlannedCache:
        counts, _, bits = self._declare(counts)
        if self.plan.layout == "contiguous":  # bounded rings: refused here, so that no group takes it
            long = (counts > self.plan.slack) & any(w is not None for w in self.plan.windows)
            message = lambda: f"begin(counts={np.asarray(counts)}) exceeds the rings' slack={self.plan.slack}"
            checks.host_all(~long, message)
            counts, bits = jnp.where(long, 0, counts), jnp.where(long, ERR_WINDOW, bits)
        groups, agreed = [], counts
        if self.plan.layout == "paged" and len(self.groups) > 1:  # first which sequences every pool serves: no
            for g in range(len(self.groups)):  # ring gives back its pages for a step another pool then refuses
                dry = self._synced(g).begin(agreed)
                agreed, bits = dry.counts, bits | dry.errors
        for g in range(len(self.groups)):
            groups.append(self._synced(g).begin(agreed))
            agreed = groups[-1].counts
        if self.plan.layout == "paged" and len(groups) > 1:  # a pool refused a sequence: the others let it go too
            # Every group but the last (whose counts are the agreed ones) reserves again for the agreed counts: the
            # same pages' worth where nothing was refused. Unconditionally: a ``lax.cond`` on "anything refused"
            # would make the host read its predicate back on a GPU, holding the dispatch of each step until the
            # previous one is done (tests/serving/test_step_host_sync.py).
            groups[:-1] = [c.rollback(c.lengths).begin(agreed) for c in groups[:-1]]
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

    def fork(self, src, dst) -> PlannedCache:
        """Make sequence ``dst`` a copy of ``src`` in every group (n samples or beams from one prompt): a paged
        group (every ring, a paged plan's full layers) shares ``src``'s pages copy-on-write (``PagedKVCache.fork``:
        a ring shares the pages it holds), a contiguous plan's full group copies its row (``KVCache.fork``).
        ``src == dst`` changes nothing; a slot out of range under ``jit`` changes nothing and flags
        ``ERR_BAD_SLOT`` (host calls raise). No page is taken, so no group can refuse it."""
        checks.index_in_range("src", src, self.batch)
        checks.index_in_range("dst", dst, self.batch)
        groups = [self._synced(g, self.errors).fork(src, dst) for g in range(len(self.groups))]
        first = groups[0]  # every group did the same to lengths, counts and errors
        return self._with(groups, lengths=first.lengths, counts=first.counts, errors=first.errors)

    def insert_into_slot(self, slot, single: KVCache, prefix=None) -> PlannedCache:
        """Put a one-sequence contiguous cache of every layer into ``slot`` (each group takes its layers; a ring
        only what it keeps). ``prefix=(pages, n)`` (paged plans): ``pages`` one vector per group, from ``pin``.
        A group that cannot take it (a pool) leaves the slot empty in every group."""
        if not isinstance(single, KVCache):
            raise TypeError(f"single must be a jkv.KVCache, got {type(single).__name__}")
        checks.same_layout("single", single.spec, self.spec)
        at, ok = checks.index_in_range("slot", slot, self.batch)
        if prefix is not None:
            self._paged_only("insert_into_slot(prefix=)")
            pages, n = prefix
            prefix = (self._per_group("prefix pages", pages), n)
        groups = []
        for g, (_, layers) in enumerate(self.plan.groups):
            part = take_layers(single, layers)
            extra = {} if prefix is None else {"prefix": (prefix[0][g], prefix[1])}
            groups.append(self._synced(g).insert_into_slot(slot, part, **extra))
        hit = (jnp.arange(self.batch) == at) & ok
        failed = hit & ~self._agreed(groups)
        if len(groups) > 1:  # a select of the slot's metadata, not a cond (which would hold a copy of the pools)
            groups = [_select(jnp.any(failed), c.reset_slot(slot), c) for c in groups]
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
        return join_layers(parts, self.plan, self.spec, max_len)

    def to_contiguous(self) -> KVCache:
        """Every layer as one contiguous cache (a ring's positions it let go read 0)."""
        parts = []
        for g in range(len(self.groups)):
            group = self._synced(g, self.errors)
            parts.append(group.to_contiguous() if self.plan.paged(g) else group)
        return join_layers(parts, self.plan, self.spec, self.max_len)

    # ------------------------------------------------------------------ paged plans: prefix pages
    def pin(self, slot, length):
        """``PagedKVCache.pin`` in every group: ``(cache, pages)`` with ``pages`` a tuple, one vector per group
        (a ring's pages it let go are ``NO_PAGE``)."""
        self._paged_only("pin")
        groups, pages = [], []
        for g in range(len(self.groups)):
            group, held = self._synced(g).pin(slot, length)
            groups.append(group)
            pages.append(held)
        return self._with(groups), tuple(pages)

    def unpin(self, pages) -> PlannedCache:
        """Give back what ``pin`` returned (one vector per group)."""
        self._paged_only("unpin")
        pages = self._per_group("pages", pages)
        groups = [group.unpin(p) for group, p in zip(self.groups, pages, strict=True)]
        return self.replace(groups=tuple(groups))

    def read_pinned(self, pages, length) -> KVCache:
        """Positions ``[0, length)`` of what ``pin`` returned (one vector per group, all of the same length
        ``m``) as a one-sequence contiguous cache of every layer and ``max_len = m * page_size``
        (``PagedKVCache.read_pinned``; a ring's positions it let go read 0)."""
        self._paged_only("read_pinned")
        pages = self._per_group("pages", pages)
        widths = [jnp.shape(p) for p in pages]
        if len(set(widths)) != 1 or len(widths[0]) != 1:
            raise ValueError(f"pages must be vectors of one length, one per group, got shapes {widths}")
        parts = [group.read_pinned(p, length) for group, p in zip(self.groups, pages, strict=True)]
        return join_layers(parts, self.plan, self.spec, parts[0].max_len)

    def _paged_only(self, what: str) -> None:
        if self.plan.layout != "paged":
            raise TypeError(
                f"{what} needs a paged plan (pinned pages); this plan is contiguous: a prefix is a device copy "
                "(extract_slot, then insert_into_slot of it cut to its length)"
            )

    def _per_group(self, name: str, value) -> tuple:
        """``value`` as a tuple of one entry per group (as ``pin`` returns pages)."""
        if not isinstance(value, (tuple, list)) or len(value) != len(self.groups):
            got = f"{len(value)} entries" if isinstance(value, (tuple, list)) else type(value).__name__
            windows = [w for w, _ in self.plan.groups]
            raise ValueError(f"{name} must hold one page vector per group of windows {windows} (pin's), got {got}")
        return tuple(value)

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


def _select(flag, a, b):
    """``a`` where ``flag`` else ``b``, leaf by leaf; a leaf the two share (a pool neither touched) passes through
    without a select."""
    return jax.tree.map(lambda x, y: x if x is y else jnp.where(flag, x, y), a, b)
