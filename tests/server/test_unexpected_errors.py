"""A bug of the server's own (an exception no route expects) answers OpenAI's error body with status 500, counted
and logged with its traceback; in a stream whose status line has gone out, an ``error`` event then ``[DONE]``. The
request's engine slot is freed either way, and the server goes on serving."""

import json
import logging

import httpx
import openai
import pytest
from helpers_server import IDLE, metric_values

from jkv.server import generation


class Planted(RuntimeError):
    pass


@pytest.fixture
def broken_text(monkeypatch):
    """Detokenization fails on the first token: a failure inside a route, after the request reached the engine."""

    def push(self, token):
        raise Planted("planted detokenizer failure")

    monkeypatch.setattr(generation.TextStream, "push", push)
    return monkeypatch


def test_an_unexpected_error_answers_a_json_500_counted_and_logged(running, broken_text, caplog):
    server = running()
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8}
    with caplog.at_level(logging.ERROR):
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and "Planted" in error["message"], error
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], Planted)]
    assert logged, [r.getMessage() for r in caplog.records]
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as info:
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert info.value.body["type"] == "server_error"
    assert server.wait_idle() == IDLE
    values = metric_values(server.url)
    assert values[("jkv_requests_total", (("endpoint", "completions"), ("status", "500")))] == 1
    assert values[("jkv_requests_total", (("endpoint", "chat"), ("status", "500")))] == 1
    assert values[("jkv_request_finish_total", (("reason", "error"),))] == 2
    broken_text.undo()
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 200
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


PROMPTS = {
    "/v1/completions": {"prompt": [5, 6, 7]},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
}


@pytest.mark.parametrize("path", list(PROMPTS), ids=["completions", "chat"])
def test_an_unexpected_error_mid_stream_ends_with_an_error_event(running, broken_text, caplog, path):
    server = running()
    body = {"model": "tiny", "max_tokens": 8, "stream": True} | PROMPTS[path]
    with caplog.at_level(logging.ERROR):
        with httpx.stream("POST", server.url + path, json=body, timeout=30) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "Planted" in error["message"], error
    assert any(r.exc_info and isinstance(r.exc_info[1], Planted) for r in caplog.records)
    assert server.wait_idle() == IDLE
    assert metric_values(server.url)[("jkv_request_finish_total", (("reason", "error"),))] == 1
