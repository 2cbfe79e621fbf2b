"""The FastAPI application: OpenAI-compatible routes over one engine worker, errors as OpenAI error bodies.

``create_app(engine, tokenizer, ServerOptions(...))`` builds it; the worker thread starts with the app (its
lifespan) and stops after the HTTP side has drained. ``jkv.server.serve`` runs it under uvicorn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jkv.server.generation import ClientGone, Run
from jkv.server.metrics import ServerMetrics
from jkv.server.schemas import (
    SEED_LIMIT,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    json_type,
)
from jkv.server.worker import QueueFull, ShuttingDown, Worker
from jkv.serving import SamplingParams

log = logging.getLogger("jkv.server")

# Requests counted by ``jkv_requests_total``: the generation endpoints, by their path.
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """``model_name``: the id ``/v1/models`` lists (any ``model`` in a request is accepted). ``max_waiting``:
    requests that may wait for an engine slot; more get 429. ``default_max_tokens``: the budget of a completion
    that names none (OpenAI's is 16; chat answers default to the room left in the context)."""

    model_name: str = "jkv"
    max_waiting: int = 256
    default_max_tokens: int = 16

    def __post_init__(self):
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ValueError(f"max_waiting must be an int >= 0, got {self.max_waiting!r}")
        if not isinstance(self.default_max_tokens, int) or self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be a positive int, got {self.default_max_tokens!r}")


def create_app(engine, tokenizer, options: ServerOptions | None = None) -> FastAPI:
    """The server's app over ``engine`` (a ``jkv.serving.Engine``, owned by the app's worker thread from now on)
    and ``tokenizer`` (a ``jkv.loading.Tokenizer``; text in and out, stop tokens, chat template)."""
    options = ServerOptions() if options is None else options
    metrics = ServerMetrics()
    worker = Worker(engine, max_waiting=options.max_waiting, on_stats=metrics.observe_engine)
    max_len = engine.spec.max_len
    vocab = engine.config.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="jkv", lifespan=lifespan)
    app.state.worker, app.state.metrics, app.state.options = worker, metrics, options

    def count(request: Request, status: int) -> None:
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint is not None:
            metrics.requests.labels(endpoint, str(status)).inc()

    def fail(request: Request, error: ApiError) -> JSONResponse:
        count(request, error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return fail(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):  # unknown routes and methods
        response = fail(request, ApiError(error.status_code, f"{error.detail}: {request.method} {request.url.path}"))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        param = field_name(first.get("loc", ()))
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if str(first.get("type", "")).endswith("_type") and "input" in first:  # strict types: say what came
            message += f", got {json_type(first['input'])}"
        return fail(request, ApiError(400, f"{param}: {message}" if param else message, param))

    def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        message = f"internal error ({type(error).__name__}: {error}) answering {request.method} {request.url.path}"
        return fail(request, ApiError(500, message, None, "server_error"))

    app.add_middleware(UnexpectedErrors, answer=unexpected)

    # ------------------------------------------------------------------ prompts and budgets
    def encode(text: str, field: str) -> list[int]:
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", field)
        try:  # JSON may carry a lone surrogate (``"\ud800"``), which is no character and has no UTF-8 bytes
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = text[e.start : e.end].encode("unicode_escape").decode()
            raise ApiError(
                400, f"{field}: the text holds {bad}, a lone surrogate, which is not Unicode", field
            ) from None
        return tokenizer.encode(text, add_eos=False)  # a prompt to continue: never EOS

    def check_prompt(ids: list[int], field: str) -> None:
        if len(ids) > max_len - 1:  # the room for at least one generated token
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this server's context is {max_len} tokens, which leaves room "
                f"for prompts of at most {max_len - 1}",
                field,
                code="context_length_exceeded",
            )
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} lie outside the vocabulary [0, {vocab})", field)

    def sampling(body, prompt_len: int, budget: int | None, default: int, field: str) -> SamplingParams:
        room = max_len - prompt_len  # OpenAI's count: prompt + completion tokens within the context
        if budget is None:
            budget = min(default, room)
        elif budget > room:
            raise ApiError(
                400,
                f"{field}={budget} with a prompt of {prompt_len} tokens needs {prompt_len + budget} positions; "
                f"this server's context is {max_len} tokens (at most {room} new tokens here)",
                field,
                code="context_length_exceeded",
            )
        seed = body.seed if body.seed is not None else random.randrange(SEED_LIMIT)
        stops = () if body.ignore_eos or tokenizer is None else tuple(tokenizer.stop_ids)
        extra = body.stop_token_ids or []
        bad = [t for t in extra if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {vocab})", "stop_token_ids")
        return SamplingParams(
            temperature=body.temperature,
            top_k=body.top_k if 0 < body.top_k < vocab else 0,  # all of the vocabulary is no cut (and fits int32)
            top_p=body.top_p,
            seed=seed,
            max_new_tokens=budget,
            stop_tokens=tuple(sorted(set(stops) | set(extra))),
        )

    async def answer(request: Request, body, prompt: list[int], params: SamplingParams, kind: str):
        run = Run(worker, metrics, tokenizer, prompt, params, body.stop_strings, kind, options.model_name)
        try:
            run.submit()
        except QueueFull as e:
            raise ApiError(429, str(e), None, "rate_limit_exceeded", "rate_limit_exceeded") from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), None, "server_unavailable") from None
        if body.stream:
            count(request, 200)
            return StreamingResponse(
                run.events(body.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            text = "".join([piece async for piece in run.pieces(request.is_disconnected)])
        except ClientGone:
            count(request, 499)
            return Response(status_code=499)
        count(request, 200)
        return JSONResponse(run.whole(text))

    # ------------------------------------------------------------------ routes
    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        prompt = body.prompt if isinstance(body.prompt, list) else encode(body.prompt, "prompt")
        check_prompt(prompt, "prompt")
        params = sampling(body, len(prompt), body.max_tokens, options.default_max_tokens, "max_tokens")
        return await answer(request, body, prompt, params, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest):
        if tokenizer is None or not tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template: use /v1/completions with a prompt", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.render_chat(messages)
        except ValueError as e:  # the template refused the conversation (raise_exception in the template)
            raise ApiError(400, str(e), "messages") from None
        prompt = encode(text, "messages")
        check_prompt(prompt, "messages")
        params = sampling(body, len(prompt), body.token_budget, max_len, body.budget_field)
        return await answer(request, body, prompt, params, "chat.completion")

    @app.get("/v1/models")
    async def models():
        card = {"id": options.model_name, "object": "model", "created": int(time.time()), "owned_by": "jkv"}
        return {"object": "list", "data": [card | {"max_model_len": max_len}]}

    @app.get("/health")
    async def health():
        if worker.error is not None:
            return JSONResponse(error_body(f"the engine failed: {worker.error}", "server_error", None), 503)
        return {"status": "ok", "running": worker.outstanding}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


class UnexpectedErrors:
    """ASGI middleware: an exception no handler took (a bug of ours) is answered by ``answer(request, error)``
    while the response has not started. (Starlette's own 500 handler raises the error on after answering: the
    server then logs it a second time, after the client has its answer, and drops the connection.) An error after
    the status line went out is raised on: the server logs it and cuts the connection."""

    def __init__(self, app, answer: Callable[[Request, Exception], Response]):
        self.app, self.answer = app, answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as error:
            if started:
                raise
            await self.answer(Request(scope, receive), error)(scope, receive, send)


def field_name(loc) -> str | None:
    """The request field a validation error is about, as OpenAI writes it (``messages[0].role``); pydantic's
    tags of union members (``str``, ``list[int]``) and of validators are dropped."""
    parts = [p for p in loc if p != "body"]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or part in {"str", "int", "float", "bool", "list", "dict"} or part.startswith("function-"):
            break
        else:
            name += f".{part}" if name else part
    return name or None
