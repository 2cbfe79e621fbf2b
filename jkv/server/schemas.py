"""Request bodies of the OpenAI API subset the server speaks, and its error bodies.

Fields jkv does not implement (the ``UNIMPLEMENTED_*`` tables) are refused with a 400 naming them when set to
anything but a value that asks for nothing (``response_format`` ``{"type": "text"}``, penalties 0, no tools), rather
than ignored: a client asking for JSON output, tool calls, logprobs, or vLLM's guided decoding and penalties,
should learn that it gets none. Of vLLM's sampling extensions ``top_k``, ``ignore_eos`` and ``stop_token_ids`` are
implemented. Fields that change nothing here (``user``, ``model`` naming the served model) are accepted; fields
neither API has are ignored. Types are strict, as OpenAI's are: ``"max_tokens": "5"`` or ``5.0`` is a 400, not 5;
an int is a valid float.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

SEED_LIMIT = 2**32  # jkv.serving.SamplingParams.seed: jax.random.key keeps 32 bits
MAX_STOP_STRINGS = 16
REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)


@dataclasses.dataclass(frozen=True)
class Unimplemented:
    """A field jkv accepts only at ``neutral`` values (compared after validation, so types are already strict:
    ``echo=1`` never equals ``True``); ``supported`` ends the 400's message."""

    neutral: tuple
    supported: str

    def check(self, name: str, value):
        if value not in self.neutral:
            raise ValueError(f"{name}={json.dumps(value)} is not supported: {self.supported}")
        return value


NO_TOOLS = "this server does not call tools (send none, or leave it out)"
GUIDED = "no guided decoding: this server generates free text only (leave it out)"
# Per endpoint, as OpenAI's API names them (a field of the other endpoint is unknown there, hence ignored).
UNIMPLEMENTED_BOTH = {
    "n": Unimplemented((1,), "one choice per request (n=1); send n requests instead"),
    "presence_penalty": Unimplemented((0,), "penalties are not applied (send 0, or leave it out)"),
    "frequency_penalty": Unimplemented((0,), "penalties are not applied (send 0, or leave it out)"),
    "logit_bias": Unimplemented(({},), "no logit bias is applied (send {}, or leave it out)"),
    "response_format": Unimplemented(
        ({"type": "text"},), 'this server generates free text only (send {"type": "text"}, or leave it out)'
    ),
    # vLLM's sampling extensions (jkv implements top_k, ignore_eos and stop_token_ids of them)
    "repetition_penalty": Unimplemented((1,), "no repetition penalty is applied (send 1, or leave it out)"),
    "min_p": Unimplemented((0,), "no min-p cut is applied (send 0, or leave it out)"),
    "min_tokens": Unimplemented((0,), "a stop token may end the answer at any length (send 0, or leave it out)"),
    "use_beam_search": Unimplemented((False,), "sampling or greedy decoding only (send false)"),
    "include_stop_str_in_output": Unimplemented((False,), "a stop string is cut from the text (send false)"),
    "guided_json": Unimplemented((), GUIDED),
    "guided_regex": Unimplemented((), GUIDED),
    "guided_choice": Unimplemented((), GUIDED),
    "guided_grammar": Unimplemented((), GUIDED),
}
UNIMPLEMENTED_COMPLETIONS = UNIMPLEMENTED_BOTH | {
    "echo": Unimplemented((False,), "the prompt is not echoed (send false)"),
    "logprobs": Unimplemented((), "no log probabilities are returned (leave it out, or null)"),
    "best_of": Unimplemented((1,), "one candidate per request (best_of=1)"),
    "suffix": Unimplemented(("",), "no text is inserted before a suffix (leave it out)"),
}
UNIMPLEMENTED_CHAT = UNIMPLEMENTED_BOTH | {
    "logprobs": Unimplemented((False,), "no log probabilities are returned (send false)"),
    "top_logprobs": Unimplemented((0,), "no log probabilities are returned (send 0, or leave it out)"),
    "tools": Unimplemented(([],), NO_TOOLS),
    "functions": Unimplemented(([],), NO_TOOLS),
    "tool_choice": Unimplemented(("none", "auto"), 'no tools are called: "none" or "auto" only'),
    "function_call": Unimplemented(("none", "auto"), 'no functions are called: "none" or "auto" only'),
    "parallel_tool_calls": Unimplemented((True, False), NO_TOOLS),
    "modalities": Unimplemented((["text"],), 'text output only (["text"])'),
    "audio": Unimplemented((), "text output only (leave it out)"),
    "web_search_options": Unimplemented((), "this server does not search the web (leave it out)"),
}


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None, code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def json_type(value) -> str:
    """What JSON calls ``value``'s type, for a 400 saying what a field got."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else names.get(type(value), "an object")


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class _Generation(BaseModel):
    """The sampling and streaming fields shared by both endpoints."""

    model_config = REQUEST_CONFIG
    unimplemented: ClassVar[dict[str, Unimplemented]] = UNIMPLEMENTED_BOTH

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension (vLLM's): 0 or -1 is no cut
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (vLLM's): the model's end tokens do not end the answer
    stop_token_ids: list[int] | None = None  # extension (vLLM's): more token ids that end the answer
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    use_beam_search: bool = False
    include_stop_str_in_output: bool = False
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI's optional fields are nullable (clients send an unset argument as null): null takes the field's
        default. A required field sent as null stays an error."""
        if not isinstance(data, dict):
            return data
        optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {key: value for key, value in data.items() if value is not None or key not in optional}

    @field_validator("*")
    @classmethod
    def _implemented(cls, value, info: ValidationInfo):
        rule = cls.unimplemented.get(info.field_name)
        return value if rule is None else rule.check(info.field_name, value)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generation):
    """``POST /v1/completions``: ``prompt`` is text or token ids (one prompt; a list of one is accepted too)."""

    unimplemented: ClassVar[dict[str, Unimplemented]] = UNIMPLEMENTED_COMPLETIONS
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"a batch of {len(prompt)} prompts: this server takes one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str) and not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt holds no token")
        return prompt


class ChatMessage(BaseModel):
    """One turn. A turn of tool use (role ``tool``, or an assistant's ``tool_calls`` / ``function_call``) is refused:
    this server calls no tools, and dropping the calls would show the model a conversation that never happened."""

    model_config = REQUEST_CONFIG
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = None
    function_call: dict[str, Any] | None = None

    @field_validator("role")
    @classmethod
    def _no_tool_role(cls, role):
        if role == "tool":
            raise ValueError(f"a tool's result answers a tool call, and {NO_TOOLS}")
        return role

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_calls(cls, calls):
        if calls:
            raise ValueError(NO_TOOLS)
        return calls

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        for i, part in enumerate(content if isinstance(content, list) else ()):
            if part.get("type") != "text":
                raise ValueError(f"part {i} is of type {part.get('type')!r}: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}, of type 'text', needs a string 'text'")
        return content

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    unimplemented: ClassVar[dict[str, Unimplemented]] = UNIMPLEMENTED_CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    @property
    def budget_field(self) -> str:
        """The field that set the budget (errors name it): ``max_completion_tokens`` when sent, else ``max_tokens``."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def token_budget(self) -> int | None:
        return getattr(self, self.budget_field)
