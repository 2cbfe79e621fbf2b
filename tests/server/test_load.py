"""The server under load and faults: 64 concurrent streams with a quarter of the clients leaving mid-stream, the
metrics' counters against the requests made, a full queue (429), a client leaving (its slot and pages freed) and a
drain on SIGTERM."""

import asyncio
import json
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from helpers_server import IDLE, NUM_SLOTS, metric_values

from jkv.serving import Engine, SamplingParams


def reference(engine, tokenizer, prompts, max_tokens):
    """Greedy answers of the engine driven in-process (no server running): text and token count per prompt."""
    params = SamplingParams(max_new_tokens=max_tokens, stop_tokens=tokenizer.stop_ids)
    return [
        (tokenizer.decode(t, skip_special=True), len(t)) for t in engine.generate(prompts, params, show_progress=False)
    ]


def test_64_streams_with_a_quarter_leaving(engine, tokenizer, running):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, tokenizer.vocab_size, size=rng.integers(2, 10)).tolist() for _ in range(64)]
    leaving = set(rng.choice(64, size=16, replace=False).tolist())
    budget = [30 if i in leaving else 8 for i in range(64)]
    want = reference(engine, tokenizer, prompts, 8)
    server = running()

    async def one(api, i):
        stream = await api.completions.create(
            model="tiny",
            prompt=prompts[i],
            max_tokens=budget[i],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            usage = chunk.usage or usage
            if i in leaving and len(pieces) == 1 + int(rng.integers(0, 3)):
                await stream.close()  # the client goes away mid-stream
                return None
        return "".join(pieces), usage.completion_tokens

    async def main():
        api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        got = await asyncio.gather(*(one(api, i) for i in range(64)))
        after = await api.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, temperature=0)
        await api.close()
        return got, after

    got, after = asyncio.run(main())
    for i, answer in enumerate(got):
        if i not in leaving:
            assert answer == want[i], f"stream {i}"
    assert after.choices[0].text == want[0][0]  # still serving
    assert server.wait_idle() == IDLE  # no request, slot, page or pin held

    values = metric_values(server.url)
    assert values[("jkv_requests_total", (("endpoint", "completions"), ("status", "200")))] == 65
    reasons = {labels[0][1]: v for (name, labels), v in values.items() if name == "jkv_request_finish_total"}
    assert sum(reasons.values()) == 65 and reasons.get("cancelled", 0) <= 16
    assert values[("jkv_prompt_tokens_total", ())] == sum(map(len, prompts)) + len(prompts[0])
    whole = sum(n for i, (_, n) in enumerate(want) if i not in leaving) + want[0][1]
    assert whole <= values[("jkv_generation_tokens_total", ())] <= whole + 16 * 30
    assert values[("jkv_time_to_first_token_seconds_count", ())] == 65
    assert values[("jkv_queue_length", ())] == 0 and values[("jkv_pages_in_use", ())] == 0


def blocked(worker):
    """Hold the engine's thread until the returned event is set (requests then wait in its inbox)."""
    entered, release = threading.Event(), threading.Event()

    def hold(engine):
        entered.set()
        release.wait(60)

    threading.Thread(target=worker.call, args=(hold,), daemon=True).start()
    assert entered.wait(30)
    return release


def sse_text(lines) -> str:
    text = ""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


async def read_lines(response) -> list[str]:
    return [line async for line in response.aiter_lines()]


def test_a_full_queue_answers_429(engine, tokenizer, running):
    prompts = [[7, 8, 9 + i] for i in range(NUM_SLOTS)]
    want = reference(engine, tokenizer, prompts, 4)
    server = running(max_waiting=0)
    release = blocked(server.worker)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            streams = []
            for p in prompts:
                body = {"prompt": p, "max_tokens": 4, "temperature": 0, "stream": True}
                streams.append(await http.send(http.build_request("POST", "/v1/completions", json=body), stream=True))
            assert [s.status_code for s in streams] == [200] * NUM_SLOTS
            full = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await api.completions.create(model="tiny", prompt="Hi", max_tokens=4)
            await api.close()
            release.set()
            texts = [sse_text(await read_lines(s)) for s in streams]
            return full, texts

    full, texts = asyncio.run(main())
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_exceeded"
    assert texts == [t for t, _ in want]
    values = metric_values(server.url)
    assert values[("jkv_requests_total", (("endpoint", "completions"), ("status", "429")))] == 2
    assert server.wait_idle()["active"] == 0


@pytest.mark.skipif(not hasattr(Engine, "cancel"), reason="needs Engine.cancel(request_id) from the engine branch")
def test_a_client_leaving_frees_its_slot_and_pages(engine, tokenizer, running, monkeypatch):
    cancelled = []
    original = engine.cancel
    monkeypatch.setattr(engine, "cancel", lambda rid: (cancelled.append(rid), original(rid))[1])
    server = running()

    async def main():
        api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        stream = await api.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=50, temperature=0, stream=True)
        async for _ in stream:
            break
        await stream.close()
        await api.close()

    asyncio.run(main())
    assert server.wait_idle(timeout=10) == IDLE and len(cancelled) == 1
    values = metric_values(server.url)
    assert values[("jkv_request_finish_total", (("reason", "cancelled"),))] == 1
    assert values[("jkv_generation_tokens_total", ())] < 50


@pytest.mark.skipif(not hasattr(Engine, "cancel"), reason="needs Engine.cancel(request_id) from the engine branch")
def test_a_non_streaming_client_leaving_while_tokens_flow_frees_its_slot(engine, running, monkeypatch):
    """Tokens come every step, never a pause of the disconnect poll's length: the request must still notice its
    client left (within a poll or two), not run on to max_tokens in a slot nobody reads."""
    cancelled = []
    original_cancel, original_step = engine.cancel, engine.step
    monkeypatch.setattr(engine, "cancel", lambda rid: (cancelled.append(rid), original_cancel(rid))[1])
    monkeypatch.setattr(engine, "step", lambda: (original_step(), time.sleep(0.05))[0])  # 60 tokens: 3 s or more
    server = running()
    body = {"prompt": [5, 6, 7], "max_tokens": 60, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    assert server.wait_idle(timeout=30) == IDLE and len(cancelled) == 1
    values = metric_values(server.url)
    assert values[("jkv_requests_total", (("endpoint", "completions"), ("status", "499")))] == 1
    assert values[("jkv_request_finish_total", (("reason", "cancelled"),))] == 1
    assert values[("jkv_generation_tokens_total", ())] < 40


def test_sigterm_drains_running_streams(engine, tokenizer, running):
    prompt = [11, 12, 13, 14]
    ((text, _),) = reference(engine, tokenizer, [prompt], 24)
    server = running(drain_s=30)
    release = blocked(server.worker)  # no token comes before the signal: the whole answer is made while draining
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
            release.set()
            lines = [line for line in response.iter_lines() if line]
    assert sse_text(lines) == text and lines[-1] == "data: [DONE]"
    server.thread.join(30)
    assert not server.thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.post(server.url + "/v1/completions", json={"prompt": "Hi"}, timeout=5)
