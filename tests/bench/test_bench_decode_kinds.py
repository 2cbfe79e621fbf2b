"""bench/bench_decode_kinds.py on the CPU: its shape specs and byte counts, and a smoke run (a tiny ragged batch,
one round: the Triton kernels in interpret mode checked against the XLA references, the Mosaic GPU rows and every
kernel's GPU path lowered for CUDA, the JSON written, the table last)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_decode_kinds, decode_kinds, preflight
from pallas_kernels import checks


@pytest.mark.parametrize("text", decode_kinds.SHAPE_NAMES)
def test_shape_set_parses(text):
    shape = decode_kinds.parse_shape(text)
    assert shape.name == text and shape.seq % 64 == 0
    n, kh, d = shape.heads
    assert n % kh == 0 and checks.takes_head_dim(d, chunked=True)  # every kind's decode kernel takes it


def test_ragged_lengths_are_the_same_every_run_and_in_range():
    first, again = (decode_kinds.parse_shape("32xr256-16384") for _ in range(2))
    assert first.lengths == again.lengths and len(first.lengths) == 32
    assert 256 <= min(first.lengths) and max(first.lengths) <= 16384 and len(set(first.lengths)) > 16
    assert first.seq == -(-max(first.lengths) // 64) * 64


@pytest.mark.parametrize("text", ["4096", "1x", "2x64:8/3", "2xr9-3", "0xr0-5"])
def test_bad_shape_names_the_text(text):
    with pytest.raises(ValueError, match=text):
        decode_kinds.parse_shape(text)


def test_bytes_count_the_lengths_and_the_format():
    full = decode_kinds.parse_shape("2x128:4/2/64")
    assert decode_kinds.kv_bytes(full, "bf16") == 2 * 2 * 2 * 128 * 64 * 2
    assert decode_kinds.kv_bytes(full, "q8") == 2 * 2 * 2 * 128 * (64 + 64 // 32 * 2)
    assert decode_kinds.kv_bytes(full, "fp8") == 2 * 2 * 2 * 128 * (64 + 4)  # e4m3 values, a float32 scale
    ragged = decode_kinds.parse_shape("3xr16-100:4/2/64")
    assert decode_kinds.kv_bytes(ragged, "bf16") == 2 * sum(ragged.lengths) * 2 * 64 * 2


def test_smoke_run(tmp_path, capsys):
    mgpu = ["jkv_mgpu", "paged_mgpu", "q8_mgpu", "fp8_mgpu"]
    rows = ["jkv_triton", *mgpu[:3], "q8paged_triton", "fp8_triton", mgpu[3], "jax_xla"]  # both lowerings
    shape = "32xr256-16384:16/2/64"  # group 8: head_dim 64 takes no other in Mosaic GPU
    argv = ["--smoke", "--rounds", "1", "--shapes", shape, "--rows", *rows, "--out", str(tmp_path)]
    report = bench_decode_kinds.main(argv)
    saved = json.loads((tmp_path / "bench_decode_kinds.json").read_text())
    assert saved == json.loads(json.dumps(report))
    (shape,) = saved["shapes"]
    assert shape["lengths"] and shape["heads"] == [16, 2, 64] and saved["runs"][0]["read"]["tbps"] > 0
    results = shape["results"]
    assert list(results) == rows
    for name in ("jkv_triton", "q8paged_triton", "fp8_triton", "jax_xla"):
        r = results[name]
        assert "error" not in r, (name, r)
        assert r["rel_err"] < decode_kinds.TOL and r["time_s"] > 0 and np.isfinite(r["tbps"])
    for name in ("jkv_triton", "q8paged_triton", "fp8_triton"):
        assert "triton" in results[name]["gpu_lowering"]["kernels"], name
    for name in mgpu:
        assert "error" not in results[name] and "mosaic_gpu" in results[name]["kernels"], results[name]
    assert shape["baseline"] == "jkv_triton" and results["jkv_triton"]["speed_vs_baseline"]["median"] == 1.0
    out = capsys.readouterr().out.strip().splitlines()  # the table comes last: speed rows, then notes
    assert out[-5].startswith("speed vs torch_cudnn") and out[-3].strip().startswith("3xr16-128:16/2/64*")
    assert out[-2].startswith("*: torch cuDNN not timed") and out[-1].startswith("ragged shapes: torch rows")


def test_launch_rows_fix_the_launch_and_keep_the_rest(monkeypatch):
    """A ``--launches`` row is its base row with the launch given (``-``: the default), checked and timed as the
    others; the kernel sees exactly those overrides."""
    shape = decode_kinds.parse_shape("2x128:4/2/64")
    seen = []
    monkeypatch.setattr(decode_kinds.decode_q8, "q8_decode_attention", lambda *a, **kw: seen.append(kw))
    specs = ["jkv_triton@32,2,-,2", "q8_triton@-,4,8,-", "q8paged_triton@4,2,-,-", "paged_triton@2,-,-,-,fused"]
    rows = decode_kinds.launch_rows(specs, shape, smoke=True)
    assert list(rows) == specs
    bf16, q8, q8paged, paged = rows.values()
    assert bf16.layout == "bf16" and q8.layout == "q8" and q8.fmt == "q8" and q8paged.layout == "q8_paged"
    assert bf16.fn.keywords == {"block_k": 32, "num_splits": 2, "num_stages": 2}
    assert q8paged.fn.keywords == {"pages_per_block": 4, "num_splits": 2}
    assert paged.fn.keywords == {"pages_per_block": 2, "fused_merge": True}
    sets, _, _ = decode_kinds.shape_inputs(shape, 0, {"q8_paged", "paged"})
    for row in (q8paged, paged):  # each paged row's kernel takes its launch by these names
        assert np.all(np.isfinite(np.asarray(row.fn(*sets[row.layout][0], interpret=True))))
    q8.fn()
    assert seen == [{"num_splits": 4, "num_warps": 8}]


@pytest.mark.parametrize(
    "spec",
    [
        "jkv_auto@32,2,4,3",
        "jkv_triton@32,2,4",
        "jkv_triton@32,0,4,3",
        "jkv_triton@x,2,4,3",
        "jkv_triton",
        "q8_triton@-,-,-,-,merged",
        "jkv_triton@-,-,-,-,merged",
    ],
)
def test_bad_launch_specs_name_the_spec(spec):
    with pytest.raises(ValueError, match="expected ROW@BLOCK,SPLITS,WARPS,STAGES"):
        decode_kinds.parse_launch(spec)
    with pytest.raises(SystemExit):
        bench_decode_kinds.main(["--smoke", "--launches", spec])


def test_preflight_reports_each_row_from_a_child():
    """The child's report per row: a kernel that cannot run here and a name that is no row, each with its reason."""
    verdicts = preflight.preflight(["jkv_mgpu", "nope"], shapes=("2xr16-128:130/2/64", "2xr16-128:16/2/64"))
    # 130/2/64 is skipped (65 query heads per kv head: the kernel refuses it), 16/2/64 is tried and cannot run here
    assert "16/2/64" in verdicts["jkv_mgpu"] and "cannot run here" in verdicts["jkv_mgpu"]
    assert "no row 'nope'" in verdicts["nope"]


def test_preflight_gives_up_the_rows_of_a_hung_child():
    """A child that reports nothing in time: its rows are given up with the reason, not retried."""
    verdicts = preflight.preflight(["jkv_triton", "paged_triton"], timeout_s=0.5)
    assert verdicts == dict.fromkeys(
        ("jkv_triton", "paged_triton"), "the child ran past 0.5 s (rows jkv_triton, paged_triton)"
    )


CRASHING_CHILD = """#!/bin/sh
shift 2
rows=""
for a in "$@"; do [ "$a" = "--shapes" ] && break; rows="$rows $a"; done
case "$rows" in *boom*) echo "Segmentation fault" >&2; exit 139;; esac
for r in $rows; do echo "{\\"row\\": \\"$r\\", \\"error\\": null}"; done
"""


def test_preflight_pins_a_crash_on_its_row(tmp_path, monkeypatch):
    """A child that dies before it reports: each row again alone, so only the crashing one fails (a stand-in for
    the interpreter that crashes whenever it is given the row ``boom``)."""
    child = tmp_path / "python"
    child.write_text(CRASHING_CHILD)
    child.chmod(0o755)
    monkeypatch.setattr(preflight.sys, "executable", str(child))
    verdicts = preflight.preflight(["a", "boom", "b"])
    assert verdicts["a"] is None and verdicts["b"] is None
    assert verdicts["boom"].startswith("the child exited with 139: Segmentation fault")
