"""bench/bench_qweights.py: its random quantized models (formats, bytes a step reads) and a smoke run on the CPU
(tiny shapes: every section of the JSON report, the table last)."""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_qweights, qweights_breakdown
from jkv.models import llama, quant
from pallas_kernels import qmatmul_act


def test_random_quantized_models_read_fewer_bytes():
    config = bench_qweights.SMOKE_CONFIG
    dense = llama.init_params(config, jax.random.key(0), jnp.bfloat16, layout="layers")
    q8, q4 = (bench_qweights.random_quantized(dense, c, seed) for seed, c in enumerate(("q8_0", "q4_k")))
    assert q4.layers[0].wqkv.format == "Q4_K" and q4.embed.format == q8.layers[0].w_down.format == "Q8_0"
    llama.check_params(q4, config)
    matrices = ("wqkv", "wo", "w_gate_up", "w_down")
    layer_bytes = lambda p: sum(getattr(p.layers[0], name).nbytes for name in matrices)
    assert layer_bytes(q8) == pytest.approx(layer_bytes(dense) * 8.5 / 16)
    assert layer_bytes(q4) == pytest.approx(layer_bytes(dense) * 4.625 / 16)
    values = quant.dequantize_params(q4).layers[0].wqkv
    assert bool(jnp.isfinite(values).all()) and 0.001 < float(jnp.std(values.astype(jnp.float32))) < 1.0


@pytest.mark.slow
def test_smoke_run(tmp_path, capsys):
    report = bench_qweights.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_qweights.json").read_text()) == json.loads(json.dumps(report))
    rows = report["decode"]["2"]
    dp4a = {
        f"{name}_dp4a{tail}"
        for name in ("q8_0", "q4_k")
        for tail in ("", "_actx", "_normk", "_rule2x", "_steps2", "_plainnorm", "_middeq")
    }
    assert set(rows) == {"bf16", "q8_0", "q4_k"} | dp4a
    assert rows["q4_k"]["weight_bytes"] < rows["q8_0"]["weight_bytes"] < rows["bf16"]["weight_bytes"]
    assert rows["q4_k_dp4a"]["weight_bytes"] == rows["q4_k"]["weight_bytes"]  # the same bytes, laid out anew
    for row in rows.values():
        # a CPU's wall-clock difference of two programs may come out negative: only the arithmetic is checked
        assert row["floor_s"] > 0 and row["of_floor"] == pytest.approx(row["floor_s"] / row["time_s"])
    (run,) = report["prefill"]["runs"]
    assert run["tokens"] == 8 and set(run["rows"]) == {
        "bf16",
        "q8_0",
        "q4_k",
        "q8_0_kernel",
        "q4_k_kernel",
        "q8_0_xla",
        "q4_k_xla",
        "q8_0_expand",
        "q4_k_expand",
        "q8_0_deqk",
        "q4_k_deqk",
    }
    assert math.isfinite(run["rows"]["q4_k_xla"]["tokens_per_s"])
    assert report["agreement"]["rows"]["bf16"] == {"token_agreement": 1.0, "prompts_equal": 1.0}
    assert capsys.readouterr().out.splitlines()[-1].startswith("agreement q4_k_dp4a")


def test_breakdown_run_names_every_variant_and_restores_the_launch_rule(tmp_path):
    """``--breakdown`` profiles each model and each quantized one on the register path and in the dp4a layout (on a
    CPU no kernel is traced: the spans are 0; two of them run here, CI time), writes its JSON, and leaves
    ``qmatmul_config`` as it found it."""
    from pallas_kernels import quantized_matmul as qm

    rule, handover = qm.qmatmul_config, quant.DEQUANT_MIN_ROWS
    dp4a = {
        f"{name}_dp4a{tail}"
        for name in ("q8_0", "q4_k")
        for tail in ("", "_actx", "_normk", "_rule2x", "_steps2", "_plainnorm", "_middeq")
    }
    models = dict.fromkeys(bench_qweights.VARIANTS)
    every = {"bf16", "q8_0", "q4_k", "q8_0_units", "q4_k_units"} | dp4a
    names = [name for name, _, _ in qweights_breakdown.breakdown_runs(models)]
    assert len(names) == len(every) and set(names) == every
    ran = ["q4_k_units", "q8_0_dp4a_rule2x"]  # a launch rule and a row setting, each put back after
    report = bench_qweights.main(["--smoke", "--breakdown", "--decode-rows", ",".join(ran), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_qweights_breakdown.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["breakdown"]) == set(ran)
    assert qm.qmatmul_config is rule and qmatmul_act.ROUNDING == "auto"
    paths = lambda: (qm.qmatmul_config(1, 64, 256, "Q8_0").path, qm.qmatmul_config(64, 64, 256, "Q8_0").path)
    with bench_qweights.launch_rule("units"):
        assert paths() == ("units", "dot")
    with bench_qweights.launch_rule("expand"):
        assert paths() == ("dot", "dot_expand") and quant.DEQUANT_MIN_ROWS > 2**40
    with bench_qweights.launch_rule("kernel"):  # the Triton kernel at prefill sizes too
        assert paths() == ("dot", "dot") and quant.DEQUANT_MIN_ROWS > 2**40
    assert quant.DEQUANT_MIN_ROWS == handover
    with pytest.raises(ValueError, match="'gemv'"), bench_qweights.launch_rule("gemv"):
        pass
    assert qm.qmatmul_config is rule


def test_sections_run_alone_and_bad_sections_are_refused(tmp_path):
    report = bench_qweights.main(["--smoke", "--sections", "prefill", "--out", str(tmp_path)])
    assert report["decode"] == {} and report["agreement"]["rows"] == {}
    assert {"q8_0_expand", "q8_0_deqk"} <= set(report["prefill"]["runs"][0]["rows"])
    assert json.loads((tmp_path / "bench_qweights.json").read_text()) == json.loads(json.dumps(report))
    with pytest.raises(SystemExit, match="'decode,speed'"):
        bench_qweights.main(["--smoke", "--sections", "decode,speed", "--out", str(tmp_path)])


def test_launch_kinds_counts_a_step_by_kind():
    calls = {"jkv_qmatmul_q4_k": 32.0, "jkv_qmatmul_q4_k__2": 32.0, "loop_multiply_fusion_128": 64.0,
             "input_reduce_fusion_64": 32.0, "input_add_reduce_fusion_61": 31.0, "memcpy": 1.0}  # fmt: skip
    assert qweights_breakdown.launch_kinds(calls) == {
        "jkv_qmatmul_q4_k": 64.0, "xla_input": 63.0, "xla_loop": 64.0, "other": 1.0
    }  # fmt: skip


def test_fusion_line_finds_an_instruction_by_its_profiled_name():
    hlo = """ENTRY %main {
  %fusion.3 = f32[4]{0} fusion(f32[4]{0} %p), kind=kLoop, calls=%fused
  ROOT %input_add_reduce_fusion_61 = f32[2,16]{1,0} fusion(%a, %b), kind=kInput, calls=%x
}"""
    assert qweights_breakdown.fusion_line(hlo, "input_add_reduce_fusion_61").startswith(
        "input_add_reduce_fusion_61 = f32[2,16]"
    )
    assert qweights_breakdown.fusion_line(hlo, "fusion") == "" and qweights_breakdown.fusion_line(hlo, "fusion.3") != ""
    assert qweights_breakdown.fusion_line(hlo, "fusion_3").startswith("fusion.3 = ")  # the profiler's spelling


def test_mgpu_rows_only_where_mosaic_gpu_runs(monkeypatch):
    from pallas_kernels import backend

    models = {"bf16": 0, "q8_0": 1}
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: False)
    assert bench_qweights.with_mgpu_rows(models) == models
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    assert bench_qweights.with_mgpu_rows(models) == {"bf16": 0, "q8_0": 1, "q8_0_mgpu": 1}
    assert bench_qweights.options_of("q8_0_mgpu").weights_impl == "mgpu"
    assert bench_qweights.options_of("q8_0") == llama.DEFAULT_OPTIONS
