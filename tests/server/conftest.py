"""The server's test bench: a tiny random-weight Llama with SmolLM2's tokenizer, one paged engine shared by the
module's tests (its steps compile once), and ``running(...)``: the app on 127.0.0.1 on a free port, in a thread."""

import contextlib

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("openai")

from helpers_loading import needs_smollm, smollm_path
from helpers_server import MAX_LEN, NUM_SLOTS, Running

from jkv.models import llama
from jkv.server import ServerOptions
from jkv.serving import Engine, SamplingParams


@pytest.fixture(scope="session")
def tokenizer():
    if smollm_path() is None:
        pytest.skip(needs_smollm.kwargs["reason"])
    from jkv.loading import gguf, tokenizer

    return tokenizer.from_gguf_metadata(gguf.open_gguf(smollm_path()).metadata)


@pytest.fixture(scope="session")
def config(tokenizer):
    return llama.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position=MAX_LEN,
    )


@pytest.fixture(scope="session")
def params(config):
    # A larger init scale gives peaked next-token distributions: greedy ties are then far from rounding.
    return llama.init_params(config, jax.random.key(3), jnp.float32, scale=0.2)


@pytest.fixture(scope="session")
def engine(params, config):
    """The engine every test's server runs on (one at a time); warm, and idle between tests. One step shape (a
    bucket of MAX_LEN tokens): the warm-up compiles the only step."""
    engine = Engine(
        params, config, num_slots=NUM_SLOTS, max_len=MAX_LEN, cache="paged", buckets=(MAX_LEN,), verbose=False
    )
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3), show_progress=False)
    return engine


@pytest.fixture
def running(engine, tokenizer):
    """``running(**ServerOptions fields)`` starts a server over the shared engine; stopped after the test."""
    servers = []

    def start(drain_s: float = 10.0, **fields):
        fields.setdefault("max_waiting", 64 - NUM_SLOTS)
        servers.append(Running(engine, tokenizer, ServerOptions(model_name="tiny", **fields), drain_s))
        return servers[-1]

    yield start
    for server in servers:
        with contextlib.suppress(RuntimeError):
            server.stop()
