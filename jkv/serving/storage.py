"""What the engine's cache holds: slots, pages and per-layer rings, sized from the options and the free memory."""

from __future__ import annotations

from typing import NamedTuple

from jkv import memory
from jkv.caches import CacheSpec, Ring
from jkv.serving import steps
from jkv.serving.options import EngineOptions, default_num_slots


class Storage(NamedTuple):
    """``per_token``: bytes per position of a slot's format; ``plan``: the per-layer plan's options (None: every
    layer full-length); ``num_pages`` / ``page_size``: None for contiguous caches."""

    spec: CacheSpec
    per_token: int
    num_slots: int
    page_size: int | None
    num_pages: int | None
    plan: dict | None

    @property
    def window_slack(self) -> int | None:
        return None if self.plan is None else self.plan["slack"]

    def make_cache(self, options: EngineOptions):
        return steps.make_cache(
            options.cache, self.spec, self.num_slots, num_pages=self.num_pages, plan=self.plan,
            **dict(options.cache_options),
        )  # fmt: skip


def plan_storage(options: EngineOptions, config, weights_dtype, mesh=None, verbose: bool = True) -> Storage:
    """Slots (``options.num_slots`` or what fits the free memory), pages of the paged kinds (every slot can fill
    its row, and prefix entries pin at most ``prefix_cache_bytes`` more, as far as the free memory goes; beyond
    that the scheduler makes requests wait) and the rings of windowed layers (every slot fills its ring, plus one
    step's chunks and pinned prefixes, so that a ring's pool never runs out)."""
    dtype = steps.kind_dtype(options.cache, weights_dtype if options.cache_dtype is None else options.cache_dtype)
    spec = CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, options.max_len, dtype)
    probe = steps.make_cache(options.cache, spec.replace(max_len=steps.PAGE_SIZE), 1, **dict(options.cache_options))
    per_token = probe.format.bytes_per_token(probe.spec)
    paged = steps.is_paged(options.cache)
    windows, plan = options.windows(config), None
    slot_per_token = per_token
    if windows is not None:  # a per-layer plan: windowed layers on rings
        plan = {"windows": windows, "slack": options.slack(paged)}
        ring = memory.plan_bytes(spec, 1, windows, slack=plan["slack"], page_size=steps.PAGE_SIZE)
        slot_per_token = -(-ring * per_token // memory.cache_bytes(spec, 1))  # what a slot really takes
    num_slots = options.num_slots or default_num_slots(spec, slot_per_token, mesh, verbose)
    if not paged:
        return Storage(spec, per_token, num_slots, None, None, plan)
    page_size = steps.PAGE_SIZE
    page_bytes = per_token * page_size
    full = num_slots * (options.max_len // page_size) + options.prefix_cache_bytes // page_bytes
    num_pages = options.num_pages or max(min(full, memory.usable_bytes() // page_bytes), 1)
    if plan is not None:
        ring_pages = max(Ring(w, plan["slack"]).pages_per_sequence(page_size) for w in windows if w is not None)
        extra = -(-options.batch_tokens // page_size) + options.prefix_cache_bytes // page_bytes
        plan["window_pages"] = num_slots * (ring_pages + 1) + extra
    return Storage(spec, per_token, num_slots, page_size, num_pages, plan)
