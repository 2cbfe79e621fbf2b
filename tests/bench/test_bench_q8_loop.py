"""bench/bench_q8_loop.py and bench/decode_ir.py: a smoke run of the loop forms' bench on the CPU (interpret mode:
the JSON report, every form equal to the default's output at its launch) and the CUDA lowerings the IR report
starts from (each form's marks in the TTIR; compiled counts where the ``triton`` package is importable)."""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_q8_loop, decode_ir


def test_smoke_run_reports_each_variant(tmp_path, capsys):
    variants = ["default", "vperm+srot+dsum+exp2", "vperm+srot+dsum+exp2/32/1"]
    report = bench_q8_loop.main(["--smoke", "--shapes", "1x4096", "--variants", *variants, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_q8_loop.json").read_text())["shapes"].keys() == {"1x4096"}
    row = report["shapes"]["1x4096"]
    assert set(row["variants"]) == set(variants) and row["bf16"]["us"] > 0 and row["bf16_triton"]["us"] > 0
    for name, v in row["variants"].items():
        assert v["rel_err"] < 1e-2 and v["us"] > 0, name
    assert row["variants"]["vperm+srot+dsum+exp2/32/1"]["config"][2] == 1  # the launch's warps
    assert "| 1x4096 | default |" in capsys.readouterr().out


def test_paged_forms_run_beside_the_contiguous_ones(tmp_path):
    """``--paged-forms``: the paged Q8 kernel in each form over permuted page pools, checked against the reference
    and against the paged default form (``vperm`` reorders columns only: the same output); unknown forms refused."""
    forms = ["default", "vperm"]
    report = bench_q8_loop.main(
        ["--smoke", "--shapes", "1x4096", "--variants", "default", "--paged-forms", *forms, "--out", str(tmp_path)]
    )
    row = report["shapes"]["1x4096"]["variants"]
    assert set(row) == {"default", "paged:default", "paged:vperm"}
    assert all(row[f"paged:{f}"]["rel_err"] < 1e-2 and row[f"paged:{f}"]["us"] > 0 for f in forms)
    assert row["paged:vperm"]["same_as_default"] is True
    with pytest.raises(SystemExit, match="'nope'"):
        bench_q8_loop.main(["--smoke", "--paged-forms", "nope", "--out", str(tmp_path)])


def test_variant_names_are_checked():
    assert bench_q8_loop.parse_variant("vperm/128/2") == ("vperm", {"block_k": 128, "num_warps": 2})
    assert bench_q8_loop.parse_variant("vperm/64/2*4") == ("vperm", {"block_k": 64, "num_warps": 2, "split_factor": 4})
    with pytest.raises(ValueError, match="not default or parts of"):
        bench_q8_loop.parse_variant("nope/64")
    with pytest.raises(ValueError, match="positive integer"):
        bench_q8_loop.parse_variant("vperm*0")


def test_split_factor_multiplies_the_default_splits_up_to_one_block_each(tmp_path):
    """``*F``: F times ``q8_decode_config``'s splits, never more than the sequence's blocks; the output stays
    within the format's error (the splits merge exactly up to float32 order); paged forms take it too."""
    variants = ["vperm", "vperm*2", "vperm/64/4/3*1000"]
    args = ["--smoke", "--shapes", "16x8192", "--variants", *variants, "--paged-forms", "vperm*3"]
    args += ["--fp8", "default", "*2", "--bf16-splits", "2", "--bf16-paged", "4/4*2"]
    report = bench_q8_loop.main([*args, "--out", str(tmp_path)])
    row = report["shapes"]["16x8192"]["variants"]  # smoke: 2 x 256 keys, 64-key blocks
    base = row["vperm"]["config"][1]
    assert row["vperm*2"]["config"][1] == 2 * base and row["vperm/64/4/3*1000"]["config"][1] == 256 // 64
    assert all(v["rel_err"] < 1e-2 for v in row.values()) and "paged:vperm*3" in row
    assert row["fp8:*2"]["config"][1] == 2 * row["fp8:default"]["config"][1] and row["fp8:default"]["us"] > 0
    assert bench_q8_loop.parse_fp8("64/2*3") == {"block_k": 64, "num_warps": 2, "split_factor": 3}
    with pytest.raises(SystemExit, match="block_k"):
        bench_q8_loop.parse_fp8("64/x")
    assert row["bf16_triton*2"]["config"][1] >= 2 and row["bf16_triton*2"]["us"] > 0
    assert row["bf16_paged:4/4*2"]["rel_err"] < 1e-2 and row["bf16_paged:4/4*2"]["us"] > 0
    assert bench_q8_loop.parse_bf16_paged("4/5*2") == {"pages_per_block": 4, "num_stages": 5, "split_factor": 2}
    with pytest.raises(SystemExit, match="pages_per_block/stages"):
        bench_q8_loop.parse_bf16_paged("4")
    for bad in ("vperm*x", "vperm/0", "nope/4"):
        with pytest.raises(SystemExit, match="form\\[/stages\\]"):
            bench_q8_loop.main(["--smoke", "--paged-forms", bad, "--out", str(tmp_path)])
    assert bench_q8_loop.parse_paged_form("vperm/5*2") == ("vperm", 5, 2)


def test_ir_report_lowers_each_form_for_cuda():
    ttir = {f: decode_ir.lowered("q8", 1, 4096, f)[0] for f in ("default", "vperm", "vperm+srot+dsum+exp2")}
    value_tile = r"tensor<64x32x4xi8"  # the value tile split for its column order (4 warps: 32 lanes, 4 columns)
    assert not re.search(value_tile, ttir["default"]) and re.search(value_tile, ttir["vperm"])
    assert "__nv_expf" in ttir["default"] and "__nv_exp2f" in ttir["vperm+srot+dsum+exp2"]
    bf16, launch = decode_ir.lowered("bf16", 1, 4096)
    assert "tt.dot" in bf16 and launch[0] == 4
    paged, _ = decode_ir.lowered("q8", 2, 256, "vperm", paged_pool=True)
    assert re.search(value_tile, paged)


def test_ir_counts_where_triton_compiles():
    pytest.importorskip("triton")
    ttir, (warps, stages, _) = decode_ir.lowered("q8", 1, 4096, "vperm")
    counts = decode_ir.counts(ttir, warps, stages)
    assert counts["sass_loop"]["HMMA"] > 0 and counts["registers"] > 0
    assert "LDS.8" not in counts["sass_loop"]["widths"]  # no byte-wise shared-memory reads of the value tile
