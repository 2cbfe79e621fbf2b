"""``jkv serve`` wiring: flags reach the engine, the app and uvicorn; bad flags are refused with a message."""

import re

import jax
import jax.numpy as jnp
import pytest
from helpers_loading import byte_level_alphabet

import jkv.loading
import jkv.server
from jkv import cli
from jkv.loading import tokenizer as tok_lib
from jkv.loading.common import LoadedModel
from jkv.models import llama


@pytest.fixture
def served(monkeypatch):
    """Load a tiny random model whatever the path; record the app and the server instead of compiling and serving."""
    tok = tok_lib.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": [*byte_level_alphabet(), "<|im_start|>", "<|im_end|>"],
            "tokenizer.ggml.merges": [],
            "tokenizer.ggml.token_type": [1] * 256 + [3, 3],
            "tokenizer.ggml.eos_token_id": 257,
        }
    )
    config = llama.LlamaConfig(258, 32, 64, 1, 2, 1, 16, max_position=100)
    params = llama.init_params(config, jax.random.key(0), jnp.float32)
    seen = {}

    def load(path, dtype, **formats):
        seen["load"] = formats
        return LoadedModel(config, params, tok, path, 0.0)

    monkeypatch.setattr(jkv.loading, "load", load)
    monkeypatch.setattr(jkv.server, "warm_up", lambda engine: seen.setdefault("warmed", engine))

    class Server:
        def __init__(self, app, host, port, drain_s):
            seen.update(app=app, host=host, port=port, drain_s=drain_s)

        def run(self):
            seen["ran"] = True

    monkeypatch.setattr(jkv.server, "make_server", Server)
    return seen


def test_flags_reach_engine_app_and_server(served):
    argv = ["serve", "--model", "/models/tiny.gguf", "--port", "9123", "--num-slots", "3", "--max-len", "40"]
    argv += [
        "--num-pages",
        "7",
        "--cache",
        "paged",
        "--max-waiting",
        "5",
        "--drain-s",
        "2.5",
        "--served-model-name",
        "tiny-1",
    ]
    assert cli.main(argv) == 0
    engine, app = served["warmed"], served["app"]
    assert (engine.num_slots, engine.spec.max_len) == (3, 48)  # paged: rounded up to whole pages
    assert engine.cache.num_pages == engine.scheduler.pages.num_pages == 7
    assert app.state.worker.engine is engine and app.state.worker.capacity == 3 + 5
    assert app.state.options.model_name == "tiny-1"
    assert served["load"] == {"weights": "dequantize", "quantize": None, "weight_layout": "rows"}
    assert (served["host"], served["port"], served["drain_s"], served["ran"]) == ("127.0.0.1", 9123, 2.5, True)


def test_bad_flags_are_refused(served, capsys):
    assert cli.main(["serve", "--model", "m.gguf", "--max-len", "101"]) == 2
    assert "exceeds the model's context length 100" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "m.gguf", "--prefix-cache-mb", "-1"]) == 2
    assert "--prefix-cache-mb must be >= 0" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "m.gguf", "--cache", "f32", "--num-pages", "9"]) == 2
    assert "num_pages=9 sizes a paged cache's pool; cache='f32' is not paged" in capsys.readouterr().err
    assert "app" not in served


def test_weight_formats_and_step_budget_reach_the_loader_and_engine(served):
    argv = ["serve", "--model", "/models/tiny", "--weights", "native", "--quantize", "q8_0", "--weight-layout", "dp4a"]
    assert cli.main([*argv, "--max-batch-tokens", "24", "--num-slots", "2"]) == 0
    assert served["load"] == {"weights": "native", "quantize": "q8_0", "weight_layout": "dp4a"}
    assert served["warmed"].options.max_batch_tokens == 24


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--port", "99999", r"must be a TCP port in \[0, 65535\], got 99999"),
        ("--drain-s", "nan", "must be a finite number of seconds >= 0, got nan"),
        ("--drain-s", "-5", "must be a finite number of seconds >= 0, got -5"),
        ("--max-waiting", "-1", "must be an integer >= 0, got -1"),
        ("--port", "80x", "invalid TCP port in \\[0, 65535\\] value: '80x'"),
        ("--num-slots", "two", "invalid positive integer value: 'two'"),
    ],
    ids=["port", "drain-nan", "drain-negative", "max-waiting", "port-not-a-number", "slots-not-a-number"],
)
def test_server_flags_out_of_range_are_refused_before_the_model_loads(served, capsys, flag, value, message):
    """A port past 65535 served on its low 16 bits (uvicorn said it listened on the one given); a NaN drain failed
    only at shutdown; a negative --max-waiting was refused after the model loaded."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", "m.gguf", flag, value])
    assert exit_info.value.code == 2 and re.search(f"argument {flag}: {message}", capsys.readouterr().err)
    assert "load" not in served
