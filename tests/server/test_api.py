"""The server through the official ``openai`` client: completions and chat, whole and streamed, equal the engine
driven in-process; the error bodies of invalid requests; the models list and health."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from helpers_server import IDLE, MAX_LEN

from jkv.serving import SamplingParams


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def engine_answer(engine, tokenizer, prompt_ids, max_tokens):
    """The reference: the same greedy request run by the engine in-process (no server running)."""
    params = SamplingParams(max_new_tokens=max_tokens, stop_tokens=tokenizer.stop_ids)
    engine.submit(prompt_ids, params)
    (done,) = engine.run(show_progress=False)
    reason = {"max_len": "length"}.get(done.finish_reason, done.finish_reason)
    return tokenizer.decode(done.tokens, skip_special=True), len(done.tokens), reason


def test_completion_and_chat_equal_the_engine(engine, tokenizer, running):
    text_prompt = "The capital of France is"
    messages = [{"role": "user", "content": "Schreib über Äpfel 🍎 und Bären"}]
    chat_ids = tokenizer.encode(tokenizer.render_chat(messages))
    rng = np.random.default_rng(11)
    id_prompt = rng.integers(0, tokenizer.vocab_size, size=9).tolist()
    want = {
        "text": engine_answer(engine, tokenizer, tokenizer.encode(text_prompt), 12),
        "ids": engine_answer(engine, tokenizer, id_prompt, 12),
        "chat": engine_answer(engine, tokenizer, chat_ids, 10),
    }
    server = running()
    api = client(server)
    for name, prompt in (("text", text_prompt), ("ids", id_prompt)):
        text, count, reason = want[name]
        got = api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert (got.choices[0].text, got.usage.completion_tokens, got.choices[0].finish_reason) == want[name]
        assert got.usage.prompt_tokens == len(prompt if name == "ids" else tokenizer.encode(text_prompt))
        stream = api.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count
        assert all(c.usage is None for c in chunks[:-1])

    text, count, reason = want["chat"]
    got = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    message = got.choices[0].message
    assert (message.role, message.content, got.usage.completion_tokens) == ("assistant", text, count)
    assert got.choices[0].finish_reason == reason and got.usage.prompt_tokens == len(chat_ids)
    stream = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason and chunks[-1].usage is None
    assert server.wait_idle() == IDLE


def test_stop_strings_cut_the_text_and_end_the_request(engine, tokenizer, running):
    prompt = "Once upon a time"
    full, _, _ = engine_answer(engine, tokenizer, tokenizer.encode(prompt), 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3, f"the reference answer {full!r} is too short to cut"
    server = running()
    api = client(server)
    got = api.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00"])
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]
    assert server.wait_idle() == IDLE


def test_sampling_is_reproducible_by_seed(running):
    api = client(running())
    kw = dict(model="tiny", prompt="Hello", max_tokens=4, temperature=0.9, top_p=0.95, extra_body={"top_k": 40})
    # Sent together: they share the engine's steps (a sampled step sorts every slot's logits, slow on a CPU).
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda s: api.completions.create(seed=s, **kw).choices[0].text, (1, 2, 1)))
    assert texts[0] == texts[2] != texts[1]


BAD = [
    ("n", dict(n=2)),
    ("temperature", dict(temperature=-0.5)),
    ("top_p", dict(top_p=0)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=MAX_LEN + 1)),  # prompt + max_tokens past the context
    ("seed", dict(seed=2**40)),
    ("stop", dict(stop=[""])),
    ("logprobs", dict(logprobs=2)),
    ("prompt", dict(prompt="word " * MAX_LEN)),  # longer than the context
    ("prompt", dict(prompt=[5, 10**7])),  # a token id outside the vocabulary
    ("prompt", dict(prompt=["one", "two"])),  # batches are not served
]


@pytest.mark.parametrize("field,change", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_invalid_completion_requests_get_400_naming_the_field(running, field, change):
    server = running()
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4} | change
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error" and error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(**body)
    assert info.value.body["param"] == field


def test_invalid_chat_requests_get_400_naming_the_field(running):
    server = running()
    cases = [
        ("messages", {"messages": []}),
        ("messages[0].role", {"messages": [{"role": "robot", "content": "hi"}]}),
        ("messages", {"messages": [{"role": "user", "content": "word " * MAX_LEN}]}),
        ("max_completion_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}),
    ]
    for field, body in cases:
        response = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny"} | body, timeout=30)
        assert response.status_code == 400, (field, response.text)
        assert response.json()["error"]["param"] == field
    broken = httpx.post(
        server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"


def test_models_and_health(running):
    server = running()
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_an_engine_failure_answers_500_and_health_turns_503(engine, running, monkeypatch):
    server = running()

    def broken():
        raise FloatingPointError("planted failure")

    monkeypatch.setattr(engine, "step", broken)
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert response.status_code == 500 and "planted failure" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 503
    again = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert again.status_code == 503


def test_prompts_never_end_with_eos_whatever_the_model_asks(engine, tokenizer):
    """A model whose GGUF sets ``tokenizer.ggml.add_eos_token``: its tokenizer appends EOS, a prompt to continue
    (a completion's text, a chat) does not."""
    import copy

    from helpers_server import Running

    from jkv.server import ServerOptions

    eos_adding = copy.copy(tokenizer)
    eos_adding.add_eos = True
    text, messages = "The capital of France is", [{"role": "user", "content": "Hi"}]
    want = tokenizer.encode(text, add_eos=False)
    assert eos_adding.encode(text) == [*want, tokenizer.eos_id]
    server = Running(engine, eos_adding, ServerOptions(model_name="tiny", max_waiting=8))
    try:
        api = client(server)
        got = api.completions.create(model="tiny", prompt=text, max_tokens=1, temperature=0)
        assert got.usage.prompt_tokens == len(want)
        got = api.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0)
        assert got.usage.prompt_tokens == len(tokenizer.encode(tokenizer.render_chat(messages), add_eos=False))
    finally:
        server.stop()
