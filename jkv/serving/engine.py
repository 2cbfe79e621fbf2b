"""Continuous-batching engine: requests, slots and the pipelined loop of mixed steps.

Every ``step()`` asks the scheduler (``jkv.serving.scheduler``) what the next step carries, at most
``max_batch_tokens`` tokens: the next token (or prompt-lookup drafts to verify, ``jkv.serving.speculative``) of
every running sequence and chunks of waiting prompts, which start after their longest prefix-cache hit
(``jkv.serving.prefixes``). It then dispatches one jitted, cache-donating step for that token bucket
(``jkv.serving.mixed``); there is no separate prefill. Steps are pipelined: step ``i + 1`` is dispatched before
step ``i``'s token ids are read, its rows for those sequences taking step ``i``'s output on the device (verify
steps read their results at once: the next drafts need them). A request finishes at a stop token (not returned),
after ``max_new_tokens``, when its cache row is full, or when cancelled (``sampling.FINISH_REASONS``); its slot
and pages go back in the next step.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jkv.models import llama
from jkv.serving import requests, steps
from jkv.serving.metrics import Completion, EngineStats
from jkv.serving.options import EngineOptions
from jkv.serving.prefixes import Prefixes
from jkv.serving.requests import Request, checked_prompt, emit, fills_row, finish_reason, step_tokens
from jkv.serving.sampling import SamplingParams
from jkv.serving.scheduler import Scheduler
from jkv.serving.scheduler import Sequence as Scheduled
from jkv.serving.speculative import prompt_lookup_draft
from jkv.serving.step_inputs import SAMPLING_INPUTS, StepInputs
from jkv.serving.storage import allocate, plan_storage


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
        if mesh is not None:  # a mesh that cannot fit is refused before any cache is planned or placed
            llama.check_layout(config, mesh)
        self.options, self.params, self.config, self.mesh = options, params, config, mesh
        self.cache_kind = options.cache
        storage = plan_storage(options, config, params.dtype, mesh, verbose)
        storage, self.cache = allocate(storage, options, mesh, verbose)
        self.spec, self.num_slots, self.window_slack = storage.spec, storage.num_slots, storage.window_slack
        num_pages, per_token = storage.num_pages, storage.per_token
        cache_sharding = None
        if mesh is not None:  # tensor / data parallel: weights and slots split over the mesh, kept split
            from jkv.caches import sharding

            llama.check_layout(config, mesh, batch=self.num_slots)
            self.params = llama.shard_params(params, config, mesh)
            self.cache = sharding.shard_cache(self.cache, mesh)
            cache_sharding = sharding.cache_sharding(self.cache, mesh)
        self.steps = steps.Steps(config, options.model_options, mesh, cache_sharding)
        self.scheduler = Scheduler(
            self.num_slots,
            options.batch_tokens,
            options.max_len,
            page_size=storage.page_size,
            num_pages=num_pages,
            buckets=options.buckets,
            max_count=self.window_slack if storage.page_size is None else None,
        )
        self.prefixes = Prefixes(self, per_token) if options.prefix_cache_bytes else None
        self.stats = EngineStats(num_pages=num_pages or 0)
        self._requests: dict[int, Request] = {}  # waiting and running
        self._inflight = None  # (token ids on the device, {slot: request}, label, dispatch time, compile s)
        no_tokens = jnp.zeros(self.num_slots, jnp.int32)
        if mesh is not None:  # placed as the steps return token ids (split over dp like the slots): one compile
            split = PartitionSpec("dp") if mesh.shape.get("dp", 1) > 1 else PartitionSpec()
            no_tokens = jax.device_put(no_tokens, NamedSharding(mesh, split))
        self.inputs = StepInputs(self.num_slots, no_tokens)
        self._last_read, self._last_read_compile = time.perf_counter(), 0.0
        self._compile0 = 0.0  # compile seconds before the first submission the stats count
        self._done: dict[int, Completion] = {}
        self._next_id, self._stepping = 0, False

    @property
    def compile_s(self) -> float:
        """Seconds this engine has spent compiling its steps."""
        return self.steps.compile_s

    @property
    def prefix_cache(self):
        """The ``PrefixCache`` of prompt prefixes (None when off)."""
        return None if self.prefixes is None else self.prefixes.cache

    def compile_all(self, progress: bool = True, sampling: bool = True) -> int:
        """Compile the mixed step of every token bucket now, each by one step of no tokens, and the two programs
        that draw the tokens of sampling steps (with and without top-k / top-p; not with ``sampling=False`` or
        speculative decoding, which verifies greedy choices); a line each on stderr when ``progress``. Returns how
        many programs were compiled."""
        draw = sampling and not self.options.speculative_tokens
        count = len(self.scheduler.buckets) + 2 * draw

        def compiled(i: int, what: str, start: float) -> None:
            if progress:
                took = time.perf_counter() - start
                print(f"jkv engine: compiled step {i}/{count} ({what}) in {took:.1f} s", file=sys.stderr)

        for i, bucket in enumerate(self.scheduler.buckets):
            start = time.perf_counter()
            inputs = self.empty_step_inputs(bucket)
            rows = self.options.speculative_tokens + 1
            out, self.cache = self.steps.mixed(self.params, self.cache, *inputs, lm_rows=rows)
            compiled(i + 1, f"{bucket} tokens", start)
        for i, truncate in enumerate((True, False) if draw else ()):
            start = time.perf_counter()
            self.steps.sample(out[1], *inputs[SAMPLING_INPUTS], truncate=truncate)
            compiled(count - 1 + i, "sampling, top-k / top-p" if truncate else "sampling", start)
        return count

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None, on_token=None) -> int:
        """Queue a request (prompt token ids); returns its id. ``on_token(id, token)`` streams each new token."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if on_token is not None and not callable(on_token):  # else every later step would fail on it
            raise TypeError(f"on_token must be a callable on_token(id, token), got {on_token!r}")
        prompt = checked_prompt(prompt, params, self.spec.max_len, self.config.vocab_size, self.options)
        # The last generated token is never written: prompt + max_new_tokens - 1 positions at most.
        positions = min(len(prompt) + params.max_new_tokens - 1, self.spec.max_len)
        seq = Scheduled(self._next_id, len(prompt), positions)
        self.scheduler.add(seq)
        now = time.perf_counter()
        self._requests[seq.id] = Request(seq.id, prompt, params, on_token, now, seq)
        if math.isnan(self.stats.first_submit):
            self.stats.first_submit, self._compile0 = now, self.steps.compile_s
        self._next_id += 1
        return seq.id

    @property
    def num_active(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_pending(self) -> int:
        return len(self.scheduler.waiting)

    def has_work(self) -> bool:
        return bool(self._requests) or self._inflight is not None

    def pop_finished(self) -> list[Completion]:
        done = sorted(self._done.values(), key=lambda c: c.id)
        self._done.clear()
        return done

    def run(self, show_progress: bool = True) -> list[Completion]:
        """Step until every submitted request has finished; completions in submission order."""
        total = len(self._requests)
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
        self._flush_resets()
        if bar is not None:
            bar.close()
        return sorted(finished, key=lambda c: c.id)

    def cancel(self, request_id: int) -> bool:
        """End a waiting or running request now (finish reason ``"cancelled"``, its tokens so far); False when
        no such request is waiting or running."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._finish(request, "cancelled")
        self._flush_if_idle()
        return True

    def abort(self) -> None:
        """Drop every waiting and running request (no completions) and empty their slots, e.g. after an error."""
        self._inflight = None
        for request in list(self._requests.values()):
            self._release(request)
        self._flush_resets()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, **kw) -> list[list[int]]:
        """Convenience: run ``prompts`` through the engine and return the generated ids of each, in order (requests
        submitted before run too; their completions stay for ``pop_finished``)."""
        ids = [self.submit(p, params) for p in prompts]
        done = {c.id: c for c in self.run(**kw)}
        mine = [done.pop(i) for i in ids]
        self._done.update(done)
        return [c.tokens for c in mine]

    def summary(self):
        """The figures since the engine was built or ``reset_stats`` (``metrics.RunSummary``)."""
        return self.stats.summary()

    def reset_stats(self) -> None:
        """Start the counters of ``stats`` and ``summary()`` afresh (e.g. after a warm-up run)."""
        self.stats = EngineStats(num_pages=self.stats.num_pages)

    # ------------------------------------------------------------------ one engine step
    @requests.one_step_at_a_time
    def step(self) -> None:
        """Plan and dispatch one mixed step, then read the previous one (see the module docstring)."""
        if self.options.speculative_tokens:
            self._collect()
        plan = self.scheduler.schedule(self._want, self._admit, self._make_room)
        if plan is None:
            self._collect()
        else:
            self._dispatch(plan)
        self._flush_if_idle()

    @requests.one_step_at_a_time
    def admit(self) -> None:
        """Run prompt-only steps until every waiting request holds a slot and its prompt is in the cache, its first
        token read (benchmarks then drive a decode step of their own over the filled slots)."""
        while True:
            plan = self.scheduler.schedule(lambda seq: 0, self._admit, self._make_room)
            if plan is None:
                break
            self._dispatch(plan)
        self._collect()
        self._flush_if_idle()

    def _dispatch(self, plan) -> None:
        """Build the step's inputs from ``plan``, dispatch it, and read the previous step (or this one)."""
        k = self.options.speculative_tokens
        tokens, src, verify, index, sampling, drafted = step_tokens(plan, self._requests, self.num_slots)
        prev = self._inflight[0] if self._inflight is not None else self.inputs.no_tokens
        compiling, start = self.steps.compile_s, time.perf_counter()
        inputs = self.inputs.build(self._slot_params, tokens, src, prev, plan.counts, verify, index)
        out, self.cache = self.steps.mixed(self.params, self.cache, *inputs, lm_rows=k + 1)
        if not k:  # (argmax, logits): a program of its own draws where some slot samples
            rows = inputs[SAMPLING_INPUTS]
            draw = self.inputs.draw
            out = self.steps.sample(out[1], *rows, truncate=draw == "truncate") if draw else out[0]
        self.inputs.resets[:] = False
        if self.prefixes is not None:
            for e in plan.entries:
                if e.samples and e.start < e.seq.prompt_len:  # its prompt is in the cache: worth remembering
                    self.prefixes.remember(self._requests[e.seq.id])
        st = self.stats
        st.steps += 1
        st.prefill_tokens += plan.prefill_tokens
        prefill = plan.prefill_tokens > 0
        st.decode_steps += not prefill
        label = f"step {st.steps}"
        info = (label, prefill, start, compiling)
        if k:
            st.verify_steps += bool(verify.any())
            st.drafted_tokens += drafted
            targets, accepted = (np.asarray(x) for x in out)
            self._account(info)
            for slot, request in sampling.items():
                if request.released:  # cancelled by an earlier request's on_token
                    continue
                if verify[slot]:
                    n = int(accepted[slot])
                    st.accepted_tokens += n
                    self.scheduler.rollback(request.seq, request.seq.computed - (plan.counts[slot] - 1 - n))
                    self._emit(request, targets[slot, : n + 1].tolist(), label, prefill)
                else:
                    self._emit(request, [int(targets[slot, 0])], label, prefill)
            self._retire_finished()
        else:
            for request in sampling.values():
                request.inflight += 1
            self._collect()  # the previous step's ids, read while this one runs
            self._inflight = (out, sampling, info)
        self._pages_in_use()

    def empty_step_inputs(self, bucket: int):
        """The inputs after ``(params, cache)`` of a mixed step of ``bucket`` rows carrying no token (it compiles
        that bucket's step and changes nothing in the cache)."""
        return self.inputs.empty(self._slot_params, bucket)

    def _slot_params(self) -> list[SamplingParams | None]:
        return [None if s is None else self._requests[s.id].params for s in self.scheduler.slots]

    def _want(self, seq: Scheduled) -> int:
        """Tokens a running sequence whose prompt is done asks for: 0, 1, or 1 + its drafts."""
        request = self._requests[seq.id]
        known = len(request.tokens) + request.inflight
        done = known >= request.params.max_new_tokens or fills_row(request.seq.prompt_len, known, self.spec.max_len)
        if request.stopped or done:
            return 0
        request.draft = []
        room = request.params.max_new_tokens - known - 1  # drafts past the last token would be thrown away
        k = min(self.options.speculative_tokens, room)
        if k > 0 and not request.inflight:
            request.draft = prompt_lookup_draft(request.prompt + request.tokens, k, max_ngram=self.options.max_ngram)
        return 1 + len(request.draft)

    def _admit(self, seq: Scheduled) -> tuple[int, list[int]]:
        """A request took a slot: its prefix-cache hit ``(positions, host page ids)``, attached on the device."""
        self.inputs.slots_changed()
        request = self._requests[seq.id]
        request.admitted = time.perf_counter()
        if self.prefixes is None:
            return 0, []
        n, ids = self.prefixes.attach(request.prompt, seq.slot)
        if n:
            self.inputs.resets[seq.slot] = False  # the attach emptied the slot first
            self.stats.prefix_hits += 1
            self.stats.cached_prompt_tokens += n
        return n, ids

    def _make_room(self) -> bool:
        return self.prefixes is not None and self.prefixes.evict_one()

    def _collect(self) -> None:
        """Read the token ids of the step in flight (if any): stream them, then retire finished requests."""
        if self._inflight is None:
            return
        out, sampling, info = self._inflight
        self._inflight = None
        out = np.asarray(out)
        self._account(info)
        for slot, request in sampling.items():
            if self._requests.get(request.id) is request and request.seq.slot == slot:  # not finished since
                request.inflight -= 1
                self._emit(request, [int(out[slot])], info[0], info[1])
        self._retire_finished()

    def _account(self, info) -> None:
        """Add a step's seconds (from its dispatch or the previous read, compiles excluded) to its phase."""
        _, prefill, start, compiling = info
        now = time.perf_counter()
        if start < self._last_read:  # dispatched before the previous read: count from that read
            start, compiling = self._last_read, self._last_read_compile
        seconds = max(now - start - (self.steps.compile_s - compiling), 0.0)
        self._last_read, self._last_read_compile = now, self.steps.compile_s
        if prefill:
            self.stats.prefill_s += seconds
        else:
            self.stats.decode_s += seconds

    def _emit(self, request: Request, new_tokens: list[int], label: str, prefill: bool) -> None:
        n = emit(request, new_tokens, label, self.spec.max_len)
        self.stats.generated_tokens += n
        self.stats.decode_tokens += 0 if prefill else n

    def _retire_finished(self) -> None:
        for request in list(self._requests.values()):
            reason = finish_reason(request, self.spec.max_len)
            if reason is not None:
                self._finish(request, reason)

    def _finish(self, request: Request, reason: str) -> None:
        completion = request.completion(reason, time.perf_counter())
        self._release(request)
        self._done[request.id] = completion
        self.stats.compile_s = self.steps.compile_s - self._compile0
        self.stats.completed_one(completion, self.steps.compile_s_between)

    def _release(self, request: Request) -> None:
        """The request leaves: its slot is emptied at the start of the next step, its pages go back."""
        slot = request.seq.slot
        request.released = True
        self.scheduler.finish(request.seq)
        del self._requests[request.id]
        if slot >= 0:
            self.inputs.resets[slot] = True
            self.inputs.slots_changed()

    def _flush_if_idle(self) -> None:
        """Empty the finished slots now when no further step will (nothing waits, runs or is in flight): a caller
        that steps while ``has_work()`` (the server's worker) would else leave their lengths and pages held."""
        if not self._requests and self._inflight is None:
            self._flush_resets()

    def _flush_resets(self) -> None:
        """Empty the slots still waiting for a next step (the engine is idle)."""
        resets = self.inputs.resets
        if resets.any() and self._inflight is None:
            # a copy: on CPU the transfer may read the host array after this returns, and it is cleared below
            self.cache = self.steps.retire(self.cache, jnp.asarray(resets.copy()))
            resets[:] = False
        self._pages_in_use()

    def _pages_in_use(self) -> None:
        if self.scheduler.pages is not None:
            self.stats.pages_in_use = self.scheduler.pages.in_use
            self.stats.peak_pages_in_use = max(self.stats.peak_pages_in_use, self.stats.pages_in_use)
