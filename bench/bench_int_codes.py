"""Weight codes into the tensor cores: plain conversions against bit-level ones (pallas_kernels.int_codes).

The quantized weight products (`pallas_kernels.quantized_matmul`, issue 26) dequantize every byte they read. Each
product is compiled twice, its tiles' codes converted by `astype` (`cvt`) and by `int_codes` (`bits`:
`block_formats.CONVERT` for Q8_0, `NIBBLE_CONVERT` for the 4-bit formats), and timed in interleaved rounds in one
process beside the bf16 product by XLA, at the given M for two Llama-3-8B matrices; rows print µs and the fraction
of the format's read floor (bytes over a read stream measured in the same run). Both variants' outputs must be
equal; each row's error against the reference is printed. (The Q8 attention kernels were measured the same way at
9358f17, whose version of this script has their rows: docs/BENCHMARKS.md.)

    python bench/bench_int_codes.py --out $OUT --rounds 3
    JAX_PLATFORMS=cpu python bench/bench_int_codes.py --smoke --out /tmp/ic   # CPU: wiring only, no timing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench.bench_qmatmul import bf16_fn, plane_specs, quantized_fn, random_planes
from pallas_kernels import block_formats, int_codes
from pallas_kernels import quantized_matmul as qm

MATRICES = {"wqkv": (6144, 4096), "gate_up": (28672, 4096)}
FORMATS = ("Q8_0", "Q4_K", "Q4_1")  # Q8_0: block_formats.CONVERT; the 4-bit formats: block_formats.NIBBLE_CONVERT


def setting_of(fmt: str) -> str:
    """The ``block_formats`` setting that says how ``fmt``'s codes become floats in the tiles."""
    return "CONVERT" if fmt == "Q8_0" else "NIBBLE_CONVERT"


def _sampler(fn, arg_sets, est_s: float, smoke: bool):
    """A sampler of per-call device time over a program compiled here, ahead of time (later cache clears or
    module settings cannot retrace it)."""
    reps = 2 if smoke else common._jax_reps(est_s)
    compiled = common._chained(fn, reps).lower(arg_sets).compile()
    jax.block_until_ready(compiled(arg_sets))
    if smoke:
        return lambda: common._wall(compiled, arg_sets) / reps
    return lambda: float(np.median(common._profile(compiled, arg_sets, 3, "/device:GPU"))) / reps


def product_cell(m: int, matrix: str, fmt: str, bandwidth: float, rounds: int, smoke: bool, log) -> dict:
    n, k = MATRICES[matrix]
    if smoke:
        n, k = 256, 512
    key = jax.random.key(m * 7 + len(matrix) + ord(fmt[1]))
    x = jax.random.normal(jax.random.fold_in(key, 9), (m, k), jnp.bfloat16)
    q_bytes = sum(int(np.prod(s)) * d.itemsize for s, d in plane_specs(fmt, n, k))
    copies = 1 if smoke else max(1, math.ceil(common.ROTATE_BYTES / q_bytes))
    q_sets = [(x, *random_planes(jax.random.fold_in(key, c), fmt, n, k)) for c in range(copies)]
    dense = block_formats.dequantize(q_sets[0][1:], fmt, jnp.bfloat16)
    d_sets = [
        (x, dense if c == 0 else dense + 0)
        for c in range(1 if smoke else max(1, math.ceil(common.ROTATE_BYTES / (n * k * 2))))
    ]
    ref = block_formats.qmatmul_reference(x.astype(jnp.float32), q_sets[0][1:], fmt)
    config = qm.qmatmul_config(m, n, k, fmt)
    est = max(q_bytes / 3e12, 1.25e-4)
    samplers, row, outs = {"bf16": _sampler(bf16_fn, d_sets, max(n * k * 2 / 3e12, 1.25e-4), smoke)}, {}, {}
    setting = setting_of(fmt)
    saved = getattr(block_formats, setting)
    try:
        for method in int_codes.METHODS:
            setattr(block_formats, setting, method)
            jax.clear_caches()  # the kernels' traces read the setting
            outs[method] = np.asarray(qm.qmatmul(x, q_sets[0][1:], fmt, config=config), np.float32)
            samplers[method] = _sampler(quantized_fn(fmt, "default", config), q_sets, est, smoke)
    finally:
        setattr(block_formats, setting, saved)
        jax.clear_caches()
    row |= {
        "same_outputs": bool(np.array_equal(outs["cvt"], outs["bits"])),
        "rel_err": common.rel_err(outs["bits"], ref),
    }
    for name, t in common.interleaved(samplers, rounds, baseline="bf16").items():
        nbytes = n * k * 2 if name == "bf16" else q_bytes
        row[name] = {"us": t["time_s"] * 1e6, "of_floor": nbytes / bandwidth / t["time_s"]}
    row["config"] = list(config)
    log(
        f"qmatmul M={m} {matrix} {fmt}: "
        + ", ".join(f"{k} {v['us']:.1f} us" for k, v in row.items() if isinstance(v, dict))
    )
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, wall clock: wiring only")
    ap.add_argument("--rows", nargs="*", type=int, default=[1, 16], help="M of the weight products")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), help="weight formats (default all)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new cell after this many seconds")
    args = ap.parse_args(argv)
    out, t0 = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
    rounds = 1 if args.smoke else args.rounds
    bandwidth = 1e12 if args.smoke else common.read_bandwidth()["tbps"] * 1e12
    report = {"meta": common.meta(None), "read_tbps": bandwidth / 1e12, "qmatmul": {}}
    for cell in [(m, mat, fmt) for m in args.rows for mat in MATRICES for fmt in args.formats]:
        if time.perf_counter() - t0 > args.budget_s:
            log(f"budget reached: {cell} and later cells not run")
            break
        report["qmatmul"][" ".join(map(str, cell))] = product_cell(*cell, bandwidth, rounds, args.smoke, log)
        (out / "bench_int_codes.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\nread stream {report['read_tbps']:.3f} TB/s")
    print("| product | bf16 us | cvt us (of floor) | bits us (of floor) | same | err |")
    print("|---|---|---|---|---|---|")
    for cell, r in report["qmatmul"].items():
        cells = [f"{r[k]['us']:.1f} ({r[k]['of_floor']:.2f})" for k in ("cvt", "bits")]
        print(f"| {cell} | {r['bf16']['us']:.1f} | {' | '.join(cells)} | {r['same_outputs']} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
