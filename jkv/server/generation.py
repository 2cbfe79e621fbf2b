"""One generation request on the event loop: submit it to the worker, turn its tokens into text, and shape the
OpenAI response bodies (whole, or server-sent-event chunks)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from jkv.server.metrics import ServerMetrics
from jkv.server.schemas import ApiError
from jkv.server.text import TextStream
from jkv.server.worker import Ticket, Worker

log = logging.getLogger("jkv.server")

# The engine's finish reasons as OpenAI names them: a full cache row is a length limit too.
FINISH = {"stop": "stop", "length": "length", "max_len": "length"}
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""


class Run:
    """A submitted request: ``pieces()`` yields its text as it comes; then ``finish_reason`` and ``tokens`` hold.

    ``kind``: ``"text_completion"`` or ``"chat.completion"`` (the response shapes). The ticket is cancelled (its
    engine request ended) when a stop string appears or when the consumer goes away before the end.
    """

    def __init__(self, worker: Worker, metrics: ServerMetrics, tokenizer, prompt, params, stop, kind, model):
        self.worker, self.metrics, self.kind, self.model = worker, metrics, kind, model
        self.prompt_tokens, self.tokens = len(prompt), 0
        self.finish_reason: str | None = None
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._text = TextStream(tokenizer, stop)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._arrived = time.perf_counter()
        self._last: float | None = None
        self._check_at = self._arrived + DISCONNECT_POLL_S  # when a non-streaming request next asks for its client
        self.ticket = Ticket(prompt, params, self._queue.put_nowait, asyncio.get_running_loop())

    def submit(self) -> None:
        self.worker.submit(self.ticket)  # QueueFull / ShuttingDown go to the app's handlers
        self.metrics.prompt_tokens.inc(self.prompt_tokens)

    async def pieces(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[str]:
        try:
            while self.finish_reason is None:
                events = await self._next(disconnected)
                for kind, payload in events:
                    piece = self._event(kind, payload)
                    if piece:
                        yield piece
                    if self.finish_reason is not None:
                        break
        except ClientGone:
            raise
        except Exception:  # a failure of ours (the engine's came as an event and ended its request already)
            if self.finish_reason is None:
                self.worker.cancel(self.ticket)
                self.finish_reason = "error"
            raise
        finally:
            if self.finish_reason is None:  # the client went away (or the consumer was cancelled)
                self.worker.cancel(self.ticket)
                self.finish_reason = "cancelled"
            self.metrics.finished.labels(self.finish_reason).inc()
            self.metrics.generated_tokens.inc(self.tokens)

    async def _next(self, disconnected) -> list:
        if disconnected is None:
            return await self._queue.get()
        while True:
            wait = self._check_at - time.perf_counter()
            if wait <= 0:  # on a clock, not in pauses between tokens: a busy engine may never pause that long
                if await disconnected():
                    raise ClientGone(self.id)
                self._check_at = time.perf_counter() + DISCONNECT_POLL_S
                continue
            try:
                return await asyncio.wait_for(self._queue.get(), wait)
            except asyncio.TimeoutError:
                pass

    def _event(self, kind: str, payload) -> str:
        if kind == "token":
            now = time.perf_counter()
            if self._last is None:
                self.metrics.ttft.observe(now - self._arrived)
            else:
                self.metrics.itl.observe(now - self._last)
            self._last = now
            self.tokens += 1
            piece = self._text.push(payload)
            if self._text.stopped:  # a stop string: the engine need not go on
                self.worker.cancel(self.ticket)
                self.finish_reason = "stop"
            return piece
        if kind == "done":
            piece = self._text.finish()
            self.finish_reason = "stop" if self._text.stopped else FINISH.get(payload.finish_reason, "stop")
            return piece
        self.finish_reason = "error"
        if kind == "rejected":
            raise ApiError(400, str(payload))
        raise ApiError(500, str(payload), None, "server_error")

    # ------------------------------------------------------------------ response bodies
    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
        }

    def _choice(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if self.kind == "text_completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": ""}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, text: str) -> dict:
        if self.kind == "text_completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason}
        else:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        body = {"id": self.id, "object": self.kind, "created": self.created, "model": self.model}
        return body | {"choices": [choice], "usage": self.usage()}

    def chunk(self, choices: list, usage: dict | None, include_usage: bool) -> str:
        obj = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def piece_event(self, include_usage: bool) -> Callable[[str], str]:
        """``piece -> chunk([choice(piece)])`` for streamed pieces: the chunk rendered once around a marker, so a
        token costs one string's JSON encoding, not the whole body's (at 64 streams, 64 events an engine step)."""
        marker = json.dumps("\x00piece\x00")
        whole = self.chunk([self._choice("\x00piece\x00", None)], None, include_usage)
        if whole.count(marker) != 1:  # (a model name holding the marker)
            return lambda piece: self.chunk([self._choice(piece, None)], None, include_usage)
        head, tail = whole.split(marker)
        return lambda piece: head + json.dumps(piece, ensure_ascii=False) + tail

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, ``data: [DONE]`` last; an engine failure mid-stream
        or a failure of the server's own becomes an ``error`` event (the status line has gone out already)."""
        try:
            if self.kind != "text_completion":
                yield self.chunk([self._choice(None, None, first=True)], None, include_usage)
            event = self.piece_event(include_usage)
            async for piece in self.pieces():
                yield event(piece)
            yield self.chunk(
                [self._choice(None if self.kind != "text_completion" else "", self.finish_reason)], None, include_usage
            )
            if include_usage:
                yield self.chunk([], self.usage(), True)
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:  # a failure of ours: logged here, as nothing above this generator sees it
            log.exception("stream %s failed", self.id)
            error = ApiError(500, f"internal error ({type(e).__name__}: {e}) in the stream", None, "server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
