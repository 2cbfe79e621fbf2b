"""bench/bench_int_codes.py's smoke mode: both conversions' products agree and every cell reports its rows."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_int_codes


def test_smoke_run_reports_equal_outputs(tmp_path):
    report = bench_int_codes.main(["--smoke", "--out", str(tmp_path), "--rows", "1", "--formats", "Q8_0", "Q4_K"])
    assert json.loads((tmp_path / "bench_int_codes.json").read_text())["qmatmul"] == report["qmatmul"]
    assert sorted(report["qmatmul"]) == ["1 gate_up Q4_K", "1 gate_up Q8_0", "1 wqkv Q4_K", "1 wqkv Q8_0"]
    for cell, row in report["qmatmul"].items():
        assert row["same_outputs"] and row["rel_err"] < 1e-2, (cell, row)
        assert all(row[k]["us"] > 0 for k in ("bf16", "cvt", "bits")), row
