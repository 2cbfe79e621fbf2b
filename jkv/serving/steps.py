"""The serving steps: the cache kinds, the prefill buckets, and the jitted, cache-donating step functions.

Every cache the serving code holds is built by ``make_cache`` from a name of ``CACHE_KINDS`` (the one kind list).
``Steps`` compiles each step ahead of time on its first call for a shape (the prefill once per bucket, decode and
verify once per engine), counts the seconds spent compiling, and runs the compiled executable afterwards: the
batch cache is donated, so XLA updates it in place.

Token ids are the only values a step returns to the host. A row whose logits hold NaN or Inf returns
``sampling.NONFINITE`` instead of a token (``sampling.choose``), so the check costs no extra transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp

from jkv.caches import KVCache, registry
from jkv.models import llama
from jkv.serving.sampling import NONFINITE, choose

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


def make_cache(kind: str, spec, batch: int, *, num_pages: int | None = None, **options):
    """An empty cache of ``kind`` for ``batch`` sequences. ``"default"``: contiguous in ``spec.dtype``.
    ``num_pages`` sizes a paged kind's pool (default: every sequence can fill its row); ``options`` are fields of
    the kind's storage format (``rotated=False``: Q8 without the Hadamard rotation)."""
    check_kind(kind, spec.max_len)
    if kind == "default":
        return KVCache.init(spec, batch, **options)
    fmt = dataclasses.replace(registry.kind(kind).format, **options)
    paging = {"page_size": PAGE_SIZE, "num_pages": num_pages} if is_paged(kind) else {}
    return registry.make_cache(kind, spec, batch, format=fmt, **paging)


def staging_kind(kind: str) -> str:
    """The contiguous kind a prompt of a ``kind`` slot prefills into (``insert_into_slot`` takes it): the same
    storage format, one sequence."""
    if not is_paged(kind):
        return kind
    fmt = registry.kind(kind).format
    same = [k.name for k in registry.KINDS.values() if k.layout == "contiguous" and k.format == fmt and k.dtype is None]
    return same[0] if same else "default"


def prefill_bucket(n: int, minimum: int, cap: int) -> int:
    """Padded length of an ``n``-token prefill: ``minimum`` times a power of two (so at most log2(max_len)
    shapes compile), at most ``cap``."""
    blocks = -(-n // minimum)
    return min((1 << (blocks - 1).bit_length()) * minimum, cap)


# ---------------------------------------------------------------------------------------------- the step bodies
def _prefill(params, single, tokens, true_len, key_data, index, temperature, top_k, top_p, *, config, options):
    last = true_len - 1 - single.lengths  # index of the last prompt token among the new ones
    logits, single = llama.prefill(params, single, tokens, last, config=config, options=options)
    single = single.rollback(jnp.minimum(single.lengths, true_len))  # drop the bucket's padding
    return choose(logits, key_data, index, temperature, top_k, top_p), single


def _decode(params, cache, tokens, active, key_data, index, temperature, top_k, top_p, *, config, options):
    before = cache.lengths
    logits, cache = llama.decode_step(params, cache, tokens, config=config, options=options)
    cache = cache.rollback(jnp.where(active, cache.lengths, before))  # idle slots do not move
    return choose(logits, key_data, index, temperature, top_k, top_p), cache


def _verify(params, cache, tokens, active, *, config, options):
    before = cache.lengths
    logits, cache = llama.forward(params, cache, tokens, config=config, options=options)  # (B, k+1, V)
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    target = jnp.where(jnp.all(jnp.isfinite(logits), axis=-1), target, NONFINITE)
    agree = (tokens[:, 1:] == target[:, :-1]).astype(jnp.int32)
    accepted = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)  # leading drafts the model agrees with
    cache = cache.rollback(jnp.where(active, before + accepted + 1, before))
    return target, accepted, cache


def _retire(cache, mask):
    cache = cache.rollback(jnp.where(mask, 0, cache.lengths))
    return cache.replace(errors=jnp.where(mask, 0, cache.errors))


# ---------------------------------------------------------------------------------------------- compiled steps
class Steps:
    """The jitted steps of one engine (one model, one cache kind, one batch of slots), compiled once per shape.

    ``mesh`` (``jkv.parallel.make_mesh``): steps are lowered with it active (Pallas kernels run per shard) and
    hand the batch cache back in ``cache_sharding`` (kept split between steps). ``compile_s`` sums the seconds
    spent compiling; ``compiled`` maps ``(step, shape key)`` to its executable.
    """

    def __init__(self, config, options: llama.LlamaOptions, mesh=None, cache_sharding=None):
        self.config, self.options, self.mesh, self._sharding = config, options, mesh, cache_sharding
        self.compiled: dict[tuple, object] = {}
        self.compile_s = 0.0

    def _executable(self, name, key, fn, donate, args, cache_out=None):
        """Step ``name``'s executable for ``args``, compiled first if ``(name, key)`` is new. ``cache_out(sharding)``:
        the output shardings that keep a returned batch cache split over the mesh."""
        exe = self.compiled.get((name, key))
        if exe is None:
            start = time.perf_counter()
            kw = {}
            if self._sharding is not None and cache_out is not None:
                kw["out_shardings"] = cache_out(self._sharding)
            context = contextlib.nullcontext()
            if self.mesh is not None:
                from jkv import parallel

                context = parallel.use_mesh(self.mesh)
            with context:
                exe = jax.jit(fn, donate_argnums=donate, **kw).lower(*args).compile()
            self.compiled[(name, key)] = exe
            self.compile_s += time.perf_counter() - start
        return exe

    def _run(self, name, key, fn, donate, args, cache_out=None):
        return self._executable(name, key, fn, donate, args, cache_out)(*args)

    def _model(self, fn):
        return lambda *a: fn(*a, config=self.config, options=self.options)

    def prefill(self, params, single, tokens, true_len, *rows):
        """Prompt tokens ``[1, T]`` (T a bucket) into the one-sequence ``single``: ``(first token [1], single)``."""
        args = (params, single, tokens, true_len, *rows)
        return self._run("prefill", tokens.shape[1], self._model(_prefill), 1, args)

    def decode(self, params, cache, tokens, active, *rows):
        """One token per active slot: ``(next tokens [B], cache)``; idle slots keep their lengths."""
        args = (params, cache, tokens, active, *rows)
        return self._run("decode", (), self._model(_decode), 1, args, lambda c: (None, c))

    def decode_executable(self, params, cache):
        """The compiled decode step ``(params, cache, tokens, *greedy_rows(B)) -> (tokens, cache)``, for device
        loops in benchmarks (compiled here if no decode ran yet; nothing runs)."""
        tokens = jnp.zeros((cache.batch,), jnp.int32)
        args = (params, cache, tokens, *greedy_rows(cache.batch))
        return self._executable("decode", (), self._model(_decode), 1, args, lambda c: (None, c))

    def verify(self, params, cache, tokens, active):
        """``[B, k+1]`` tokens (the last one and k drafts) in one pass: ``(greedy targets, accepted, cache)``."""
        args = (params, cache, tokens, active)
        return self._run("verify", tokens.shape[1], self._model(_verify), 1, args, lambda c: (None, None, c))

    def retire(self, cache, mask):
        """Empty the slots of ``mask`` (lengths and error bits to 0; a paged slot's pages go back)."""
        return self._run("retire", (), _retire, 0, (cache, mask), lambda c: c)

    def insert(self, cache, slot, single, prefix=None):
        """``single``'s sequence into ``slot``; ``prefix=(pages, n)`` (paged): its first n positions are those
        pinned pages, shared, not written."""
        if prefix is None:
            fn = lambda c, s, one: c.insert_into_slot(s, one)
            return self._run("insert", (), fn, 0, (cache, slot, single), lambda c: c)
        fn = lambda c, s, one, pages, n: c.insert_into_slot(s, one, prefix=(pages, n))
        return self._run("insert_shared", (), fn, 0, (cache, slot, single, *prefix), lambda c: c)

    def pin(self, cache, slot, n):
        """Pin the pages of slot ``slot``'s first ``n`` positions: ``(cache, their page ids)``."""
        return self._run("pin", (), lambda c, s, m: c.pin(s, m), 0, (cache, slot, n), lambda c: (c, None))

    def unpin(self, cache, pages):
        return self._run("unpin", (), lambda c, p: c.unpin(p), 0, (cache, pages), lambda c: c)

    def restore(self, single, entry):
        """The one-sequence cache holding a device copy ``entry`` (a prefix-cache entry of a contiguous kind)."""
        fn = lambda one, e: one.reset().insert_into_slot(0, e)
        return self._run("restore", entry.max_len, fn, 0, (single, entry))

    def restore_pinned(self, cache, single, pages, n):
        """The one-sequence cache holding the first ``n`` positions of pinned ``pages`` (read through them)."""
        # A power of two of pages, at most the table's width: few shapes compile.
        width = min(cache.max_pages, 1 << (-(-int(n) // PAGE_SIZE) - 1).bit_length())

        def read(c, one, p, m):
            return one.reset().insert_into_slot(0, c.read_pinned(p[:width], m))

        return self._run("restore_pinned", width, read, 1, (cache, single, pages, jnp.int32(n)))

    def merge_tokens(self, previous, host, use):
        """Per slot, the in-flight step's token (``use``) or the host's."""
        return self._run("merge", (), lambda p, h, u: jnp.where(u, p, h), (), (previous, host, use))


def greedy_rows(batch: int):
    """Sampling inputs of ``batch`` greedy rows, all active (for device loops over ``Steps.decode``)."""
    return (
        jnp.ones((batch,), bool),
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
    "prefill_bucket",
    "staging_kind",
]
