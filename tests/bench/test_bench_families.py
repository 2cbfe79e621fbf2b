"""bench/bench_families.py on the CPU (tiny shapes): the HF config read by jkv's loader, jkv's per-layer plan for the
windowed layers, HF's static cache run eagerly, every row of the report and the table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_families

pytest.importorskip("transformers")


@pytest.mark.slow
def test_smoke_run(tmp_path, capsys):
    argv = ["--smoke", "--models", "gemma2-9b", "--batches", "2", "--rounds", "1", "--out", str(tmp_path)]
    report = bench_families.main(argv)
    assert json.loads((tmp_path / "bench_families.json").read_text()) == json.loads(json.dumps(report))
    (row,) = report["rows"]
    assert (row["model"], row["batch"], row["prompt"], row["steps"]) == ("gemma2-9b", 2, 40, 4)
    assert row["jkv"]["cache"] == "PlannedCache"  # the windowed layers on rings
    assert row["hf"]["ms"] > 0 and row["jkv"]["ms"] > 0 and row["jkv"]["speed_vs_hf"]["median"] > 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-1].split()[:2] == ["gemma2-9b", "2"]


def test_a_failed_shape_is_reported_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    real = bench_families.jkv_sampler

    def sampler(config, params, batch, *rest):
        if batch == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 15.50GiB\nmore text")
        return real(config, params, batch, *rest)

    monkeypatch.setattr(bench_families, "jkv_sampler", sampler)
    argv = ["--smoke", "--no-hf", "--models", "mistral-7b", "--batches", "1", "2", "--rounds", "1"]
    report = bench_families.main([*argv, "--out", str(tmp_path)])
    failed, ran = report["rows"]
    assert failed["error"] == "RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 15.50GiB"
    assert "jkv" not in failed and ran["jkv"]["ms"] > 0 and "error" not in ran
    assert json.loads((tmp_path / "bench_families.json").read_text())["rows"][0]["error"] == failed["error"]
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-2].split()[:3] == ["mistral-7b", "1", "failed:"] and table[-1].split()[:2] == ["mistral-7b", "2"]
