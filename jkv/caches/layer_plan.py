"""The static side of a per-layer cache plan (``jkv.caches.plan``): which layers have which window
(``LayerPlan``: its groups, each group's spec and ring), and how a contiguous cache of every layer splits into
groups (``take_layers``) and joins back (``join_layers``)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jkv.caches import checks, pool
from jkv.caches.base import CacheSpec
from jkv.caches.contiguous import KVCache
from jkv.caches.ring import Ring

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


def join_layers(parts, plan: LayerPlan, spec: CacheSpec, max_len: int) -> KVCache:
    """One contiguous cache of every layer from one contiguous cache per group (``parts``, in ``plan.groups``
    order, each of at least ``max_len`` positions); lengths, counts and errors are the first part's."""
    order = np.argsort(np.concatenate([layers for _, layers in plan.groups]))
    data = []
    for arrays in zip(*(p.data for p in parts), strict=True):
        stacked = jnp.concatenate([x[:, :, :, :max_len] for x in arrays], axis=0)
        data.append(stacked[order] if (order != np.arange(order.size)).any() else stacked)
    first = parts[0]
    spec = spec.replace(max_len=max_len)
    return KVCache(tuple(data), first.lengths, first.counts, first.errors, spec=spec, format=first.format)
