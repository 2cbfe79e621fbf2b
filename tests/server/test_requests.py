"""Requests as clients send them: nulls for unset fields, text that is not Unicode, fields the server does not
implement, content parts that are not text, token budgets at the edge of the context, sampling values at the edge of
what the engine holds (top_p 1e-300, top_k 2**31), unknown routes: each answered as the OpenAI API documents, never
a 500 or a failed engine."""

import copy
import json

import httpx
import openai
import pytest
from helpers_server import MAX_LEN, Running

from jkv.server import ServerOptions
from jkv.serving import SamplingParams


def post(server, path: str, body: dict) -> httpx.Response:
    """JSON with non-ASCII characters escaped (``\\ud800``, as a JavaScript client sends a lone surrogate)."""
    content = json.dumps({"model": "tiny"} | body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


def assert_400(response: httpx.Response, field: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (field, "invalid_request_error"), error
    return error["message"]


HI = [{"role": "user", "content": "Hi"}]
VALID = {"/v1/completions": {"prompt": "Hi"}, "/v1/chat/completions": {"messages": HI}}


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"prompt": ["\udfff"]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
    ],
    ids=["prompt", "prompt-list", "chat"],
)
def test_a_lone_surrogate_in_the_text_is_a_400(running, path, body, field):
    server = running()
    message = assert_400(post(server, path, body | {"max_tokens": 2}), field)
    assert "surrogate" in message
    assert post(server, path, VALID[path] | {"max_tokens": 1}).status_code == 200


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
# (endpoint, field, value): each asks for something jkv does not do, so a 200 would be an answer it did not get.
UNSUPPORTED = [
    (COMPLETIONS, "echo", True),
    (COMPLETIONS, "logprobs", 1),
    (COMPLETIONS, "logprobs", 0),  # 0 asks for the chosen token's logprob
    (COMPLETIONS, "best_of", 2),
    (COMPLETIONS, "suffix", "end"),
    (COMPLETIONS, "response_format", {"type": "json_object"}),  # vLLM's guided decoding on completions
    (COMPLETIONS, "logit_bias", {"1": 5}),
    (COMPLETIONS, "presence_penalty", 0.5),
    (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    (CHAT, "tools", [TOOL]),
    (CHAT, "tool_choice", "required"),
    (CHAT, "tool_choice", {"type": "function", "function": {"name": "f"}}),
    (CHAT, "functions", [TOOL["function"]]),
    (CHAT, "function_call", {"name": "f"}),
    (CHAT, "logit_bias", {"1": -100}),
    (CHAT, "frequency_penalty", -1),
    (CHAT, "logprobs", True),
    (CHAT, "top_logprobs", 2),
    (CHAT, "n", 3),
    (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "web_search_options", {}),
    (COMPLETIONS, "repetition_penalty", 1.1),  # vLLM's sampling extensions
    (CHAT, "min_p", 0.05),
    (COMPLETIONS, "min_tokens", 3),
    (CHAT, "use_beam_search", True),
    (COMPLETIONS, "include_stop_str_in_output", True),
    (CHAT, "guided_json", {"type": "object"}),
    (COMPLETIONS, "guided_regex", "[0-9]+"),
    (CHAT, "guided_choice", ["yes", "no"]),
    (COMPLETIONS, "guided_grammar", "root ::= 'a'"),
]
# Values that ask for nothing: what the server does anyway.
NEUTRAL = [
    (COMPLETIONS, "echo", False),
    (COMPLETIONS, "best_of", 1),
    (COMPLETIONS, "response_format", {"type": "text"}),
    (COMPLETIONS, "logit_bias", {}),
    (COMPLETIONS, "frequency_penalty", 0),
    (CHAT, "response_format", {"type": "text"}),
    (CHAT, "tools", []),
    (CHAT, "tool_choice", "none"),
    (CHAT, "tool_choice", "auto"),  # with no tools: no call to make
    (CHAT, "functions", []),
    (CHAT, "function_call", "none"),
    (CHAT, "parallel_tool_calls", False),
    (CHAT, "logit_bias", {}),
    (CHAT, "presence_penalty", 0.0),
    (CHAT, "logprobs", False),
    (CHAT, "top_logprobs", 0),
    (CHAT, "modalities", ["text"]),
    (COMPLETIONS, "repetition_penalty", 1.0),
    (CHAT, "repetition_penalty", 1),
    (CHAT, "min_p", 0),
    (COMPLETIONS, "min_tokens", 0),
    (CHAT, "use_beam_search", False),
    (COMPLETIONS, "ignore_eos", True),
    (CHAT, "stop_token_ids", []),
]


def test_fields_jkv_does_not_implement_are_refused_unless_neutral(running):
    """A client asking for JSON output, tool calls, logprobs or penalties must learn it gets none, not receive
    plain text as if it had; the message says what the server does support."""
    server = running()
    for path, field, value in UNSUPPORTED:
        message = assert_400(post(server, path, VALID[path] | {"max_tokens": 1, field: value}), field)
        assert "not supported" in message and field in message, (path, field, value, message)
    for path, field, value in NEUTRAL:
        response = post(server, path, VALID[path] | {"max_tokens": 1, field: value})
        assert response.status_code == 200, (path, field, value, response.text)
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="tiny", messages=HI, response_format={"type": "json_object"})
    assert info.value.body["param"] == "response_format" and '{"type": "text"}' in info.value.body["message"]


# (endpoint, field, value, param): a JSON value of the wrong type, refused as OpenAI's API does, not coerced.
WRONG_TYPES = [
    (COMPLETIONS, "max_tokens", "5", "max_tokens"),
    (COMPLETIONS, "max_tokens", 5.0, "max_tokens"),
    (COMPLETIONS, "max_tokens", True, "max_tokens"),
    (COMPLETIONS, "temperature", "0.5", "temperature"),
    (COMPLETIONS, "temperature", True, "temperature"),
    (COMPLETIONS, "stream", "yes", "stream"),
    (COMPLETIONS, "stream", 1, "stream"),
    (COMPLETIONS, "seed", "3", "seed"),
    (COMPLETIONS, "top_k", "3", "top_k"),
    (COMPLETIONS, "echo", 1, "echo"),
    (COMPLETIONS, "stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    (CHAT, "max_completion_tokens", "5", "max_completion_tokens"),
    (CHAT, "n", 1.0, "n"),
    (CHAT, "top_p", "1", "top_p"),
    (CHAT, "logprobs", 0, "logprobs"),
    (CHAT, "messages", [{"role": "user", "content": 5}], "messages[0].content"),
]


@pytest.mark.parametrize(
    "path,field,value,param",
    WRONG_TYPES,
    ids=[f"{'chat' if 'chat' in p else 'completions'}-{f}-{v!r}" for p, f, v, _ in WRONG_TYPES],
)
def test_a_value_of_the_wrong_json_type_is_a_400_naming_the_field(running, path, field, value, param):
    message = assert_400(post(running(), path, VALID[path] | {"max_tokens": 1} | {field: value}), param)
    assert message.startswith(f"{param}: ") and ", got " in message, message  # what came: "got a string"


def test_integers_are_numbers_where_a_float_is_expected(running):
    """JSON has one number type: temperature 1 or presence_penalty 0 is as valid as 1.0 or 0.0."""
    server = running()
    for path in (COMPLETIONS, CHAT):
        body = VALID[path] | {"max_tokens": 1, "temperature": 0, "top_p": 1, "presence_penalty": 0}
        response = post(server, path, body | {"frequency_penalty": 0})
        assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_budget_past_the_context_names_the_field_sent(running, field):
    message = assert_400(post(running(), "/v1/chat/completions", {"messages": HI, field: 10 * MAX_LEN}), field)
    assert message.startswith(f"{field}={10 * MAX_LEN} ")


NULLS = dict(temperature=None, top_p=None, n=None, seed=None, stop=None, stream=None, stream_options=None)
NULLS |= dict(presence_penalty=None, frequency_penalty=None, logit_bias=None, user=None)


def test_null_fields_take_their_defaults(running):
    """OpenAI's optional fields are nullable, and the ``openai`` client sends an argument passed as None as null
    (``create(temperature=args.temperature)``): null is the field's default, as if it were left out."""
    server = running()
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    text = api.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0).choices[0].text
    nulls = NULLS | dict(logprobs=None, echo=None, best_of=None, suffix=None, extra_body={"top_k": None})
    got = api.completions.create(model="tiny", prompt="Hi", max_tokens=2, **(nulls | {"temperature": 0}))
    assert (got.choices[0].text, got.usage.completion_tokens) == (text, 2)
    assert api.completions.create(model="tiny", prompt="Hi", **nulls | {"max_tokens": None}).usage.completion_tokens
    nulls = NULLS | dict(max_tokens=None, max_completion_tokens=None, logprobs=None, top_logprobs=None, tools=None)
    chat = api.chat.completions.create(model="tiny", messages=HI, **(nulls | {"max_completion_tokens": 2}))
    assert chat.usage.completion_tokens == 2 and chat.choices[0].message.role == "assistant"
    assert_400(post(server, "/v1/completions", {"prompt": None}), "prompt")  # required fields stay required
    assert_400(post(server, "/v1/chat/completions", {"messages": None}), "messages")


def test_the_largest_budget_accepted_is_generated_in_full(running):
    """The engine ends a request when prompt + generated tokens reach its max_len: a budget the server accepts
    must fit that, or the client gets fewer tokens than it asked for and was promised."""
    server = running()
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = [1, 2, 3]
    room = MAX_LEN - len(prompt)
    got = api.completions.create(model="tiny", prompt=prompt, max_tokens=room, temperature=0)
    assert (got.usage.completion_tokens, got.choices[0].finish_reason) == (room, "length")
    message = assert_400(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": room + 1}), "max_tokens")
    assert f"at most {room} new tokens" in message


def test_a_tiny_top_p_samples_the_most_likely_token(running):
    """top_p=1e-300 is valid (in (0, 1]) and keeps only the most likely token; it is 0 as a float32 on the device,
    where it kept none and drew token 0 (here an end token: an empty answer)."""
    server = running()
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    greedy = api.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
    nucleus = api.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=1, top_p=1e-300, seed=0)
    assert (nucleus.choices[0].text, nucleus.usage.completion_tokens) == (greedy.choices[0].text, 2)


def test_a_top_k_past_the_vocabulary_is_no_cut(running):
    """top_k at or past the vocabulary keeps every token, as top_k=0 does; 2**31 overflowed the engine's int32 rows
    and failed the engine thread, so every later request got 503."""
    server = running()
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 1, "seed": 5}
    plain = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    for top_k in (2**31, 2**64):
        response = post(server, "/v1/completions", body | {"top_k": top_k})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == plain
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


PARTS = [
    ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "only text parts"),
    ([{"type": "text", "text": "a"}, {"type": "text"}], "string 'text'"),
    ([{"type": "text", "text": 5}], "string 'text'"),
]


@pytest.mark.parametrize("content,says", PARTS, ids=["image", "no-text", "text-not-a-string"])
def test_a_content_part_that_is_not_text_is_a_400_naming_the_message(running, content, says):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    message = assert_400(post(running(), "/v1/chat/completions", {"messages": messages}), "messages[1].content")
    assert says in message


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL_TURNS = [  # (a turn of tool use, the field named)
    ({"role": "assistant", "content": None, "tool_calls": [CALL]}, "messages[1].tool_calls"),
    ({"role": "assistant", "content": "", "function_call": CALL["function"]}, "messages[1].function_call"),
    ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages[1].role"),
]


@pytest.mark.parametrize("turn,param", TOOL_TURNS, ids=["tool_calls", "function_call", "tool-role"])
def test_a_turn_of_tool_use_is_a_400_naming_it(running, turn, param):
    """The calls would be dropped silently otherwise: the model would answer a conversation that never happened."""
    server = running()
    message = assert_400(post(server, "/v1/chat/completions", {"messages": [*HI, turn]}), param)
    assert "does not call tools" in message, message
    plain = {"role": "assistant", "content": "Hello", "tool_calls": [], "function_call": None}  # asks for nothing
    response = post(server, "/v1/chat/completions", {"messages": [*HI, plain, *HI], "max_tokens": 1})
    assert response.status_code == 200, response.text


def test_unknown_routes_and_methods_answer_openai_error_bodies(running):
    server = running()
    for method, path, status in [("POST", "/v1/embeddings", 404), ("GET", "/v1/completions", 405)]:
        response = httpx.request(method, server.url + path, timeout=10)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and path in error["message"], error
    with pytest.raises(openai.NotFoundError) as info:
        openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0).embeddings.create(
            model="tiny", input="Hi"
        )
    assert info.value.body["type"] == "invalid_request_error"


def test_stop_token_ids_and_ignore_eos_as_vllm_takes_them(engine, tokenizer):
    """stop_token_ids end the answer at such a token (not returned, finish_reason stop); ignore_eos keeps the
    model's own end tokens from ending it (stop_token_ids still do). Out-of-vocabulary ids are a 400."""
    prompt = [5, 17, 300, 42]
    greedy = engine.generate([prompt], SamplingParams(max_new_tokens=6), show_progress=False)[0]
    end = greedy[2]
    assert end not in greedy[:2], greedy  # else the test asks nothing of position 2
    own_end = copy.copy(tokenizer)
    own_end.stop_ids = (end,)  # as if the model's end token were greedy[2]
    server = Running(engine, own_end, ServerOptions(model_name="tiny"))
    try:
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
        stopped = post(server, COMPLETIONS, body).json()
        assert (stopped["usage"]["completion_tokens"], stopped["choices"][0]["finish_reason"]) == (2, "stop")
        ignored = post(server, COMPLETIONS, body | {"ignore_eos": True}).json()
        assert (ignored["usage"]["completion_tokens"], ignored["choices"][0]["finish_reason"]) == (6, "length")
        by_id = post(server, COMPLETIONS, body | {"ignore_eos": True, "stop_token_ids": [end]}).json()
        assert (by_id["usage"]["completion_tokens"], by_id["choices"][0]["finish_reason"]) == (2, "stop")
        assert_400(post(server, COMPLETIONS, body | {"stop_token_ids": [tokenizer.vocab_size]}), "stop_token_ids")
    finally:
        server.stop()
