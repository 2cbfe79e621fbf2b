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
    rows = load_server.main(["--smoke", "--out", str(out), "--trace-ttft"])
    assert json.loads(out.read_text()) == rows
    assert_every_request_served(rows, 6)  # --smoke: 8 requests of exactly 6 tokens
    printed = capsys.readouterr().out
    assert "server/engine" in printed and "ttft trace at 4" in printed
    for r in rows:  # the trace saw every served request; its stretches add up to each request's TTFT
        if r["mode"] == "server":
            trace = r["ttft_trace"]
            assert (trace["requests"], trace["unmatched"]) == (8, 0), trace
            assert trace["ttft"]["p50_ms"] == pytest.approx(r["ttft_p50_ms"], abs=1e-2)
            stretches = [trace[s]["slowest_tenth_mean_ms"] for s in ("ingress", "engine", "egress")]
            assert min(stretches) >= 0
            assert sum(stretches) == pytest.approx(trace["ttft"]["slowest_tenth_mean_ms"], abs=0.05)


def assert_every_request_served(rows: list[dict], tokens: int) -> None:
    """Both modes at concurrency 1 and 4, each level 8 requests of exactly ``tokens`` tokens, figures in order."""
    assert sorted((r["concurrency"], r["mode"]) for r in rows) == [
        (1, "engine"),
        (1, "server"),
        (4, "engine"),
        (4, "server"),
    ]
    for r in rows:
        assert (r["requests"], r["tokens"]) == (8, 8 * tokens), r
        assert r["tokens_per_s"] > 0 and 0 <= r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert 0 <= r["itl_p50_ms"] <= r["itl_p99_ms"]


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


def test_paced_run_serves_every_request_in_both_modes(tmp_path):
    """--paced: no model, the stand-in engine at a fixed pace; every request of every level is served in full."""
    argv = "--paced 0.2 0.3 --concurrency 1 4 --requests 8 --prompt-len 5 --max-tokens 7 --client-processes 2"
    assert_every_request_served(load_server.main(argv.split()), 7)


def test_paced_engine_cancels_waiting_and_running_requests():
    from bench.paced_engine import PacedEngine
    from jkv.serving import SamplingParams

    engine, seen = PacedEngine(2, hold_s=0, wait_s=0), []
    ids = [engine.submit([1, 2], SamplingParams(max_new_tokens=3), lambda i, t: seen.append(i)) for _ in range(3)]
    engine.step()  # two run, the third waits
    assert (engine.num_active, engine.num_pending, seen) == (2, 1, ids[:2])
    assert engine.cancel(ids[2]) and engine.cancel(ids[0]) and not engine.cancel(12345)
    while engine.has_work():
        engine.step()
    done = {c.id: (c.finish_reason, len(c.tokens)) for c in engine.pop_finished()}
    assert done == {ids[0]: ("cancelled", 1), ids[1]: ("length", 3), ids[2]: ("cancelled", 0)}
