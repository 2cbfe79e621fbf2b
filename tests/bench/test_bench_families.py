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
