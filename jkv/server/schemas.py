"""Request bodies of the OpenAI API subset the server speaks, and its error bodies.

Fields jkv does not implement are refused with a 400 naming them when set to anything but their neutral value,
rather than ignored: a client asking for logprobs or penalties should learn that it gets none. Fields that change
nothing here (``user``, ``model`` naming the served model) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEED_LIMIT = 2**32  # jkv.serving.SamplingParams.seed: jax.random.key keeps 32 bits
MAX_STOP_STRINGS = 16
# The values of unimplemented completion fields that ask for nothing (logprobs=0 asks for the chosen token's).
NEUTRAL = {"echo": (False,), "logprobs": (None,), "best_of": (None, 1), "suffix": (None,)}


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Generation(BaseModel):
    """The sampling and streaming fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

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
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI's optional fields are nullable (clients send an unset argument as null): null takes the field's
        default. A required field sent as null stays an error."""
        if not isinstance(data, dict):
            return data
        optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {key: value for key, value in data.items() if value is not None or key not in optional}

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n}: this server generates one choice per request (n=1); send n requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float, info) -> float:
        if value != 0:
            raise ValueError(f"{info.field_name}={value}: penalties are not supported (use 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generation):
    """``POST /v1/completions``: ``prompt`` is text or token ids (one prompt; a list of one is accepted too)."""

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

    @field_validator("echo", "logprobs", "best_of", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value not in NEUTRAL[info.field_name]:  # per field: with one shared tuple, echo=true passed as 1
            raise ValueError(f"{info.field_name}={value!r} is not supported")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

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

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None

    @field_validator("logprobs", "top_logprobs", "tools")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @property
    def budget_field(self) -> str:
        """The field that set the budget (errors name it): ``max_completion_tokens`` when sent, else ``max_tokens``."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def token_budget(self) -> int | None:
        return getattr(self, self.budget_field)
