"""The engine's one thread: it owns the ``Engine``, steps it while there is work, and hands tokens to requests.

Other threads (the HTTP event loop) never touch the engine: they put submissions and cancellations into a
thread-safe inbox and receive events through ``Ticket.sink``. The tokens of one step reach each event loop in one
``call_soon_threadsafe`` call (not one per token), so a 64-slot step wakes the loop once.

Events a sink receives, in order: ``("token", id)`` per generated token, then one of ``("done", Completion)``,
``("rejected", message)`` (the engine refused the request) or ``("error", message)`` (the engine failed, or the
server stopped first). A cancelled ticket receives nothing more.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from jkv.serving import SamplingParams

log = logging.getLogger("jkv.server")


class QueueFull(RuntimeError):
    """The server holds as many requests as it may (running plus waiting): the client should retry later."""


class ShuttingDown(RuntimeError):
    """The server is draining: it takes no new request."""


def cancel_request(engine, request_id: int) -> None:
    """End ``request_id`` in ``engine`` now, freeing its slot and pages (``Engine.cancel``)."""
    cancel = getattr(engine, "cancel", None)
    if cancel is None:
        raise NotImplementedError(
            "this jkv.serving.Engine has no cancel(request_id): a request whose client went away runs on to its "
            "max_tokens (its tokens are dropped); Engine.cancel(request_id) must end it and free its slot and pages"
        )
    cancel(request_id)


@dataclasses.dataclass(eq=False)
class Ticket:
    """One request as the worker tracks it. ``sink(events)`` takes a list of events; ``loop`` runs it."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[list[tuple[str, Any]]], None]
    loop: asyncio.AbstractEventLoop | None
    request_id: int | None = None  # the engine's id, once submitted
    cancelled: bool = False


class Worker:
    """Owns ``engine`` on one daemon thread. ``max_waiting``: requests that may wait for a slot beyond those the
    engine runs; ``submit`` raises ``QueueFull`` past that. ``on_stats(engine)`` runs on the worker thread
    every ``stats_every_s`` and when the engine goes idle (gauges read the engine there, never elsewhere)."""

    def __init__(self, engine, *, max_waiting: int = 256, on_stats=None, stats_every_s: float = 0.5):
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be an int >= 0, got {max_waiting!r}")
        self.engine = engine
        self.capacity = engine.num_slots + max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0  # submitted and not yet done (guarded by _lock)
        self._tickets: dict[int, Ticket] = {}  # engine id -> ticket (worker thread only)
        self._outbox: dict[Any, list] = collections.defaultdict(list)  # loop -> [(ticket, event)] of this step
        self._on_stats, self._stats_every = on_stats, stats_every_s
        self._accepting = True
        self._stop = threading.Event()
        self._warned_cancel = False
        self._thread = threading.Thread(target=self._run, name="jkv-engine", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, ticket: Ticket) -> Ticket:
        with self._lock:
            if not self._accepting or self.error is not None:
                raise ShuttingDown("the server is shutting down and takes no new request")
            if self._outstanding >= self.capacity:
                raise QueueFull(
                    f"the server holds {self._outstanding} requests, its limit ({self.engine.num_slots} running "
                    f"+ {self.capacity - self.engine.num_slots} waiting): retry later"
                )
            self._outstanding += 1
        self._inbox.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The ticket's client is gone: drop it (and end its engine request) on the worker's next turn."""
        if not ticket.cancelled:
            ticket.cancelled = True
            self._inbox.put(("cancel", ticket))

    def call(self, fn: Callable[[Any], Any], timeout: float = 60.0) -> Any:
        """Run ``fn(engine)`` on the worker thread between steps and return its result (inspection, tests)."""
        done, box = threading.Event(), {}

        def run(engine):
            try:
                box["value"] = fn(engine)
            except BaseException as e:
                box["error"] = e
            done.set()

        self._inbox.put(("call", run))
        if not done.wait(timeout):
            raise TimeoutError(f"the engine thread did not run the call within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new request, drop what remains, and end the thread (after the HTTP side has drained)."""
        self.stop_accepting()
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        last_stats, was_busy = 0.0, True
        try:
            while not self._stop.is_set():
                busy = self.engine.has_work()
                self._drain_inbox(block=not busy)
                if self._stop.is_set():
                    break
                if self.engine.has_work():
                    self.engine.step()
                    for completion in self.engine.pop_finished():
                        self._finished(completion)
                    self._flush()
                now = time.monotonic()
                if self._on_stats is not None and ((busy and now - last_stats >= self._stats_every) or was_busy):
                    self._on_stats(self.engine)  # while busy every stats_every_s; once more on going idle
                    last_stats = now
                was_busy = busy
        except BaseException as e:  # the engine failed: every waiting client gets the error, none hangs
            log.exception("the engine thread failed")
            self.error = e
            self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
        finally:
            self.stop_accepting()
            self._fail_all("the server stopped before this request ended")
            self._abort_rest()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload) -> None:
        if kind == "call":
            payload(self.engine)
        elif kind == "submit":
            ticket = payload
            if ticket.cancelled:
                self._release()
                return
            try:
                ticket.request_id = self.engine.submit(ticket.prompt, ticket.params, self._on_token)
            except ValueError as e:  # checked by the app before; a last word from the engine still reaches the client
                self._release()
                self._send(ticket, ("rejected", str(e)))
                self._flush()
                return
            self._tickets[ticket.request_id] = ticket
        elif kind == "cancel":
            self._cancel(payload)

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.request_id is None or self._tickets.pop(ticket.request_id, None) is None:
            return  # not submitted yet (skipped when its turn comes) or already finished
        self._release()
        try:
            cancel_request(self.engine, ticket.request_id)
        except NotImplementedError as e:
            if not self._warned_cancel:
                log.warning("%s", e)
                self._warned_cancel = True

    def _on_token(self, request_id: int, token: int) -> None:
        ticket = self._tickets.get(request_id)
        if ticket is not None:
            self._send(ticket, ("token", token))

    def _finished(self, completion) -> None:
        ticket = self._tickets.pop(completion.id, None)
        if ticket is not None:
            self._release()
            self._send(ticket, ("done", completion))

    def _release(self) -> None:
        with self._lock:
            self._outstanding -= 1

    def _send(self, ticket: Ticket, event) -> None:
        self._outbox[ticket.loop].append((ticket, event))

    def _flush(self) -> None:
        """Deliver this step's events: one wake-up per event loop."""
        for loop, items in self._outbox.items():
            if loop is None:
                _deliver(items)
            else:
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that loop has closed: its clients are gone
                    pass
        self._outbox.clear()

    def _fail_all(self, message: str) -> None:
        for ticket in self._tickets.values():
            self._send(ticket, ("error", message))
        self._tickets.clear()
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._send(payload, ("error", message))
            elif kind == "call":  # its caller waits: it still gets an answer (or the engine's error)
                payload(self.engine)
        self._flush()

    def _abort_rest(self) -> None:
        self._tickets.clear()
        try:
            self.engine.abort()
        except Exception:  # a failed engine may not even abort; nothing is waiting on it any more
            log.exception("engine.abort() failed while stopping")


def _deliver(items: list) -> None:
    """Hand each ticket its events (on the ticket's event loop), skipping tickets cancelled meanwhile."""
    by_ticket: dict[Ticket, list] = {}
    for ticket, event in items:
        by_ticket.setdefault(ticket, []).append(event)
    for ticket, events in by_ticket.items():
        if not ticket.cancelled:
            ticket.sink(events)
