"""A stand-in for ``jkv.serving.Engine`` that steps at a fixed pace, for measuring the HTTP server's own overhead
on any machine (``bench/load_server.py --paced HOLD_MS WAIT_MS``).

Each step first holds the interpreter for ``hold_s`` (a busy loop: the host work of a real step, the scheduler
and the dispatch, which keep the GIL), then releases it for ``wait_s`` (a sleep: the device computing), then hands
one token to every running request. Requests take one of ``num_slots`` slots in arrival order and keep it until
their ``max_new_tokens`` are out. No model, no cache: what the server costs on top of an engine of that pace is
what the load generator then measures. It is not a model of the engine's latency beyond that.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
import types


@dataclasses.dataclass
class _Running:
    id: int
    prompt: list
    max_new: int
    on_token: object
    submitted: float
    tokens: list = dataclasses.field(default_factory=list)
    first_token: float = math.nan


class PacedEngine:
    """The engine interface the server and ``bench/load_server.py`` use, at a fixed step pace."""

    def __init__(self, num_slots: int, *, hold_s: float, wait_s: float, max_len: int = 4096, vocab_size: int = 1000):
        if num_slots < 1 or hold_s < 0 or wait_s < 0:
            raise ValueError(f"need num_slots >= 1 and times >= 0, got {num_slots}, {hold_s}, {wait_s}")
        self.num_slots, self.hold_s, self.wait_s = num_slots, hold_s, wait_s
        self.spec = types.SimpleNamespace(max_len=max_len)
        self.config = types.SimpleNamespace(vocab_size=vocab_size)
        self.stats = types.SimpleNamespace(pages_in_use=0)
        self.cache = self.prefix_cache = None
        self._pending: collections.deque[_Running] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._finished: list = []
        self._next_id = 0

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_active(self) -> int:
        return len(self._running)

    def submit(self, prompt, params, on_token=None) -> int:
        if len(prompt) + params.max_new_tokens > self.spec.max_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens exceeds max_len {self.spec.max_len}")
        self._next_id += 1
        self._pending.append(
            _Running(self._next_id, list(prompt), params.max_new_tokens, on_token, time.perf_counter())
        )
        return self._next_id

    def has_work(self) -> bool:
        return bool(self._pending or self._running)

    def step(self) -> None:
        while self._pending and len(self._running) < self.num_slots:
            r = self._pending.popleft()
            self._running[r.id] = r
        end = time.perf_counter() + self.hold_s
        while time.perf_counter() < end:  # the host's share of a step: the GIL stays held
            pass
        time.sleep(self.wait_s)
        now = time.perf_counter()
        for r in list(self._running.values()):
            token = (r.id + len(r.tokens)) % self.config.vocab_size
            r.tokens.append(token)
            if len(r.tokens) == 1:
                r.first_token = now
            if r.on_token is not None:
                r.on_token(r.id, token)
            if len(r.tokens) >= r.max_new:
                self._end(r, "length", now)

    def _end(self, r: _Running, reason: str, now: float) -> None:
        del self._running[r.id]
        self._finished.append(self._completion(r, reason, now))

    @staticmethod
    def _completion(r: _Running, reason: str, now: float):
        return types.SimpleNamespace(
            id=r.id, prompt=r.prompt, tokens=r.tokens, finish_reason=reason, cached_prompt_tokens=0,
            submitted=r.submitted, first_token=r.first_token, finished=now,
        )  # fmt: skip

    def pop_finished(self) -> list:
        done, self._finished = self._finished, []
        return done

    def cancel(self, request_id: int) -> bool:
        """End a waiting or running request now (finish reason ``"cancelled"``); False when there is none."""
        request = self._running.get(request_id) or next((r for r in self._pending if r.id == request_id), None)
        if request is None:
            return False
        if request.id in self._running:
            self._end(request, "cancelled", time.perf_counter())
        else:
            self._pending.remove(request)
            self._finished.append(self._completion(request, "cancelled", time.perf_counter()))
        return True

    def abort(self) -> None:
        self._pending.clear()
        self._running.clear()
