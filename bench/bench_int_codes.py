"""Int8 codes into the tensor cores: plain conversions against bit-level ones (pallas_kernels.int_codes), on the GPU.

Two kernels dequantize every byte they read: the Q8 decode kernel (`pallas_kernels.decode_q8`, issue 22) and the
quantized weight products (`pallas_kernels.quantized_matmul`, issue 26). Each is compiled twice, its codes
converted by `astype` (`cvt`) and by `int_codes` (`bits`), and timed in interleaved rounds in one process beside a
bf16 peer: the bf16 decode kernel the dispatch picks (`dispatch.decode_attention_auto`), and the bf16 product by
XLA. The decode rows print µs, TB/s of the bytes the kernel reads and the time against the bf16 kernel (the issue
asks <= 0.55x at B·T >= 131072); the product rows µs and the fraction of the format's read floor. One cell is
L2-resident (`1x8192` decode: 18 MB read every call), where memory does not bound the kernel and its arithmetic
shows. Both variants' outputs must be equal, and each row's error against an XLA reference is printed.

    python bench/bench_int_codes.py --out $OUT --rounds 5
    JAX_PLATFORMS=cpu python bench/bench_int_codes.py --smoke --out /tmp/ic   # CPU: wiring only, no timing
"""

from __future__ import annotations

import argparse
import json
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
from jkv.caches.formats import quantize
from pallas_kernels import block_formats, decode_q8, dispatch, int_codes, reference
from pallas_kernels import quantized_matmul as qm

DECODE_SHAPES = ("1x131072", "16x8192", "128x2048", "256x1024", "1x4096", "1x8192")
L2_SHAPES = ("1x8192",)  # rotated over one copy only: read from L2
MATRICES = {"wqkv": (6144, 4096), "gate_up": (28672, 4096)}
FORMATS = ("Q8_0", "Q4_K", "Q4_1")


def _sampler(fn, arg_sets, est_s: float, smoke: bool):
    """A sampler of per-call device time over a program compiled here, ahead of time (later cache clears or
    module settings cannot retrace it)."""
    reps = 2 if smoke else common._jax_reps(est_s)
    compiled = common._chained(fn, reps).lower(arg_sets).compile()
    jax.block_until_ready(compiled(arg_sets))
    if smoke:
        return lambda: common._wall(compiled, arg_sets) / reps
    return lambda: float(np.median(common._profile(compiled, arg_sets, 3, "/device:GPU"))) / reps


def decode_cell(text: str, rounds: int, smoke: bool, log) -> dict:
    batch, seq = (int(x) for x in text.split("x"))
    if smoke:
        batch, seq = min(batch, 2), min(seq, 256)
    rotate = 0 if text in L2_SHAPES or smoke else common.ROTATE_BYTES
    sets, _, est = common.decode_inputs(batch, seq, rotate_bytes=rotate)
    q8_sets = [(q, *quantize(k), *quantize(v), n) for q, k, v, n in sets]
    config = decode_q8.q8_decode_config(batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM)
    interpret = True if smoke else None
    options = dict(scale=common.HEAD_DIM**-0.5, config=config, interpret=bool(interpret))

    def q8_call(method):
        def call(q, k, ks, v, vs, n):
            layers = (x[None] for x in (k, ks, v, vs))
            return decode_q8._decode(q, *layers, n, jnp.zeros(1, jnp.int32), **options, convert=method)

        return call

    q8 = {m: q8_call(m) for m in int_codes.METHODS}
    bf16 = lambda q, k, v, n: dispatch.decode_attention_auto(q, k, v, n)
    ref = reference.q8_decode_attention_reference(*q8_sets[0])
    outs = {m: np.asarray(fn(*q8_sets[0]), np.float32) for m, fn in q8.items()}
    row = {
        "same_outputs": bool(np.array_equal(outs["cvt"], outs["bits"])),
        "rel_err": common.rel_err(outs["bits"], ref),
    }
    samplers = {"bf16": _sampler(bf16, sets, est, smoke)}
    samplers |= {f"q8_{m}": _sampler(fn, q8_sets, est * 0.6, smoke) for m, fn in q8.items()}
    timed = common.interleaved(samplers, rounds, baseline="bf16")
    q8_bytes = 2 * batch * common.NUM_KV_HEADS * seq * (common.HEAD_DIM + common.HEAD_DIM // 32 * 2)
    for name, t in timed.items():
        nbytes = common.kv_bytes(batch, seq) if name == "bf16" else q8_bytes
        row[name] = {
            "us": t["time_s"] * 1e6,
            "tbps": nbytes / t["time_s"] / 1e12,
            "vs_bf16": 1 / t["speed_vs_bf16"]["median"],
        }
    row["config"] = list(config)
    log(f"decode {text}: " + ", ".join(f"{k} {v['us']:.1f} us" for k, v in row.items() if isinstance(v, dict)))
    return row


def product_cell(m: int, matrix: str, fmt: str, bandwidth: float, rounds: int, smoke: bool, log) -> dict:
    n, k = MATRICES[matrix]
    if smoke:
        n, k = 256, 512
    key = jax.random.key(m * 7 + len(matrix) + ord(fmt[1]))
    x = jax.random.normal(jax.random.fold_in(key, 9), (m, k), jnp.bfloat16)
    q_bytes = sum(int(np.prod(s)) * d.itemsize for s, d in plane_specs(fmt, n, k))
    copies = 1 if smoke else max(1, -(-common.ROTATE_BYTES // q_bytes))
    q_sets = [(x, *random_planes(jax.random.fold_in(key, c), fmt, n, k)) for c in range(copies)]
    dense = block_formats.dequantize(q_sets[0][1:], fmt, jnp.bfloat16)
    d_sets = [
        (x, dense if c == 0 else dense + 0)
        for c in range(1 if smoke else max(1, -(-common.ROTATE_BYTES // (n * k * 2))))
    ]
    ref = block_formats.qmatmul_reference(x.astype(jnp.float32), q_sets[0][1:], fmt)
    config = qm.qmatmul_config(m, n, k, fmt)
    est = max(q_bytes / 3e12, 1.25e-4)
    samplers, row, outs = {"bf16": _sampler(bf16_fn, d_sets, max(n * k * 2 / 3e12, 1.25e-4), smoke)}, {}, {}
    saved = block_formats.CONVERT
    try:
        for method in int_codes.METHODS:
            block_formats.CONVERT = method
            jax.clear_caches()  # the kernels' traces read the setting
            outs[method] = np.asarray(qm.qmatmul(x, q_sets[0][1:], fmt, config=config), np.float32)
            samplers[method] = _sampler(quantized_fn(fmt, "default", config), q_sets, est, smoke)
    finally:
        block_formats.CONVERT = saved
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, wall clock: wiring only")
    ap.add_argument("--shapes", nargs="*", default=list(DECODE_SHAPES))
    ap.add_argument("--rows", nargs="*", type=int, default=[1, 16], help="M of the weight products")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new cell after this many seconds")
    args = ap.parse_args(argv)
    out, t0 = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
    rounds = 1 if args.smoke else args.rounds
    bandwidth = 1e12 if args.smoke else common.read_bandwidth()["tbps"] * 1e12
    report = {"meta": common.meta(None), "read_tbps": bandwidth / 1e12, "decode": {}, "qmatmul": {}}
    cells = [("decode", s) for s in args.shapes]
    cells += [("qmatmul", (m, mat, fmt)) for m in args.rows for mat in MATRICES for fmt in FORMATS]
    for kind, cell in cells:
        if time.perf_counter() - t0 > args.budget_s:
            log(f"budget reached: {kind} {cell} and later cells not run")
            break
        if kind == "decode":
            report["decode"][cell] = decode_cell(cell, rounds, args.smoke, log)
        else:
            report["qmatmul"][" ".join(map(str, cell))] = product_cell(*cell, bandwidth, rounds, args.smoke, log)
        (out / "bench_int_codes.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\nread stream {report['read_tbps']:.3f} TB/s")
    print("| decode | bf16 us | q8 cvt us (TB/s, x bf16) | q8 bits us (TB/s, x bf16) | same | err |")
    print("|---|---|---|---|---|---|")
    for shape, r in report["decode"].items():
        cells = [f"{r[k]['us']:.1f} ({r[k]['tbps']:.2f}, {r[k]['vs_bf16']:.3f})" for k in ("q8_cvt", "q8_bits")]
        print(f"| {shape} | {r['bf16']['us']:.1f} | {' | '.join(cells)} | {r['same_outputs']} | {r['rel_err']:.1e} |")
    print("| product | bf16 us | cvt us (of floor) | bits us (of floor) | same | err |")
    print("|---|---|---|---|---|---|")
    for cell, r in report["qmatmul"].items():
        cells = [f"{r[k]['us']:.1f} ({r[k]['of_floor']:.2f})" for k in ("cvt", "bits")]
        print(f"| {cell} | {r['bf16']['us']:.1f} | {' | '.join(cells)} | {r['same_outputs']} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
