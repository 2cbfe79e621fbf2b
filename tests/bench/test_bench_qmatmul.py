"""bench/bench_qmatmul.py and bench/qmatmul_ir.py: every launch variant is valid at the 8B shapes it will meet on
the GPU, the layer summary's arithmetic, a smoke run on the CPU (interpret mode: the JSON report, the table last)
and the CUDA lowering the IR report starts from."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from qweight_inputs import planes_like

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_qmatmul, qmatmul_ir
from pallas_kernels import qmatmul_mgpu as qmm
from pallas_kernels import quantized_matmul as qm


@pytest.mark.parametrize("fmt", bench_qmatmul.FORMATS)
@pytest.mark.parametrize("m", bench_qmatmul.ROWS)
def test_variants_are_valid_launches_at_every_8b_shape(fmt, m):
    for n, k in bench_qmatmul.MATRICES.values():
        configs = bench_qmatmul.variants(m, n, k, fmt)
        assert configs["default"] == qm.qmatmul_config(m, n, k, fmt)
        layouts = lambda name: (
            name.endswith(bench_qmatmul.GROUPS_MAJOR),
            bench_qmatmul.INTERLEAVED in name,
            name == bench_qmatmul.DEQUANT,
        )
        keys = {(c, layouts(name)) for name, c in configs.items()}
        assert len(keys) == len(configs)  # no launch timed twice over the same layout
        assert bench_qmatmul.DEQUANT in configs and any(bench_qmatmul.INTERLEAVED in v for v in configs) == (
            m <= 64 and fmt != "Q6_K"
        )
        for config in configs.values():  # raises on a launch the GPU run would reject
            qm.check_config(config, m, n, k, fmt)


@pytest.mark.parametrize("fmt", bench_qmatmul.FORMATS)
@pytest.mark.parametrize("m", bench_qmatmul.ROWS)
def test_mgpu_variants_are_valid_launches_at_every_8b_shape(fmt, m):
    for n, k in bench_qmatmul.MATRICES.values():
        configs = bench_qmatmul.mgpu_variants(m, n, k, fmt)
        assert configs["mgpu"] == qmm.qmatmul_mgpu_config(m, n, k, fmt) and len(set(configs.values())) == len(configs)
        for config in configs.values():
            qmm.check_config(config, fmt, k, 2)  # raises on a launch the GPU run would reject
        assert bench_qmatmul.mgpu_variants(m, n, k, "Q6_K") == {}  # a format the kernel refuses


def mgpu_launches():
    """bench_qmatmul's Mosaic GPU launches, one per (format, block_m, num_stages, whether K is split): the kernel
    differs between the others in sizes only."""
    out = {}
    for fmt in bench_qmatmul.FORMATS:
        for m in bench_qmatmul.ROWS:
            for name, (n, k) in bench_qmatmul.MATRICES.items():
                for config in bench_qmatmul.mgpu_variants(m, n, k, fmt).values():
                    key = (fmt, config.block_m, config.num_stages, config.num_splits > 1)
                    out.setdefault(key, (f"{fmt}_m{m}_{name}_{'_'.join(map(str, config))}", fmt, m, n, k, config))
    return list(out.values())


@pytest.mark.parametrize("fmt,m,n,k,config", [c[1:] for c in mgpu_launches()], ids=[c[0] for c in mgpu_launches()])
def test_mgpu_variants_lower_for_cuda(fmt, m, n, k, config):
    sds = jax.ShapeDtypeStruct
    planes = planes_like(fmt, n, k, sds)
    traced = qmm._qmatmul.trace(sds((m, k), jnp.bfloat16), planes, fmt=fmt, config=config)
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_product_dispatches_by_config_type(monkeypatch):
    monkeypatch.setattr(qmm, "qmatmul_mgpu", lambda x, planes, fmt, config: ("mgpu", config))
    config = qmm.qmatmul_mgpu_config(1, 4096, 4096, "Q8_0")
    assert bench_qmatmul.product("Q8_0", "mgpu", config)(None, ()) == ("mgpu", config)


def test_summary_sums_the_layer_and_projects_the_step():
    row = lambda t: {"time_s": t, "floor_s": t / 2}
    by_matrix = {name: {"Q8_0": {"v": row(1e-5 * (i + 1))}} for i, name in enumerate(bench_qmatmul.LAYER)}
    by_matrix["lm_head"] = {"Q8_0": {"v": row(7e-5)}}
    s = bench_qmatmul.summarize({"1": by_matrix})["1"]["Q8_0"]["v"]
    assert s["layer_s"] == pytest.approx(1e-4) and s["of_floor"] == pytest.approx(0.5)
    assert s["step_8b_s"] == pytest.approx(32e-4 + 7e-5) and s["step_8b_floor_s"] == pytest.approx(16e-4 + 3.5e-5)


def test_smoke_run(tmp_path, capsys):
    report = bench_qmatmul.main(["--smoke", "--formats", "Q8_0", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_qmatmul.json").read_text()) == json.loads(json.dumps(report))
    rows = report["cells"]["1"]["wo"]["Q8_0"]
    assert set(rows) == {"bf16", *bench_qmatmul.SMOKE_VARIANTS}
    for name, r in rows.items():
        assert r["time_s"] > 0 and r["of_floor"] == pytest.approx(r["floor_s"] / r["time_s"])
        if name != "bf16":
            assert r["rel_err"] < 1e-2 and len(r["config"]) == len(qm.QMatmulConfig._fields)
    assert set(report["cells"]["16"]["wo"]["Q8_0"]) == {"bf16", "default", "grouped", "grouped_gm", "dequant"}
    assert report["skipped"] == [] and capsys.readouterr().out.splitlines()[-1].startswith(" 16 wo")


def test_ir_report_lowers_each_variant_for_cuda():
    units = qmatmul_ir.ttir_counts(qmatmul_ir.lowered_ttir("Q4_K", 1, 256, 512, qm.units_config(1, 256, 512, "Q4_K")))
    assert units["rank3_types"] == 0 and units["ops"]["load"] >= 5  # the register path: 2-D tiles only
    fma = qmatmul_ir.ttir_counts(qmatmul_ir.lowered_ttir("Q4_K", 1, 256, 512, qm.fma_config(1, 256, 512, "Q4_K")))
    assert fma["rank3_types"] > 0 and fma["ops"]["reshape"] > 0  # the first small-M path: [R, W/g, g] reshapes
    dp4a = qmatmul_ir.lowered_ttir("Q4_K", 1, 256, 512, qm.dp4a_config(1, 256, 512, "Q4_K"), "dp4a_il")
    assert "@jkv_qmatmul_q4_k" in dp4a  # the product's kernel, not the activations' rounding lowered before it


def test_variants_option_keeps_the_default_and_the_named(tmp_path):
    report = bench_qmatmul.main(
        ["--smoke", "--formats", "Q8_0", "--rows", "1", "--variants", "units", "--out", str(tmp_path)]
    )
    assert set(report["cells"]["1"]["wo"]["Q8_0"]) == {"bf16", "default", "units"}


def test_ncu_launches_skip_what_a_cell_cannot_take(capsys):
    """bench/ncu_qmatmul.py: a launch the cell cannot take (its splits do not divide the K steps) is skipped with
    the reason, and the launches it runs are numbered in the order they go (the profiler's n-th report), each
    checked against the reference (interpret mode here)."""
    from bench import ncu_qmatmul

    variants = "dp4a_il:1/64/128/16/2/1,dp4a_il:1/64/128/7/2/1,default"  # 7 splits do not divide 16 K steps
    ncu_qmatmul.main(["--matrix", "wqkv", "--fmt", "Q4_K", "--rows", "1", "--shape", "64,4096", "--variants", variants])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out if line.startswith("launch")] == ["launch 0", "launch 1"]
    assert any(line.startswith("skipped dp4a_il:1/64/128/7/2/1") and "must divide" in line for line in out)
    errors = [float(line.rsplit(" ", 1)[1]) for line in out if "rel_err" in line]
    assert len(errors) == 2 and max(errors) < 2e-2  # the dp4a launch rounds the activations to int8
