"""bench/load_server.py's smoke mode: both modes serve every request of every level in full, and the table prints
the server's share of the engine's tokens/s."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import load_server


def test_smoke_run_serves_every_request_in_both_modes(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = load_server.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert sorted((r["concurrency"], r["mode"]) for r in rows) == [
        (1, "engine"),
        (1, "server"),
        (4, "engine"),
        (4, "server"),
    ]
    for r in rows:
        assert (r["requests"], r["tokens"]) == (8, 8 * 6), r  # --smoke: 8 requests of exactly 6 tokens
        assert r["tokens_per_s"] > 0 and 0 <= r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert 0 <= r["itl_p50_ms"] <= r["itl_p99_ms"]
    assert "server/engine" in capsys.readouterr().out


def test_the_id_tokenizer_round_trips():
    tok = load_server.IdTokenizer(100)
    assert tok.encode(tok.decode([3, 99, 0])) == [3, 99, 0]


def test_every_shape_choice_names_a_preset():
    """Each real --shape builds its preset config (a misnamed preset once failed the GPU run before any request)."""
    for shape in ("smollm2-135m", "llama3-8b", "qwen2-0.5b"):
        assert load_server.shape_config(shape).num_layers > 0, shape


def test_a_failing_client_process_fails_the_level():
    """Clients that cannot reach the server fail the level with their error, not hang or count nothing."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    with pytest.raises(RuntimeError, match="a client process failed: Connect"):
        load_server.drive(f"http://127.0.0.1:{port}", [[1, 2]] * 4, 2, 2, 2)
