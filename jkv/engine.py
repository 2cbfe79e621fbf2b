"""Batched serving engine: N slots over one batched cache, continuous batching, prefix cache, speculative decoding.

A request is admitted as soon as a slot is free: its prompt is prefilled into a one-sequence cache (after
restoring the longest cached prefix, if any) and scattered into the slot with ``insert_into_slot``. With a paged
cache a prefix-cache entry is the prompt's pages themselves, pinned in the pool (``PagedKVCache.pin``): a hit
gives the new slot those pages (shared, refcounted, copied only where the slot writes into a partly filled one)
and writes only the rest, so N requests with one system prompt hold its pages once. Every
``step()`` then advances all active slots at once with one jitted, cache-donating decode step over the whole
batch (ragged lengths; idle slots are computed but their lengths do not move). Finished requests (a stop token,
``max_new_tokens``, or a full cache row) retire and their slot is reused.

Speculative decoding without a draft model: each active slot drafts up to ``k`` tokens by prompt lookup
(``jkv.speculative``), and one forward pass over ``k + 1`` tokens per slot verifies them; the cache is rolled
back past the first rejected draft. Acceptance compares drafts with the model's own greedy choices, so the output
is the greedy output.

Only token ids cross from device to host.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkv import memory
from jkv.caches import PAGE_SIZE, CacheSpec, KVCache, cache_sharding, kind, kinds, make_cache, shard_cache
from jkv.models import llama
from jkv.prefix_cache import PrefixCache
from jkv.sampling import sample
from jkv.speculative import prompt_lookup_draft

# Upper bound of the default slot count: a GPU step costs about the same for 1 or 64 rows (it reads the
# weights once); a CPU step costs in proportion to the rows, and every slot is computed.
DEFAULT_MAX_SLOTS = {"gpu": 64, "tpu": 64}
DEFAULT_MAX_SLOTS_ELSEWHERE = 8
CACHE_KINDS = ("default", *kinds())  # the registry's kinds (jkv.caches.registry)
PAGED_KINDS = tuple(name for name in kinds() if kind(name).paged)  # prefix-cache entries are pinned pages


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request generates. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


@dataclasses.dataclass
class Completion:
    """A finished request: generated ids, why it stopped, and when things happened (``time.perf_counter``)."""

    id: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str  # "stop" | "max_new_tokens" | "max_len"
    cached_prompt_tokens: int  # prompt tokens restored from the prefix cache instead of recomputed
    submitted: float
    first_token: float
    finished: float

    @property
    def latency(self) -> float:
        return self.finished - self.submitted

    @property
    def time_to_first_token(self) -> float:
        return self.first_token - self.submitted


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[int, int], None] | None
    submitted: float


@dataclasses.dataclass
class _Active:
    request: _Request
    tokens: list[int]  # generated so far; tokens[-1] is not yet in the cache
    key_data: np.ndarray  # raw PRNG key of the request
    cached_prompt_tokens: int
    first_token: float


@dataclasses.dataclass
class EngineStats:
    prefill_tokens: int = 0  # prompt tokens run through the model
    cached_prompt_tokens: int = 0  # prompt tokens restored from the prefix cache
    decode_steps: int = 0
    verify_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


class Engine:
    """Continuous-batching generation over ``num_slots`` slots of one ``KVCache``.

    ``params``/``config``: a Llama-family model (``jkv.models.llama``). ``cache``: ``"default"`` (contiguous, in
    ``cache_dtype`` or the weights' dtype), ``"bf16"``, ``"f32"``, ``"q8"``, ``"paged"`` (pages of 16
    positions; ``max_len`` a multiple of 16) or ``"q8-paged"`` (the same, pages in the Q8 format). ``num_slots``
    defaults to what fits the device's free memory (``jkv.memory.max_batch``, capped at 64 on GPU, 8 elsewhere),
    announced on stderr. ``prefix_cache_bytes`` (0: off) bounds the device memory of cached prompt prefixes (for
    a paged cache, that many bytes of extra pool pages, which entries pin and requests share).
    ``speculative_tokens`` (0: off) drafts that many tokens per step by prompt lookup; it needs greedy requests.
    ``mesh``
    (``jkv.sharding.make_mesh``): weights split Megatron style over its ``tp`` axis, slots over its ``dp`` axis.
    """

    def __init__(
        self,
        params: llama.LlamaParams,
        config: llama.LlamaConfig,
        *,
        num_slots: int | None = None,
        max_len: int = 1024,
        cache: str = "default",
        cache_dtype=None,
        impl: str | None = None,
        prefix_cache_bytes: int = 0,
        speculative_tokens: int = 0,
        max_ngram: int = 3,
        prefill_bucket: int = 16,
        mesh=None,
        verbose: bool = True,
    ):
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if not isinstance(speculative_tokens, int) or speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be an int >= 0, got {speculative_tokens!r}")
        if not isinstance(prefill_bucket, int) or prefill_bucket < 1:
            raise ValueError(f"prefill_bucket must be a positive int, got {prefill_bucket!r}")
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache={cache!r} is not one of {CACHE_KINDS}")
        if cache in PAGED_KINDS and max_len % PAGE_SIZE:
            raise ValueError(f"a paged cache needs max_len a multiple of its page size {PAGE_SIZE}, got {max_len=}")
        self.params, self.config, self.impl, self.cache_kind = params, config, impl, cache
        dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}.get(
            cache, params.dtype if cache_dtype is None else cache_dtype
        )
        self.spec = CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, max_len, dtype)
        per_token = None if cache == "default" else kind(cache).bytes_per_token(self.spec)
        if num_slots is None:
            cap = DEFAULT_MAX_SLOTS.get(jax.default_backend(), DEFAULT_MAX_SLOTS_ELSEWHERE)
            num_slots = memory.max_batch(self.spec, limit=cap, per_token=per_token)
            if num_slots < 1:
                raise MemoryError(
                    f"no engine slot fits in device memory at max_len={max_len}: lower max_len or num_slots"
                )
            if verbose:
                per_slot = memory.cache_bytes(self.spec, 1, per_token) / 2**20
                print(
                    f"jkv engine: {num_slots} slots of max_len={max_len} ({per_slot:.1f} MiB of KV cache each) fit "
                    f"the free device memory (cap {cap} on {jax.default_backend()})",
                    file=sys.stderr,
                )
            if mesh is not None:  # whole slots per data-parallel group
                dp = mesh.shape["dp"]
                num_slots = max(num_slots - num_slots % dp, dp)
        elif not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        self.num_slots = num_slots
        self.speculative_tokens = speculative_tokens
        self.max_ngram = max_ngram
        self.prefill_bucket = prefill_bucket
        self.prefix_cache = PrefixCache(prefix_cache_bytes, on_evict=self._evicted) if prefix_cache_bytes else None
        self.stats = EngineStats()

        # The batch cache of the chosen kind; prompts prefill into a one-sequence cache that insert_into_slot takes
        # (a contiguous cache of the kind's format: Q8 for Q8 slots and Q8 pages).
        name = cache
        if name == "default":  # a plain cache of the model's (or cache_dtype's) dtype
            self.cache, self._single = KVCache.init(self.spec, num_slots), KVCache.init(self.spec, 1)
        elif name in PAGED_KINDS:
            # Every slot can fill its row, and prefix entries pin at most prefix_cache_bytes more: never exhausted.
            self._page_bytes = kind(name).bytes_per_token(self.spec) * PAGE_SIZE
            pages = num_slots * (max_len // PAGE_SIZE) + prefix_cache_bytes // self._page_bytes
            self.cache = make_cache(name, self.spec, num_slots, num_pages=pages)
            self._single = kind(name).single(self.spec)
        else:
            self.cache, self._single = make_cache(name, self.spec, num_slots), kind(name).single(self.spec)
        self._slots: list[_Active | None] = [None] * num_slots
        self._batch_sampling_cache = None  # device copies of the slots' sampling parameters
        self._inflight = None  # (token ids on the device, {slot: its request state}) of the step not yet read
        self._pending: collections.deque[_Request] = collections.deque()
        self._done: dict[int, Completion] = {}
        self._next_id = 0
        self.mesh = mesh
        if mesh is not None:  # tensor / data parallel: weights and slots split over the mesh, kept split
            from jkv import sharding

            sharding.check_layout(config, mesh, batch=num_slots)
            self.params = sharding.shard_params(params, config, mesh)
            self.cache = shard_cache(self.cache, mesh)
        self._build_steps()

    # ------------------------------------------------------------------ compiled steps
    def _build_steps(self):
        config, impl = self.config, self.impl

        def keys_for(key_data, counter):
            # Request key folded with the number of tokens it has generated: slot- and batch-independent.
            return jax.vmap(lambda kd, c: jax.random.fold_in(jax.random.wrap_key_data(kd), c))(key_data, counter)

        def prefill(params, single, tokens, true_len, key_data, counter, temperature, top_k, top_p):
            last = true_len - 1 - single.lengths  # index of the last prompt token among the new ones
            logits, single = llama.prefill(params, single, tokens, last, config=config, impl=impl)
            single = single.rollback(jnp.minimum(single.lengths, true_len))  # drop bucket padding
            return sample(logits, keys_for(key_data, counter), temperature, top_k, top_p), single

        def decode(params, cache, tokens, active, key_data, counter, temperature, top_k, top_p):
            before = cache.lengths
            logits, cache = llama.decode_step(params, cache, tokens, config=config, impl=impl)
            cache = cache.rollback(jnp.where(active, cache.lengths, before))  # idle slots do not move
            return sample(logits, keys_for(key_data, counter), temperature, top_k, top_p), cache

        def verify(params, cache, tokens, active):
            before = cache.lengths
            logits, cache = llama.forward(params, cache, tokens, config=config, impl=impl)  # (B, k+1, V)
            target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            agree = (tokens[:, 1:] == target[:, :-1]).astype(jnp.int32)
            accepted = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)  # leading drafts the model agrees with
            cache = cache.rollback(jnp.where(active, before + accepted + 1, before))
            return target, accepted, cache

        def retire(cache, mask):
            cache = cache.rollback(jnp.where(mask, 0, cache.lengths))
            return cache.replace(errors=jnp.where(mask, 0, cache.errors))

        def insert(cache, slot, single):
            return cache.insert_into_slot(slot, single)

        # With a mesh, every step that returns the batch cache hands it back in its sharding (kept split).
        cache_out = None
        if self.mesh is not None:
            cache_out = cache_sharding(self.cache, self.mesh)

        def compiled(fn, donate, out_shardings=None):
            kw = {} if cache_out is None or out_shardings is None else {"out_shardings": out_shardings(cache_out)}
            return self._on_mesh(jax.jit(fn, donate_argnums=donate, **kw))

        self._prefill = compiled(prefill, 1)  # the one-sequence prefill cache is not split
        self._decode = compiled(decode, 1, lambda c: (None, c))
        self._verify = compiled(verify, 1, lambda c: (None, None, c))
        self._insert = compiled(insert, 0, lambda c: c)
        if self.cache_kind in PAGED_KINDS:
            self._insert_shared = compiled(
                lambda c, slot, single, pages, n: c.insert_into_slot(slot, single, prefix=(pages, n)), 0, lambda c: c
            )
            self._pin = compiled(lambda c, slot, n: c.pin(slot, n), 0, lambda c: (c, None))
            self._unpin = compiled(lambda c, pages: c.unpin(pages), 0, lambda c: c)
            self._read_pinned = {}  # width in pages -> compiled restore of a pinned prefix into the prefill cache
        self._restore = compiled(lambda single, entry: single.reset().insert_into_slot(0, entry), 0)
        self._retire = compiled(retire, 0, lambda c: c)
        self._merge_tokens = self._on_mesh(jax.jit(lambda previous, host, use: jnp.where(use, previous, host)))

    def _on_mesh(self, fn):
        """Trace and run ``fn`` with the engine's mesh active, so Pallas kernels run per shard."""
        if self.mesh is None:
            return fn
        from jkv import sharding

        def call(*args):
            with sharding.use_mesh(self.mesh):
                return fn(*args)

        return call

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> int:
        """Queue a request (prompt token ids); returns its id. ``on_token(id, token)`` streams each new token."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if len(prompt) >= self.spec.max_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens does not fit max_len={self.spec.max_len} (needs room for one more)"
            )
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {self.config.vocab_size})")
        if self.speculative_tokens and params.temperature > 0:
            raise ValueError("speculative decoding verifies greedy choices: use temperature=0 with speculative_tokens")
        request = _Request(self._next_id, prompt, params, on_token, time.perf_counter())
        self._next_id += 1
        self._pending.append(request)
        return request.id

    @property
    def num_active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def has_work(self) -> bool:
        return bool(self._pending) or self.num_active > 0 or self._inflight is not None

    def pop_finished(self) -> list[Completion]:
        done = sorted(self._done.values(), key=lambda c: c.id)
        self._done.clear()
        return done

    def run(self, show_progress: bool = True) -> list[Completion]:
        """Step until every submitted request has finished; completions in submission order."""
        total = self.num_pending + self.num_active
        bar = None
        if show_progress and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="requests", unit="req", file=sys.stderr)
        finished: list[Completion] = []
        while self.has_work():
            self.step()
            new = self.pop_finished()
            finished.extend(new)
            if bar is not None:
                bar.update(len(new))
        if bar is not None:
            bar.close()
        return sorted(finished, key=lambda c: c.id)

    # ------------------------------------------------------------------ one engine step
    def step(self) -> None:
        """Admit what fits, then advance every active slot by one decode (or verify) step.

        Decode steps are pipelined: step i+1 is dispatched with step i's token ids still on the device, and step
        i's ids are read, streamed and checked for stop conditions while step i+1 runs, so the host's per-step
        work overlaps the device's. A request that finishes at step i has one more position computed in step
        i+1, which its retirement drops (its token is never emitted). Verify steps (speculative decoding) read
        their results at once.
        """
        k = self.speculative_tokens
        if k:
            self._collect()
        self._admit()
        active = [i for i, s in enumerate(self._slots) if s is not None]
        if not active:
            self._collect()
            return
        if k and all(self._cache_length(i) + k + 1 <= self.spec.max_len for i in active):
            self._verify_step(active, k)
        else:
            self._decode_step(active)
            if k:
                self._collect()

    def _cache_length(self, slot: int) -> int:
        """Positions slot ``slot`` holds in the cache: its prompt and every generated token but the last."""
        state = self._slots[slot]
        return len(state.request.prompt) + len(state.tokens) - 1

    def _collect(self) -> None:
        """Read the token ids of the decode step in flight (if any): stream them, then retire finished slots."""
        if self._inflight is None:
            return
        nxt, states = self._inflight
        self._inflight = None
        nxt = np.asarray(nxt)
        for i, state in states.items():
            if self._slots[i] is state:  # not retired (and reused) since that step was dispatched
                self._emit(i, [int(nxt[i])])
        self._retire_finished()

    def _sampling_arrays(self, slots: Sequence[_Active | None]):
        """Per-row sampling inputs: request key data, tokens generated so far, temperature, top-k, top-p."""

        def field(name, default, dtype):
            return jnp.asarray([getattr(s.request.params, name) if s else default for s in slots], dtype)

        key_data = np.stack([s.key_data if s else np.zeros(2, np.uint32) for s in slots])
        counter = np.asarray([len(s.tokens) if s else 0 for s in slots], np.int32)
        return (
            jnp.asarray(key_data),
            jnp.asarray(counter),
            field("temperature", 0.0, jnp.float32),
            field("top_k", 0, jnp.int32),
            field("top_p", 1.0, jnp.float32),
        )

    def _batch_sampling(self, in_flight=()):
        """``_sampling_arrays`` for all slots; the per-request arrays stay on the device until a slot changes.
        Slots in ``in_flight`` have one generated token more than their host-side list shows (still on the device)."""
        if self._batch_sampling_cache is None:
            key_data, _, temperature, top_k, top_p = self._sampling_arrays(self._slots)
            self._batch_sampling_cache = (key_data, temperature, top_k, top_p)
        key_data, temperature, top_k, top_p = self._batch_sampling_cache
        counts = [len(s.tokens) + (i in in_flight) if s else 0 for i, s in enumerate(self._slots)]
        counter = jnp.asarray(np.asarray(counts, np.int32))
        return key_data, counter, temperature, top_k, top_p

    def _admit(self) -> None:
        while self._pending and None in self._slots:
            slot = self._slots.index(None)
            request = self._pending.popleft()
            prompt = request.prompt
            cached, entry = (0, None) if self.prefix_cache is None else self.prefix_cache.lookup(prompt)
            cached = min(cached, len(prompt) - 1)  # at least one token runs, to produce the next-token logits
            if entry is None or cached == 0:
                cached, entry = 0, None
                single = self._single.reset()
            elif self.cache_kind in PAGED_KINDS:
                single = self._restore_pinned(entry[0], cached)
            else:
                single = self._restore(self._single, entry).rollback(cached)
            rest = prompt[cached:]
            bucket = -(-len(rest) // self.prefill_bucket) * self.prefill_bucket
            bucket = min(bucket, self.spec.max_len - cached)
            tokens = np.zeros((1, bucket), np.int32)
            tokens[0, : len(rest)] = rest
            key_data = np.asarray(jax.random.key_data(jax.random.key(request.params.seed)))
            probe = _Active(request, [], key_data, cached, 0.0)
            first, single = self._prefill(
                self.params,
                single,
                jnp.asarray(tokens),
                jnp.asarray([len(prompt)], jnp.int32),
                *self._sampling_arrays([probe]),
            )
            self.stats.prefill_tokens += len(rest)
            self.stats.cached_prompt_tokens += cached
            if entry is not None and self.cache_kind in PAGED_KINDS:  # the prefix's pages are shared, not written
                self.cache = self._insert_shared(self.cache, slot, single, entry[0], jnp.int32(cached))
            else:
                self.cache = self._insert(self.cache, slot, single)
            self._single = single  # reuse the buffer for the next admission
            if self.prefix_cache is not None and prompt not in self.prefix_cache:
                self._remember(prompt, slot, single)
            state = _Active(request, [], key_data, cached, time.perf_counter())
            self._slots[slot] = state
            self._batch_sampling_cache = None
            self._emit(slot, [int(np.asarray(first)[0])])
        self._retire_finished()

    def _remember(self, prompt: list[int], slot: int, single) -> None:
        """Make ``prompt``'s keys and values a prefix-cache entry: its pinned pages (paged) or a device copy."""
        if self.cache_kind in PAGED_KINDS:
            self.cache, pages = self._pin(self.cache, slot, jnp.int32(len(prompt)))
            entry, nbytes = (pages, len(prompt)), -(-len(prompt) // PAGE_SIZE) * self._page_bytes
        else:
            # A trimmed copy of the prefilled sequence, on the device: a hit restores it with one scatter, no host
            # round trip. Its length is a power of two (times the prefill bucket), so at most log2(max_len) restore
            # shapes ever compile: a first hit on a new shape pays a compile that costs more than its prefill.
            buckets = -(-len(prompt) // self.prefill_bucket)
            keep = min((1 << (buckets - 1).bit_length()) * self.prefill_bucket, self.spec.max_len)
            entry = single.extract_slot(0, max_len=keep)
            nbytes = entry.nbytes
        if not self.prefix_cache.insert(prompt, entry, nbytes):
            self._evicted(entry)

    def _evicted(self, entry) -> None:
        """A prefix-cache entry left the cache: give its pinned pages back (device copies just go)."""
        if self.cache_kind in PAGED_KINDS:
            self.cache = self._unpin(self.cache, entry[0])

    def _restore_pinned(self, pages, cached: int):
        """The prefill cache holding the first ``cached`` positions of a pinned prefix (read through its pages)."""
        width = min(self.cache.max_pages, 1 << (-(-cached // PAGE_SIZE) - 1).bit_length())  # power of two: few shapes
        if width not in self._read_pinned:

            def read(cache, single, pages, n):
                return single.reset().insert_into_slot(0, cache.read_pinned(pages[:width], n))

            self._read_pinned[width] = self._on_mesh(jax.jit(read, donate_argnums=1))
        return self._read_pinned[width](self.cache, self._single, pages, jnp.int32(cached))

    def _decode_step(self, active: list[int]) -> None:
        tokens = np.zeros(self.num_slots, np.int32)
        mask = np.zeros(self.num_slots, bool)
        on_device = np.zeros(self.num_slots, bool)  # the slot's input token is the in-flight step's output
        previous = self._inflight
        for i in active:
            state = self._slots[i]
            mask[i] = True
            if previous is not None and previous[1].get(i) is state:
                on_device[i] = True
            else:
                tokens[i] = state.tokens[-1]
        inputs = jnp.asarray(tokens)
        if on_device.any():
            inputs = self._merge_tokens(previous[0], inputs, jnp.asarray(on_device))
        in_flight = set(np.flatnonzero(on_device).tolist())
        nxt, self.cache = self._decode(
            self.params, self.cache, inputs, jnp.asarray(mask), *self._batch_sampling(in_flight)
        )
        self.stats.decode_steps += 1
        self._collect()  # the previous step's ids, read while this one runs
        self._inflight = (nxt, {i: self._slots[i] for i in active if self._slots[i] is not None})

    def _verify_step(self, active: list[int], k: int) -> None:
        tokens = np.zeros((self.num_slots, k + 1), np.int32)
        mask = np.zeros(self.num_slots, bool)
        drafted = {}
        for i in active:
            state = self._slots[i]
            history = state.request.prompt + state.tokens
            draft = prompt_lookup_draft(history, k, max_ngram=self.max_ngram)
            drafted[i] = len(draft)
            # Unused draft positions repeat the last token: any filler is safe, a match is a correct guess.
            row = [state.tokens[-1], *draft] + [state.tokens[-1]] * (k - len(draft))
            tokens[i], mask[i] = row, True
        target, accepted, self.cache = self._verify(self.params, self.cache, jnp.asarray(tokens), jnp.asarray(mask))
        target, accepted = np.asarray(target), np.asarray(accepted)
        self.stats.verify_steps += 1
        for i in active:
            self.stats.drafted_tokens += drafted[i]
            self.stats.accepted_tokens += min(int(accepted[i]), drafted[i])
            self._emit(i, target[i, : int(accepted[i]) + 1].tolist())
        self._retire_finished()

    def _emit(self, slot: int, new_tokens: list[int]) -> None:
        """Hand tokens to the slot's request (stream them), stopping at a stop token or the token budget."""
        state = self._slots[slot]
        for token in new_tokens:
            if self._finish_reason(slot) is not None:
                break
            state.tokens.append(token)
            if state.request.on_token is not None:
                state.request.on_token(state.request.id, token)

    def _finish_reason(self, slot: int) -> str | None:
        state = self._slots[slot]
        params = state.request.params
        if state.tokens and state.tokens[-1] in params.stop_tokens:
            return "stop"
        if len(state.tokens) >= params.max_new_tokens:
            return "max_new_tokens"
        # The cache holds the prompt and every generated token but the last; the last needs a free position.
        if state.tokens and len(state.request.prompt) + len(state.tokens) >= self.spec.max_len:
            return "max_len"
        return None

    def _retire_finished(self) -> None:
        mask = np.zeros(self.num_slots, bool)
        now = time.perf_counter()
        for i, state in enumerate(self._slots):
            if state is None:
                continue
            reason = self._finish_reason(i)
            if reason is None:
                continue
            r = state.request
            self._done[r.id] = Completion(
                r.id, r.prompt, state.tokens, reason, state.cached_prompt_tokens, r.submitted, state.first_token, now
            )
            self._slots[i] = None
            self._batch_sampling_cache = None
            mask[i] = True
        if mask.any():
            self.cache = self._retire(self.cache, jnp.asarray(mask))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, **kw) -> list[list[int]]:
        """Convenience: run ``prompts`` through the engine and return the generated ids of each, in order."""
        for p in prompts:
            self.submit(p, params)
        return [c.tokens for c in self.run(**kw)]
