"""Continuous-batching engine: slots over one batched cache, admission, the pipelined loop, retirement.

A request is admitted as soon as a slot is free: its prompt is prefilled into a one-sequence cache (after
restoring the longest cached prefix, if any; ``jkv.serving.prefix``) and scattered into the slot. Every ``step()``
then advances all active slots with one jitted, cache-donating decode step (``jkv.serving.steps``), or with one
verify step of prompt-lookup drafts (``jkv.serving.speculative``). Decode steps are pipelined: step ``i + 1`` is
dispatched before step ``i``'s token ids are read. A request finishes at a stop token (not returned), after
``max_new_tokens``, or when its cache row is full (``sampling.FINISH_REASONS``); its slot is then reused.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jkv.caches import CacheSpec
from jkv.models import llama
from jkv.serving import steps
from jkv.serving.metrics import Completion, EngineStats
from jkv.serving.options import EngineOptions, default_num_slots
from jkv.serving.prefix import PrefixCache
from jkv.serving.sampling import NONFINITE, SamplingParams, sampling_rows
from jkv.serving.speculative import prompt_lookup_draft


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or Inf logits for a request: generation stopped (the message names the step)."""


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
    cached_prompt_tokens: int
    first_token: float
    stopped: bool = False  # a stop token came


class Engine:
    """Continuous-batching generation over the slots of one batched cache of a Llama-family model.

    ``Engine(params, config, EngineOptions(...))``, or the options' fields as keywords. ``mesh``
    (``jkv.parallel.make_mesh``): weights split Megatron style over its ``tp`` axis, slots over its ``dp`` axis.
    """

    def __init__(self, params, config, options: EngineOptions | None = None, *, mesh=None, verbose=True, **knobs):
        if options is None:
            options = EngineOptions(**knobs)
        elif knobs:
            raise TypeError(f"give either options or keyword knobs, not both: got {sorted(knobs)}")
        llama.check_params(params, config)
        if options.max_len > config.max_position:
            raise ValueError(f"max_len={options.max_len} exceeds the model's context length {config.max_position}")
        self.options, self.params, self.config, self.mesh = options, params, config, mesh
        self.cache_kind = options.cache
        dtype = steps.kind_dtype(options.cache, params.dtype if options.cache_dtype is None else options.cache_dtype)
        self.spec = CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, options.max_len, dtype)
        storage = dict(options.cache_options)
        self._single = steps.make_cache(steps.staging_kind(options.cache), self.spec, 1, **storage)
        per_token = (self._single.nbytes - 8) // options.max_len  # bytes per position in the slots' format
        self.num_slots = options.num_slots or default_num_slots(self.spec, per_token, mesh, verbose)
        num_pages = None
        if steps.is_paged(options.cache):
            # Every slot can fill its row, and prefix entries pin at most prefix_cache_bytes more: never exhausted.
            self._page_bytes = per_token * steps.PAGE_SIZE
            per_slot = options.max_len // steps.PAGE_SIZE
            num_pages = self.num_slots * per_slot + options.prefix_cache_bytes // self._page_bytes
        self.cache = steps.make_cache(options.cache, self.spec, self.num_slots, num_pages=num_pages, **storage)
        cache_sharding = None
        if mesh is not None:  # tensor / data parallel: weights and slots split over the mesh, kept split
            from jkv.caches import sharding

            llama.check_layout(config, mesh, batch=self.num_slots)
            self.params = llama.shard_params(params, config, mesh)
            self.cache = sharding.shard_cache(self.cache, mesh)
            cache_sharding = sharding.cache_sharding(self.cache, mesh)
        self.steps = steps.Steps(config, options.model_options, mesh, cache_sharding)
        self.prefix_cache = None
        if options.prefix_cache_bytes:
            self.prefix_cache = PrefixCache(options.prefix_cache_bytes, on_evict=self._evicted)
        self.stats = EngineStats()
        self._slots: list[_Active | None] = [None] * self.num_slots
        self._rows = None  # device copies of the slots' sampling parameters, until a slot changes
        self._inflight = None  # (token ids on the device, {slot: its state}, step label) not yet read
        self._pending: collections.deque[_Request] = collections.deque()
        self._done: dict[int, Completion] = {}
        self._next_id = 0

    @property
    def compile_s(self) -> float:
        """Seconds this engine has spent compiling its steps."""
        return self.steps.compile_s

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None, on_token=None) -> int:
        """Queue a request (prompt token ids); returns its id. ``on_token(id, token)`` streams each new token."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if len(prompt) > self.spec.max_len:  # a full row still yields the prefill's token
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_len={self.spec.max_len}")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {self.config.vocab_size})")
        if self.options.speculative_tokens and not params.greedy:
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

    def abort(self) -> None:
        """Drop every waiting and running request (no completions) and empty their slots, e.g. after an error."""
        self._pending.clear()
        self._inflight = None
        mask = np.asarray([s is not None for s in self._slots])
        self._slots, self._rows = [None] * self.num_slots, None
        if mask.any():
            self.cache = self.steps.retire(self.cache, jnp.asarray(mask))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, **kw) -> list[list[int]]:
        """Convenience: run ``prompts`` through the engine and return the generated ids of each, in order."""
        for p in prompts:
            self.submit(p, params)
        return [c.tokens for c in self.run(**kw)]

    # ------------------------------------------------------------------ one engine step
    def step(self) -> None:
        """Admit what fits, then advance every slot that needs another token by one decode (or verify) step.

        Step ``i + 1`` is dispatched with step ``i``'s token ids still on the device; step ``i``'s ids are read,
        streamed and checked while step ``i + 1`` runs. A slot whose in-flight token is its last by count joins
        no further step; one that stops at a stop token has one more position computed, which retirement drops.
        Verify steps (speculative decoding) read their results at once.
        """
        k = self.options.speculative_tokens
        if k:
            self._collect()
        self.admit()
        rows = self._rows_needing_a_token()
        if not rows:
            self._collect()
        elif k and all(self._cache_length(i) + k + 1 <= self.spec.max_len for i in rows):
            self._verify_step(rows, k)
        else:
            self._decode_step(rows)
            if k:
                self._collect()

    def _in_flight(self, slot: int) -> bool:
        return self._inflight is not None and self._inflight[1].get(slot) is self._slots[slot]

    def _rows_needing_a_token(self) -> list[int]:
        rows = []
        for i, state in enumerate(self._slots):
            if state is None or state.stopped:
                continue
            known = len(state.tokens) + self._in_flight(i)
            if known < state.request.params.max_new_tokens and len(state.request.prompt) + known < self.spec.max_len:
                rows.append(i)
        return rows

    def _cache_length(self, slot: int) -> int:
        """Positions slot ``slot`` holds in the cache: its prompt and every generated token but the last."""
        state = self._slots[slot]
        return len(state.request.prompt) + len(state.tokens) - 1

    def _collect(self) -> None:
        """Read the token ids of the decode step in flight (if any): stream them, then retire finished slots."""
        if self._inflight is None:
            return
        nxt, states, label = self._inflight
        self._inflight = None
        nxt = np.asarray(nxt)
        for i, state in states.items():
            if self._slots[i] is state:  # not retired (and reused) since that step was dispatched
                self._emit(i, [int(nxt[i])], label)
        self._retire_finished()

    def _batch_rows(self, in_flight=()):
        """Sampling inputs of every slot; the per-request arrays stay on the device until a slot changes. Slots
        in ``in_flight`` have one generated token more than their host-side list shows (still on the device)."""
        if self._rows is None:
            key_data, _, temperature, top_k, top_p = sampling_rows(
                [s and s.request.params for s in self._slots], [0] * self.num_slots
            )
            self._rows = tuple(jnp.asarray(x) for x in (key_data, temperature, top_k, top_p))
        key_data, temperature, top_k, top_p = self._rows
        index = [len(s.tokens) + (i in in_flight) if s else 0 for i, s in enumerate(self._slots)]
        return key_data, jnp.asarray(np.asarray(index, np.int32)), temperature, top_k, top_p

    def admit(self) -> None:
        """Admit waiting requests into free slots: prefill each prompt and read its first token."""
        while self._pending and None in self._slots:
            start, compiling = time.perf_counter(), self.steps.compile_s
            slot = self._slots.index(None)
            request = self._pending.popleft()
            prompt = request.prompt
            cached, entry = (0, None) if self.prefix_cache is None else self.prefix_cache.lookup(prompt)
            cached = min(cached, len(prompt) - 1)  # at least one token runs, to produce the next-token logits
            paged = steps.is_paged(self.cache_kind)
            if entry is None or cached == 0:
                cached, entry = 0, None
                single = self._single.reset()
            elif paged:
                single = self.steps.restore_pinned(self.cache, self._single, entry[0], cached)
            else:
                single = self.steps.restore(self._single, entry).rollback(cached)
            rest = prompt[cached:]
            bucket = steps.prefill_bucket(len(rest), self.options.prefill_bucket, self.spec.max_len - cached)
            tokens = np.zeros((1, bucket), np.int32)
            tokens[0, : len(rest)] = rest
            true_len = jnp.asarray([len(prompt)], jnp.int32)
            rows = (jnp.asarray(x) for x in sampling_rows([request.params], [0]))
            first, single = self.steps.prefill(self.params, single, jnp.asarray(tokens), true_len, *rows)
            self.stats.prefill_tokens += len(rest)
            self.stats.cached_prompt_tokens += cached
            prefix = (entry[0], jnp.int32(cached)) if entry is not None and paged else None
            self.cache = self.steps.insert(self.cache, jnp.int32(slot), single, prefix)
            self._single = single  # reuse the buffer for the next admission
            if self.prefix_cache is not None and prompt not in self.prefix_cache:
                self._remember(prompt, slot, single)
            state = _Active(request, [], cached, time.perf_counter())
            self._slots[slot] = state
            self._rows = None
            self._emit(slot, [int(np.asarray(first)[0])], "prefill")
            state.first_token = time.perf_counter()
            self.stats.prefill_s += time.perf_counter() - start - (self.steps.compile_s - compiling)
        self._retire_finished()

    def _remember(self, prompt: list[int], slot: int, single) -> None:
        """Make ``prompt``'s keys and values a prefix-cache entry: its pinned pages (paged) or a device copy."""
        if steps.is_paged(self.cache_kind):
            self.cache, pages = self.steps.pin(self.cache, jnp.int32(slot), jnp.int32(len(prompt)))
            entry, nbytes = (pages, len(prompt)), -(-len(prompt) // steps.PAGE_SIZE) * self._page_bytes
        else:
            # A trimmed device copy: a hit restores it with one scatter, no host round trip. Its length is a
            # prefill bucket, so few restore shapes ever compile.
            keep = steps.prefill_bucket(len(prompt), self.options.prefill_bucket, self.spec.max_len)
            entry = single.extract_slot(0, max_len=keep)
            nbytes = entry.nbytes
        if not self.prefix_cache.insert(prompt, entry, nbytes):
            self._evicted(entry)

    def _evicted(self, entry) -> None:
        """A prefix-cache entry left the cache: give its pinned pages back (device copies just go)."""
        if steps.is_paged(self.cache_kind):
            self.cache = self.steps.unpin(self.cache, entry[0])

    def _decode_step(self, rows: list[int]) -> None:
        tokens = np.zeros(self.num_slots, np.int32)
        mask = np.zeros(self.num_slots, bool)
        on_device = np.zeros(self.num_slots, bool)  # the slot's input token is the in-flight step's output
        for i in rows:
            mask[i] = True
            if self._in_flight(i):
                on_device[i] = True
            else:
                tokens[i] = self._slots[i].tokens[-1]
        inputs = jnp.asarray(tokens)
        if on_device.any():
            inputs = self.steps.merge_tokens(self._inflight[0], inputs, jnp.asarray(on_device))
        in_flight = set(np.flatnonzero(on_device).tolist())
        self.stats.decode_steps += 1
        label = f"decode step {self.stats.decode_steps}"
        nxt, self.cache = self.steps.decode(
            self.params, self.cache, inputs, jnp.asarray(mask), *self._batch_rows(in_flight)
        )
        self._collect()  # the previous step's ids, read while this one runs
        self._inflight = (nxt, {i: self._slots[i] for i in rows if self._slots[i] is not None}, label)

    def _verify_step(self, rows: list[int], k: int) -> None:
        tokens = np.zeros((self.num_slots, k + 1), np.int32)
        mask = np.zeros(self.num_slots, bool)
        drafted = {}
        for i in rows:
            state = self._slots[i]
            draft = prompt_lookup_draft(state.request.prompt + state.tokens, k, max_ngram=self.options.max_ngram)
            drafted[i] = len(draft)
            # Unused draft positions repeat the last token: any filler is safe, a match is a correct guess.
            tokens[i] = [state.tokens[-1], *draft] + [state.tokens[-1]] * (k - len(draft))
            mask[i] = True
        target, accepted, self.cache = self.steps.verify(
            self.params, self.cache, jnp.asarray(tokens), jnp.asarray(mask)
        )
        target, accepted = np.asarray(target), np.asarray(accepted)
        self.stats.verify_steps += 1
        for i in rows:
            self.stats.drafted_tokens += drafted[i]
            self.stats.accepted_tokens += min(int(accepted[i]), drafted[i])
            self._emit(i, target[i, : int(accepted[i]) + 1].tolist(), f"verify step {self.stats.verify_steps}")
        self._retire_finished()

    def _emit(self, slot: int, new_tokens: list[int], label: str) -> None:
        """Hand tokens to the slot's request (stream them), up to a stop token (not handed on) or the budget."""
        state = self._slots[slot]
        for token in new_tokens:
            if self._finish_reason(state) is not None:
                break
            if token == NONFINITE:
                raise NonFiniteLogitsError(
                    f"request {state.request.id}: the logits of its token {len(state.tokens)} held NaN or Inf "
                    f"({label}); generation stopped"
                )
            if token in state.request.params.stop_tokens:
                state.stopped = True
                break
            state.tokens.append(token)
            if state.request.on_token is not None:
                state.request.on_token(state.request.id, token)

    def _finish_reason(self, state: _Active) -> str | None:
        if state.stopped:
            return "stop"
        if len(state.tokens) >= state.request.params.max_new_tokens:
            return "length"
        # The cache holds the prompt and every generated token but the last; the last needs a free position.
        if state.tokens and len(state.request.prompt) + len(state.tokens) >= self.spec.max_len:
            return "max_len"
        return None

    def _retire_finished(self) -> None:
        mask = np.zeros(self.num_slots, bool)
        now = time.perf_counter()
        for i, state in enumerate(self._slots):
            reason = None if state is None else self._finish_reason(state)
            if reason is None:
                continue
            r = state.request
            self._done[r.id] = Completion(
                r.id, r.prompt, state.tokens, reason, state.cached_prompt_tokens, r.submitted, state.first_token, now
            )
            self._slots[i] = None
            self._rows = None
            mask[i] = True
        if mask.any():
            self.cache = self.steps.retire(self.cache, jnp.asarray(mask))
