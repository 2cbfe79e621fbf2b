"""The engine benchmark (bench/bench_engine.py): its ideal-time arithmetic, and a CPU smoke run of one workload."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_engine


def test_ideal_time_adds_weight_reads_kv_reads_and_prompt_flops():
    config = bench_engine.SMOKE_CONFIG  # L=2, H=64, F=128, N=4, K=2, D=32
    prompts = [[0] * 10, [0] * 6, [0] * 4]
    seconds, parts = bench_engine.ideal_seconds(
        config,
        prompts,
        new_tokens=3,
        slots=2,
        cached=[4, 0, 0],
        weight_bytes=1000,
        kv_bytes_per_token=10,
        bandwidth=100.0,
        flops=1e6,
    )
    # Two rounds of slots, 3 decode steps each: 6 weight reads.
    assert parts["weights_s"] == pytest.approx(6 * 1000 / 100)
    # Each generated token j reads its sequence's prompt plus the j tokens before it.
    assert parts["kv_s"] == pytest.approx(sum(3 * n + 3 for n in (10, 6, 4)) * 10 / 100)
    per_token = 2 * 2 * (64 * 32 * (4 + 2 * 2) + 4 * 32 * 64 + 3 * 64 * 128)
    pairs = (10 * 11 - 4 * 5) // 2 + 6 * 7 // 2 + 4 * 5 // 2  # causal (query, key) pairs of the tokens that run
    assert parts["prompt_s"] == pytest.approx(((6 + 6 + 4) * per_token + 4 * 2 * 4 * 32 * pairs) / 1e6)
    assert seconds == pytest.approx(sum(parts.values()))


def test_smoke_run_of_the_shared_prefix_workload(tmp_path):
    out = tmp_path / "engine.json"
    report = bench_engine.main(["--smoke", "--no-hf", "--only", "shared", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    shared = report["workloads"]["shared"]
    on, off = shared["runs"]["jkv"], shared["runs"]["jkv_no_prefix_cache"]
    assert on["prefix_hits"] > 0 and off["prefix_hits"] == 0 and sum(on["cached_prompt_tokens"]) >= 32
    for run in (on, off):
        assert run["tokens_per_s"] > 0 and run["mean_ttft_s"] > 0 and 0 < run["ideal_fraction"]
        assert run["compile_s_while_timed"] == 0 and run["step_variants"] == 3
    assert shared["prefix_cache_speedup"] > 0 and shared["ideal_s"] > 0
    # 12 requests in 4 slots: 3 waves, the second waiting a third of the ideal time and the third two thirds
    assert shared["slots"] == 4 and shared["waves"] == 3
    assert shared["ttft_waves_s"] == pytest.approx(shared["ideal_s"] / 3)


def test_smoke_run_with_quantized_weights_runs_each_format():
    """``--weights``: a run per format on the same workload, each ideal time counting its own weight bytes (fewer
    bytes, a shorter ideal)."""
    report = bench_engine.main(["--smoke", "--no-hf", "--only", "mixed", "--weights", "bf16", "q8_0", "--slots", "6"])
    assert report["workloads"]["mixed"]["waves"] == 2  # --slots: 12 requests in 6 slots
    runs = report["workloads"]["mixed"]["runs"]
    assert set(runs) == {"jkv", "jkv_q8_0"}
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and run["compile_s_while_timed"] == 0
    assert runs["jkv_q8_0"]["ideal_s"] < runs["jkv"]["ideal_s"] == report["workloads"]["mixed"]["ideal_s"]


def test_smoke_run_of_sampled_requests_compiles_the_samplers_first():
    """``--temperature``: the requests sample; the two sampling programs compile with the steps, before the timed
    run (none compiles while it runs)."""
    report = bench_engine.main(["--smoke", "--no-hf", "--only", "mixed", "--temperature", "0.8", "--top-p", "0.9"])
    run = report["workloads"]["mixed"]["runs"]["jkv"]
    assert run["step_variants"] == 5 and run["compile_s_while_timed"] == 0 and run["tokens_per_s"] > 0


def test_a_failed_run_is_reported_and_the_next_ones_go_on(monkeypatch):
    """A run that raises (on the GPU: out of memory building or stepping its engine) becomes an error entry; the
    workload's other runs and the next workload still run."""
    real, calls = bench_engine.run_jkv, []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("no room for the pool")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_engine, "run_jkv", first_fails)
    report = bench_engine.main(["--smoke", "--no-hf", "--only", "shared", "mixed"])
    shared, mixed = report["workloads"]["shared"]["runs"], report["workloads"]["mixed"]["runs"]
    assert shared["jkv"]["error"] == "MemoryError: no room for the pool"
    assert shared["jkv"]["where"][-1].endswith("first_fails")  # where it failed, innermost last
    assert shared["jkv_no_prefix_cache"]["tokens_per_s"] > 0 and mixed["jkv"]["tokens_per_s"] > 0
    assert "prefix_cache_speedup" not in report["workloads"]["shared"]
