"""Cache kinds by name: the one list the CLI, the engine and the generator offer (``kinds()``, ``make_cache``).

A kind is a layout (``contiguous`` or ``paged``) times a format; adding a format or a layout is one class plus one
entry here (docs/adding-a-format.md).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jkv.caches.base import CacheSpec
from jkv.caches.contiguous import KVCache
from jkv.caches.formats import FP8, Q8, Format, Plain, bind
from jkv.caches.paged import PagedKVCache
from jkv.caches.plan import PlannedCache

PAGE_SIZE = 16  # positions per page of the paged kinds (max_len must be a multiple)
LAYOUTS = {"contiguous": KVCache, "paged": PagedKVCache}


@dataclasses.dataclass(frozen=True)
class Kind:
    """A named cache kind. ``dtype``: the stored dtype a plain kind forces (None: the spec's)."""

    name: str
    layout: str
    format: Format
    dtype: object = None

    @property
    def paged(self) -> bool:
        return self.layout == "paged"

    def spec_for(self, spec: CacheSpec) -> CacheSpec:
        return spec if self.dtype is None else spec.replace(dtype=jnp.dtype(self.dtype))

    def bytes_per_token(self, spec: CacheSpec) -> int:
        spec = self.spec_for(spec)
        return bind(self.format, spec).bytes_per_token(spec)

    def single(self, spec: CacheSpec):
        """An empty one-sequence contiguous cache of this kind's format: what a prefill fills and
        ``insert_into_slot`` takes."""
        return KVCache.init(self.spec_for(spec), 1, format=self.format)


_KINDS = (
    Kind("bf16", "contiguous", Plain(), jnp.bfloat16),
    Kind("f32", "contiguous", Plain(), jnp.float32),
    Kind("q8", "contiguous", Q8()),
    Kind("fp8", "contiguous", FP8()),
    Kind("paged", "paged", Plain()),
    Kind("q8-paged", "paged", Q8()),
    Kind("fp8-paged", "paged", FP8()),
)
KINDS = {kind.name: kind for kind in _KINDS}


def whole_pages(positions: int) -> int:
    """``positions`` rounded up to whole pages of ``PAGE_SIZE`` (a paged cache's ``max_len``)."""
    return -(-positions // PAGE_SIZE) * PAGE_SIZE


def kinds() -> tuple[str, ...]:
    """The names of every cache kind."""
    return tuple(KINDS)


def kind(name: str) -> Kind:
    if not isinstance(name, str):
        raise TypeError(f"cache kind must be a name (a str), got {name!r}: one of {kinds()}")
    if name not in KINDS:
        raise ValueError(f"cache kind {name!r} is not one of {kinds()}")
    return KINDS[name]


def make_cache(name: str, spec: CacheSpec, batch: int, *, windows=None, slack: int | None = None, **options):
    """An empty cache of kind ``name``. ``options``: ``page_size`` (default ``PAGE_SIZE``) and ``num_pages`` for
    the paged kinds; a ``format`` to replace the kind's (e.g. ``Q8(rotated=False)``).

    ``windows`` (one entry per layer, None: full; e.g. ``config.windows``): when any layer has a window, a
    per-layer plan (``jkv.caches.plan.PlannedCache``) of the kind's layout: windowed layers keep rings of
    ``window - 1 + slack`` positions (``slack`` default ``page_size``: the most tokens a step adds and the deepest
    rollback); ``window_pages`` sizes each ring's pool."""
    k = kind(name)
    format = options.pop("format", k.format)
    spec = k.spec_for(spec)
    if windows is not None and any(w is not None for w in windows):
        page_size = options.pop("page_size", PAGE_SIZE)
        slack = page_size if slack is None else slack
        if not k.paged and options.pop("num_pages", None) is not None:
            raise TypeError(f"cache kind {name!r} takes no num_pages")
        return PlannedCache.init(
            spec, batch, windows=windows, slack=slack, layout=k.layout, format=format, page_size=page_size, **options
        )
    if k.paged:
        options.setdefault("page_size", PAGE_SIZE)
        return PagedKVCache.init(spec, batch, format=format, **options)
    if options:
        raise TypeError(f"cache kind {name!r} takes no options {sorted(options)}")
    return KVCache.init(spec, batch, format=format)
