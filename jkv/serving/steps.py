"""The serving steps: the cache kinds and the jitted, cache-donating functions the engine dispatches.

Every cache the serving code holds is built by ``make_cache`` from a name of ``CACHE_KINDS`` (the one kind list).
``Steps`` compiles each function ahead of time on its first call for a shape (the mixed step once per token bucket,
``jkv.serving.mixed``; the prefix-cache copies once per length bucket), counts the seconds spent compiling, and runs
the compiled executable afterwards: the batch cache is donated, so XLA updates it in place.

Token ids are the only values a step returns to the host. A row whose logits hold NaN or Inf returns
``sampling.NONFINITE`` instead of a token (``sampling.choose``), so the check costs no extra transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from jkv.caches import KVCache, PlannedCache, registry
from jkv.models import llama
from jkv.serving import mixed

CACHE_KINDS = registry.kinds()  # and "default": contiguous, in the weights' dtype
PAGE_SIZE = registry.PAGE_SIZE


def cache_kinds() -> tuple[str, ...]:
    """The cache kinds a ``Generator`` / ``Engine`` / ``jkv generate --cache`` accepts (besides ``"default"``)."""
    return CACHE_KINDS


def check_kind(kind: str, max_len: int) -> None:
    """Raise ``ValueError`` for an unknown kind, or a ``max_len`` its pages cannot tile."""
    if kind != "default" and kind not in CACHE_KINDS:
        raise ValueError(f"cache={kind!r} is not one of {sorted(CACHE_KINDS)}")
    if is_paged(kind) and max_len % PAGE_SIZE:
        raise ValueError(f"a paged cache needs max_len a multiple of its page size {PAGE_SIZE}, got {max_len=}")


def is_paged(kind: str) -> bool:
    """Whether ``kind`` keeps a page pool (prefix-cache entries are then pinned pages, not copies)."""
    return kind != "default" and registry.kind(kind).paged


def kind_dtype(kind: str, default):
    """The dtype a cache of ``kind`` stands for (its layers' dtype): the kind's own, else ``default``."""
    forced = None if kind == "default" else registry.kind(kind).dtype
    return default if forced is None else jnp.dtype(forced)


def make_cache(kind: str, spec, batch: int, *, num_pages: int | None = None, plan=None, **options):
    """An empty cache of ``kind`` for ``batch`` sequences. ``"default"``: contiguous in ``spec.dtype``.
    ``num_pages`` sizes a paged kind's pool (default: every sequence can fill its row); ``options`` are fields of
    the kind's storage format (``rotated=False``: Q8 without the Hadamard rotation). ``plan``: ``{"windows":
    ..., "slack": ..., "window_pages": ...}`` for a per-layer plan (``registry.make_cache``)."""
    check_kind(kind, spec.max_len)
    plan = {} if plan is None else {"page_size": PAGE_SIZE, **plan}
    if kind == "default":
        return PlannedCache.init(spec, batch, **plan, **options) if plan else KVCache.init(spec, batch, **options)
    fmt = dataclasses.replace(registry.kind(kind).format, **options)
    paging = {"page_size": PAGE_SIZE, "num_pages": num_pages} if is_paged(kind) else {}
    return registry.make_cache(kind, spec, batch, format=fmt, **(paging | plan))


def pow2_bucket(n: int, cap: int) -> int:
    """``n`` rounded up to a power of two, at most ``cap`` (few shapes of a copy compile)."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


# ---------------------------------------------------------------------------------------------- compiled steps
@functools.cache
def _shared_jit(fn, donate, statics: tuple):
    """One ``jax.jit`` of ``fn`` per static arguments, shared by every engine of the process: engines of the same
    model, cache kind and slot count reuse each other's compiled steps (JAX caches them per argument shapes)."""
    return jax.jit(functools.partial(fn, **dict(statics)), donate_argnums=donate)


class Steps:
    """The jitted steps of one engine (one model, one cache kind, one batch of slots), compiled once per shape.

    ``mesh`` (``jkv.parallel.make_mesh``): steps are traced with it active (Pallas kernels run per shard) and hand
    the batch cache back in ``cache_sharding`` (kept split between steps). ``compile_s`` sums the seconds of each
    step's first call per shape (tracing and compiling; nearly nothing when another engine compiled it);
    ``compiled`` holds the ``(step, shape key)`` pairs called so far.
    """

    def __init__(self, config, options: llama.LlamaOptions, mesh=None, cache_sharding=None):
        self.config, self.options, self.mesh, self._sharding = config, options, mesh, cache_sharding
        self.compiled: set[tuple] = set()
        self.compile_s = 0.0
        self.compiles: list[tuple[float, float]] = []  # (start, end) of each first call, time.perf_counter
        self._own: dict[tuple, object] = {}  # jitted steps of a mesh engine (their output shardings are its own)

    def _jitted(self, fn, donate, cache_out, statics):
        if self._sharding is None or cache_out is None:
            return _shared_jit(fn, donate, statics)
        key = (fn, donate, statics)
        if key not in self._own:
            part = functools.partial(fn, **dict(statics))
            self._own[key] = jax.jit(part, donate_argnums=donate, out_shardings=cache_out(self._sharding))
        return self._own[key]

    def _run(self, name, key, fn, donate, args, cache_out=None, **statics):
        """Call step ``name`` (``fn`` with ``statics``) on ``args``; the first call of ``(name, key)`` is timed.
        ``cache_out(sharding)``: the output shardings that keep a returned batch cache split over the mesh."""
        jitted = self._jitted(fn, donate, cache_out, tuple(sorted(statics.items())))
        first = (name, key) not in self.compiled
        start = time.perf_counter()
        context = contextlib.nullcontext()
        if self.mesh is not None:
            from jkv import parallel

            context = parallel.use_mesh(self.mesh)
        with context:
            out = jitted(*args)
        if first:
            self.compiled.add((name, key))
            self.compiles.append((start, time.perf_counter()))
            self.compile_s += self.compiles[-1][1] - start
        return out

    def compile_s_between(self, start: float, end: float) -> float:
        """Seconds of compiling between two ``time.perf_counter`` readings (e.g. a request's submission and its
        first token)."""
        return sum(max(min(e, end) - max(s, start), 0.0) for s, e in self.compiles)

    def _model(self, **more):
        return {"config": self.config, "options": self.options, **more}

    def mixed(self, params, cache, *inputs, lm_rows: int = 1):
        """One mixed step (``jkv.serving.mixed.mixed_step``) of the inputs after ``(params, cache)``, the first
        two being the packed host inputs (``mixed.pack``) and the previous tokens ``[B]``: ``(out, cache)``."""
        key = (mixed.packed_tokens(inputs[0].shape[0], inputs[1].shape[0]), lm_rows)
        args = (params, cache, *inputs)
        return self._run("mixed", key, mixed.mixed_step, 1, args, _mixed_out, **self._model(rows=lm_rows))

    def mixed_traced(self, params, cache, *inputs, lm_rows: int = 1):
        """The mixed step ``mixed`` runs on these inputs, traced (nothing compiles or runs): to lower it for a
        platform of one's choosing."""
        statics = tuple(sorted(self._model(rows=lm_rows).items()))
        return self._jitted(mixed.mixed_step, 1, _mixed_out, statics).trace(params, cache, *inputs)

    def mixed_executable(self, params, cache, *inputs, lm_rows: int = 1):
        """The mixed step ``mixed`` runs on these inputs, compiled (nothing runs): for its memory analysis."""
        return self.mixed_traced(params, cache, *inputs, lm_rows=lm_rows).lower().compile()

    def sample(self, logits, *rows, truncate: bool = True):
        """The tokens of a step where some row samples (``jkv.serving.mixed.sample_step``; ``rows``: key_data,
        index, temperature, top_k, top_p): a program for every bucket, and one without the sort (``truncate=False``:
        no row limits top-k or top-p)."""
        key = (logits.shape, truncate)
        return self._run("sample", key, mixed.sample_step, (), (logits, *rows), truncate=truncate)

    def mixed_variants(self) -> list[tuple]:
        """The ``(T, rows)`` keys of the mixed steps compiled (called) so far."""
        return sorted(key for name, key in self.compiled if name == "mixed")

    def decode_executable(self, params, cache):
        """A compiled decode-only step ``(params, cache, tokens [B], *greedy_rows(B)) -> (tokens, cache)``: one
        token per slot (for device loops in benchmarks; nothing runs)."""
        tokens = jnp.zeros((cache.batch,), jnp.int32)
        jitted = self._jitted(mixed.decode_only, 1, lambda c: (None, c), tuple(sorted(self._model().items())))
        return jitted.lower(params, cache, tokens, *greedy_rows(cache.batch)).compile()

    def retire(self, cache, mask):
        """Empty the slots of ``mask`` (lengths and error bits to 0; a paged slot's pages go back)."""
        return self._run("retire", (), mixed.reset_slots, 0, (cache, mask), lambda c: c)

    def attach(self, cache, slot, pages, n, single):
        """Paged: slot ``slot`` starts with the first ``n`` positions of pinned ``pages`` (shared)."""
        args = (cache, jnp.int32(slot), pages, jnp.int32(n), single)
        return self._run("attach", (), mixed.attach_prefix, 0, args, lambda c: c)

    def restore(self, cache, slot, entry, n):
        """Contiguous: slot ``slot`` holds the first ``n`` positions of the device copy ``entry``."""
        args = (cache, jnp.int32(slot), entry, jnp.int32(n))
        return self._run("restore", entry.max_len, mixed.restore_prefix, 0, args, lambda c: c)

    def extract(self, cache, slot, max_len: int):
        """A device copy of slot ``slot``'s first ``max_len`` positions (a contiguous prefix-cache entry)."""
        return self._run("extract", max_len, mixed.extract_copy, (), (cache, jnp.int32(slot)), max_len=max_len)

    def pin(self, cache, slot, n):
        """Pin the pages of slot ``slot``'s first ``n`` positions: ``(cache, their page ids)``."""
        args = (cache, jnp.int32(slot), jnp.int32(n))
        return self._run("pin", (), mixed.pin_pages, 0, args, lambda c: (c, None))

    def unpin(self, cache, pages):
        return self._run("unpin", (), mixed.unpin_pages, 0, (cache, pages), lambda c: c)


def _mixed_out(cache_sharding):
    """The output shardings of a mixed step, given the batch cache's (``Steps._jitted``'s ``cache_out``): two
    outputs ahead of the cache (greedy ids and logits, or targets and accepted counts)."""
    return (None, None), cache_sharding


def greedy_rows(batch: int):
    """Sampling inputs ``(key_data, index, temperature, top_k, top_p)`` of ``batch`` greedy rows."""
    return (
        jnp.zeros((batch, 2), jnp.uint32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.ones((batch,), jnp.float32),
    )


__all__ = [
    "CACHE_KINDS",
    "PAGE_SIZE",
    "Steps",
    "cache_kinds",
    "check_kind",
    "greedy_rows",
    "is_paged",
    "kind_dtype",
    "make_cache",
    "pow2_bucket",
]
