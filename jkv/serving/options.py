"""The engine's knobs, as one frozen object: what a caller may set, checked once, with device-derived defaults."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import numpy as np

from jkv import memory
from jkv.models import llama
from jkv.serving import steps


def default_max_slots(backend: str) -> int:
    """Cap of the default slot count: a GPU step costs about the same for 1 or 64 rows (it reads the weights
    once); a CPU step costs in proportion to the rows, and every slot is computed."""
    return 64 if backend in ("gpu", "tpu") else 8


def default_max_batch_tokens(backend: str) -> int:
    """Tokens per step when none is given: on a GPU a step of 2048 prompt tokens runs near the matmul rate and
    still lets decoding sequences advance every step; on a CPU every row costs, so steps stay small."""
    return 2048 if backend in ("gpu", "tpu") else 256


def default_num_slots(spec, per_token: int, mesh, verbose: bool) -> int:
    """Slots of ``spec.max_len`` positions (``per_token`` bytes each) that fit the device's free memory, capped by
    ``default_max_slots``, whole slots per data-parallel group of ``mesh``; said on stderr when ``verbose``."""
    cap = default_max_slots(jax.default_backend())
    n = memory.max_batch(spec, limit=cap, per_token=per_token)
    if n < 1:
        raise MemoryError(f"no engine slot fits in device memory at max_len={spec.max_len}")
    if verbose:
        per_slot = memory.cache_bytes(spec, 1, per_token) / 2**20
        print(
            f"jkv engine: {n} slots of max_len={spec.max_len} ({per_slot:.1f} MiB of KV cache each) fit "
            f"the free device memory (cap {cap} on {jax.default_backend()})",
            file=sys.stderr,
        )
    if mesh is not None:
        dp = mesh.shape["dp"]
        n = max(n - n % dp, dp)
    return n


def _positive(name, value, minimum=1) -> int:
    """``value`` as a Python int (NumPy integers included), or ``ValueError`` naming it."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


# The integer knobs of EngineOptions and their least values; those of _OPTIONAL may be None (a default).
_SIZES = {"max_len": 2, "num_slots": 1, "prefix_cache_bytes": 0, "speculative_tokens": 0, "max_ngram": 1}
_SIZES |= {"max_batch_tokens": 1, "num_pages": 1, "window_slack": 1}
_OPTIONAL = ("num_slots", "max_batch_tokens", "num_pages", "window_slack")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The engine's knobs. ``cache``: a name of ``steps.CACHE_KINDS`` (default ``"paged"``: pages in
    ``cache_dtype`` or the weights' dtype; ``max_len`` a multiple of ``steps.PAGE_SIZE``), or ``"default"``
    (contiguous, in that dtype). ``num_slots=None``: what fits the device's free memory (``memory.max_batch``,
    capped by ``default_max_slots``). ``prefix_cache_bytes`` (0: off): device bytes of cached prompt prefixes.
    ``speculative_tokens`` (0: off): prompt-lookup drafts per step (greedy requests only). ``max_batch_tokens``
    (``None``: ``default_max_batch_tokens``, at most the largest bucket): tokens one step carries at most, decode
    tokens and prompt chunks together. ``num_pages`` (paged kinds; ``None``: every slot can fill ``max_len``, plus
    the prefix cache's budget, as far as free memory goes): fewer oversubscribes memory, requests then wait.
    ``buckets`` (``None``: powers of two from the slot count up to ``max_batch_tokens``): the tokens-per-step
    shapes that compile, one step variant each.
    ``cache_options``: storage options of the cache format (``{"rotated": False}``: Q8 without its rotation).
    ``windowed`` (``None``: on when the model's config has windowed layers): a per-layer cache plan, windowed
    layers on rings (``jkv.caches.plan``); ``window_slack`` (``None``: every step fits, ``max_batch_tokens`` for a
    contiguous plan; a paged plan ``max(PAGE_SIZE, speculative_tokens + 1)``): the rings' slack."""

    num_slots: int | None = None
    max_len: int = 1024
    cache: str = "paged"
    cache_dtype: Any = None
    impl: str | None = None
    prefix_cache_bytes: int = 0
    speculative_tokens: int = 0
    max_ngram: int = 3
    max_batch_tokens: int | None = None
    num_pages: int | None = None
    buckets: tuple[int, ...] | None = None
    cache_options: tuple[tuple[str, Any], ...] = ()
    windowed: bool | None = None
    window_slack: int | None = None
    model: llama.LlamaOptions = llama.DEFAULT_OPTIONS  # how the model runs; a given ``impl`` overrides its impl

    @property
    def batch_tokens(self) -> int:
        """``max_batch_tokens``, or the backend's default."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        default = default_max_batch_tokens(jax.default_backend())
        return default if self.buckets is None else min(default, self.buckets[-1])

    def slack(self, paged: bool) -> int:
        """The rings' slack (``window_slack``, or its default)."""
        if self.window_slack is not None:
            return self.window_slack
        if paged:
            return max(steps.PAGE_SIZE, self.speculative_tokens + 1)
        return max(self.batch_tokens, self.speculative_tokens + 1)

    def windows(self, config) -> tuple | None:
        """The per-layer windows of the cache plan, or None (a uniform cache). A window of ``max_len`` or more is
        a full layer: no sequence outgrows it, and its ring would hold more than the full layer does."""
        if self.windowed is False or config.windows is None:
            return None
        windows = tuple(None if w is None or w >= self.max_len else w for w in config.windows)
        return None if all(w is None for w in windows) else windows

    @property
    def model_options(self) -> llama.LlamaOptions:
        return self.model if self.impl is None else dataclasses.replace(self.model, impl=self.impl)

    def __post_init__(self):
        object.__setattr__(self, "cache_options", tuple(sorted(dict(self.cache_options).items())))
        for name, minimum in _SIZES.items():  # Python ints from here on: they key compiled steps and name shapes
            if getattr(self, name) is not None or name not in _OPTIONAL:
                object.__setattr__(self, name, _positive(name, getattr(self, name), minimum))
        if self.num_pages is not None:
            if not steps.is_paged(self.cache):
                kind = f"cache={self.cache!r} is not paged"
                raise ValueError(f"num_pages={self.num_pages} sizes a paged cache's pool; {kind}")
        if self.windowed not in (None, True, False):
            raise TypeError(f"windowed must be None, True or False, got {self.windowed!r}")
        if self.buckets is not None:
            if isinstance(self.buckets, (str, bytes)) or not hasattr(self.buckets, "__iter__"):
                raise TypeError(f"buckets must be a tuple of ints (tokens per step), got {self.buckets!r}")
            buckets = tuple(sorted(_positive("each of buckets", b) for b in self.buckets))
            object.__setattr__(self, "buckets", buckets)
            if not buckets:
                raise ValueError("buckets=() names no step shape: give at least one tokens-per-step size, or None")
            if self.buckets[-1] < self.batch_tokens:
                raise ValueError(
                    f"the largest of buckets={self.buckets} must hold max_batch_tokens={self.batch_tokens}"
                )
        if self.speculative_tokens >= self.batch_tokens:  # the LM head runs on 1 + drafts rows of every slot
            raise ValueError(
                f"speculative_tokens={self.speculative_tokens} must be below max_batch_tokens={self.batch_tokens}: a "
                "step carries at most that many tokens, a sequence's next token and its drafts among them"
            )
        steps.check_kind(self.cache, self.max_len)
        if not isinstance(self.model, llama.LlamaOptions):
            raise TypeError(f"model must be a jkv.models.llama.LlamaOptions, got {type(self.model).__name__}")
