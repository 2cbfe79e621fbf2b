"""A request on the host while the engine serves it: its state, how a step's tokens are laid out from the
scheduler's plan, and how sampled tokens are handed to it (stop tokens, budgets, streaming)."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import numpy as np

from jkv.serving.metrics import Completion
from jkv.serving.sampling import NONFINITE, SamplingParams
from jkv.serving.scheduler import Sequence as Scheduled


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or Inf logits for a request: generation stopped (the message names the step)."""


@dataclasses.dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[int, int], None] | None
    submitted: float
    seq: Scheduled
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated and read back
    inflight: int = 0  # tokens sampled by a dispatched step, not read yet
    draft: list[int] = dataclasses.field(default_factory=list)  # drafts of the step being planned
    stopped: bool = False  # a stop token came
    released: bool = False  # finished or cancelled: nothing more is handed to it
    first_token: float = math.nan
    last_token: float = math.nan
    admitted: float = math.nan  # when it took a slot

    def completion(self, reason: str, now: float) -> Completion:
        """What the caller gets back once the request finished at ``now`` for ``reason``."""
        return Completion(
            self.id,
            self.prompt,
            self.tokens,
            reason,
            self.seq.cached,
            self.submitted,
            self.first_token,
            now,
            self.last_token,
            self.admitted,
        )


def token_ids(prompt) -> list[int]:
    """``prompt`` (a sequence of ints, or a 1-D integer array) as a list of Python ints; ``TypeError`` naming
    anything else (text, floats, bools: never converted, as ``int("123")`` or ``int(1.7)`` would)."""
    if isinstance(prompt, (str, bytes)):
        raise TypeError(f"prompt must be token ids, got the text {prompt!r:.60}: encode it with the tokenizer first")
    if hasattr(prompt, "dtype") and hasattr(prompt, "shape"):  # a NumPy or JAX array
        ids = np.asarray(prompt)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(
                f"prompt must be a 1-D array of integer token ids, got shape {ids.shape} and dtype {ids.dtype}"
            )
        return ids.tolist()
    if not hasattr(prompt, "__iter__"):
        raise TypeError(f"prompt must be a sequence of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    bad = [t for t in ids if not isinstance(t, (int, np.integer)) or isinstance(t, bool)]
    if bad:
        raise TypeError(f"prompt token ids must be ints, got {bad[0]!r} ({type(bad[0]).__name__})")
    return [int(t) for t in ids]


def checked_prompt(prompt, params, max_len: int, vocab_size: int, options) -> list[int]:
    """``prompt`` as a list of ints, or ``ValueError`` naming what is wrong with it (or with ``params`` under the
    engine's ``options``); ``TypeError`` when it is not token ids."""
    prompt = token_ids(prompt)
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if len(prompt) > max_len:  # a full row still yields the prefill's token
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_len={max_len}")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if options.speculative_tokens and not params.greedy:
        raise ValueError("speculative decoding verifies greedy choices: use temperature=0 with speculative_tokens")
    return prompt


def step_tokens(plan, requests: dict[int, Request], num_slots: int):
    """The host inputs of ``plan``'s step: ``tokens [T]``, ``src [T]`` (the slot whose in-flight token a row
    takes, -1: the host's), ``verify [B]``, ``index [B]`` (each sampling slot's token index), the sampling
    requests by slot, and the drafts run."""
    tokens, src = np.zeros(plan.bucket, np.int32), np.full(plan.bucket, -1, np.int32)
    verify, index = np.zeros(num_slots, bool), np.zeros(num_slots, np.int32)
    sampling, drafted, row = {}, 0, 0
    for e in plan.entries:
        request, slot = requests[e.seq.id], e.seq.slot
        if e.start < request.seq.prompt_len:  # a prompt chunk
            tokens[row : row + e.count] = request.prompt[e.start : e.start + e.count]
        else:  # the last token (on the device while in flight), then drafts to verify
            if request.inflight:
                src[row] = slot
            else:
                tokens[row] = request.tokens[-1]
            tokens[row + 1 : row + e.count] = request.draft[: e.count - 1]
            verify[slot] = e.count > 1
            drafted += e.count - 1
        if e.samples:
            index[slot] = len(request.tokens) + request.inflight
            sampling[slot] = request
        row += e.count
    return tokens, src, verify, index, sampling, drafted


def fills_row(prompt_len: int, generated: int, max_len: int) -> bool:
    """Whether a sequence's cache row is full: it holds the prompt and every generated token but the last."""
    return generated > 0 and prompt_len + generated - 1 >= max_len


def finish_reason(request: Request, max_len: int) -> str | None:
    if request.stopped:
        return "stop"
    if len(request.tokens) >= request.params.max_new_tokens:
        return "length"
    if fills_row(len(request.prompt), len(request.tokens), max_len):
        return "max_len"
    return None


def emit(request: Request, new_tokens: list[int], label: str, max_len: int) -> int:
    """Hand tokens to ``request`` (stream them), up to a stop token (not handed on) or its budget; returns how
    many it took. ``NONFINITE`` raises ``NonFiniteLogitsError`` naming the step ``label``."""
    now, taken = time.perf_counter(), 0
    for token in new_tokens:
        if request.released or finish_reason(request, max_len) is not None:  # e.g. cancelled by on_token
            break
        if token == NONFINITE:
            raise NonFiniteLogitsError(
                f"request {request.id}: the logits of its token {len(request.tokens)} held NaN or Inf "
                f"({label}); generation stopped"
            )
        if token in request.params.stop_tokens:
            request.stopped = True
            break
        request.tokens.append(token)
        taken += 1
        if math.isnan(request.first_token):
            request.first_token = now
        request.last_token = now
        if request.on_token is not None:
            request.on_token(request.id, token)
    return taken


def one_step_at_a_time(method):
    """An engine's ``method`` (a step) refused while another runs: an ``on_token`` callback may submit and cancel,
    not step (a step inside a step reads the outer one's tokens as its own, and the engine never goes idle)."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self._stepping:
            raise RuntimeError(
                f"Engine.{method.__name__}() called inside a step (from an on_token callback?): a callback may "
                "submit() and cancel(), not step(), admit(), run() or generate()"
            )
        self._stepping = True
        try:
            return method(self, *args, **kwargs)
        finally:
            self._stepping = False

    return guarded
