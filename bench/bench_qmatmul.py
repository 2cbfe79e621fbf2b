"""Block-quantized matmul kernels alone (issue 26): ``pallas_kernels.qmatmul`` at a Llama-3-8B layer's matrices,
Q8_0 and Q4_K, each of several launch variants (``QMatmulConfig``: the small-M path ``fma`` / ``units`` / ``dot`` /
``dp4a``, tiles, warps, stages, split-K) against bf16 ``x @ W.T`` (XLA) and each one's weight-read floor, in one
run; where Mosaic GPU runs (Hopper), also the launches of ``pallas_kernels.qmatmul_mgpu`` that take the cell
(``mgpu*``).

Each cell (rows ``M``, matrix, format) times every variant and bf16 in ``--rounds`` interleaved rounds
(``bench.common.interleaved``, per-call device spans of chained programs read from profiler traces:
``common.jax_sampler``); a call's output feeds the next call's input through a row sum (a true dependency, read
by bf16 alike). Weights rotate over copies exceeding 4x the L2 cache. ``floor_s`` = the matrix's bytes (planes
or bf16) over the read bandwidth measured in the same run (``common.read_bandwidth``; a torch device copy beside
it where torch sees the GPU); ``of_floor`` = floor / time; ``rel_err`` against the f32 product of the same x and
the unrounded weights (the dot paths round the dequantized tile to bf16: about 2e-3). ``layer`` sums the four
block matrices per variant and ``step_8b`` projects a batch-``M`` step of the 32-layer model's matrices (+ the LM
head), beside the issue's targets (<= 2.3 ms Q8_0, <= 1.5 ms Q4_K at M = 1).

Cells run M = 1 first; past ``--deadline-s`` the rest are skipped (listed), and the JSON is rewritten after every
cell, so a run stopped by a time limit still reports what it timed. Usage: ``python bench/bench_qmatmul.py
--out DIR [--rounds 3] [--rows 1,16,64] [--matrices wqkv,wo] [--variants a,b]``; ``--smoke``: tiny shapes in
interpret mode on any backend (wall clock). Writes ``DIR/bench_qmatmul.json``, a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, torch_peers
from pallas_kernels import backend, block_formats, qmatmul_configs, qmatmul_dp4a, qmatmul_grouped
from pallas_kernels import common as kcommon
from pallas_kernels import qmatmul_mgpu as qmm
from pallas_kernels import quantized_matmul as qm
from pallas_kernels.qmatmul_mgpu import QMatmulMgpuConfig
from pallas_kernels.quantized_matmul import QMatmulConfig

FORMATS = ("Q8_0", "Q4_K")
ROWS = (1, 16, 64)
MATRICES = {  # name: (N, K) of x [M, K] @ W.T, a Llama-3-8B layer's matrices and the LM head
    "wqkv": (6144, 4096),
    "wo": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
LAYER = ("wqkv", "wo", "gate_up", "down")
LAYERS_8B = 32
TARGETS_8B_M1 = {"Q8_0": 2.3e-3, "Q4_K": 1.5e-3}
SMOKE_MATRICES = {"wo": (64, 256)}
SMOKE_ROWS = (1, 16)
SMOKE_VARIANTS = ("default", "units", "grouped", "grouped_gm", "dp4a", "dequant")  # one of each path: compiles are slow


def plane_specs(fmt: str, n: int, k: int) -> list[tuple[tuple[int, int], np.dtype]]:
    return [
        (s, p.dtype)
        for s, p in zip(block_formats.plane_shapes(fmt, n, k), block_formats.FORMATS[fmt].planes, strict=True)
    ]


def _fit(m, n, k, fmt, bm, bn, bk, warps, stages, path, splits=None) -> QMatmulConfig:
    """A launch clamped to the shape (block_n <= N, block_k dividing K / parts) with the default split rule."""
    spec = block_formats.FORMATS[fmt]
    kp = k // spec.parts
    bk = max(spec.max_group, min(bk, 1 << (kp & -kp).bit_length() - 1))
    bn = min(bn, kcommon.pow2_floor(n))
    splits = qm.default_splits(m, n, kp // bk, bm, bn) if splits is None else splits
    return QMatmulConfig(bm, bn, bk, splits, warps, stages, path)


def variants(m: int, n: int, k: int, fmt: str) -> dict[str, QMatmulConfig]:
    """The launch variants timed at this cell: the default, then candidates (docs/quant.md, "Speed")."""
    out = {"default": qm.qmatmul_config(m, n, k, fmt)}
    f = lambda *a, **kw: _fit(m, n, k, fmt, *a, **kw)
    if m <= qm.FMA_ROWS:
        bm = min(8, 1 << (m - 1).bit_length())
        out["units"] = qm.units_config(m, n, k, fmt)
        out["dot16_expand"] = f(16, 64, 128, 4, 3, "dot_expand")
        out["grouped"] = f(16, 64, 128, 4, 3, "grouped")
        out["grouped_bn128"] = f(16, 128, 128, 4, 3, "grouped")
        out["grouped_gm"] = out["grouped"]  # the same launch over groups-major per-group planes
        out["grouped_bn128_gm"] = out["grouped_bn128"]
        out |= dp4a_variants(m, n, k, fmt)
    else:
        bm = out["default"].block_m
        out["dot_bn64"] = f(bm, 64, 128, 4, 3, "dot")
        out["expand"] = out["default"]._replace(path="dot_expand")
        out["expand_bn64"] = out["dot_bn64"]._replace(path="dot_expand")
        out |= mid_dot_variants(m, n, k, fmt, out["default"])
        if m <= qm.SMALL_DOT_ROWS:  # per-group products scale [bm, bn] accumulators: a small-M formulation
            out["grouped"] = out["default"]._replace(path="grouped")
            out["grouped_gm"] = out["grouped"]
        if m <= 64:  # the interleaved integer-dot launches over 8-row blocks (the weights re-read per block)
            out |= {v: c for v, c in dp4a_variants(m, n, k, fmt).items() if INTERLEAVED in v}
    out[DEQUANT] = out["default"]  # the dp4a layout's larger products: the matrix dequantized, one XLA dot
    firsts = {}
    for name, config in out.items():  # a candidate equal to the default (or an earlier one) is timed once
        firsts.setdefault((config, name.endswith(GROUPS_MAJOR), INTERLEAVED in name, name == DEQUANT), name)
    return {name: config for (config, *_), name in firsts.items()}


def mid_dot_variants(m: int, n: int, k: int, fmt: str, default: QMatmulConfig) -> dict[str, QMatmulConfig]:
    """The dot path's launches at more than ``FMA_ROWS`` rows (decode at 17-127 sequences, where the row layout's
    kernel ran at 0.16-0.39 of its read floor on an H100): deeper K steps (fewer loop trips and barriers per byte),
    more stages, more warps, wider or narrower column blocks, twice the splits."""
    bm, bn, bk, w, st = default.block_m, default.block_n, default.block_k, default.num_warps, default.num_stages
    steps = k // block_formats.FORMATS[fmt].parts // bk
    f = lambda *a, **kw: _fit(m, n, k, fmt, *a, **kw)
    return {
        "dot_s4": default._replace(num_stages=st + 1),
        "dot_s2": default._replace(num_stages=2),  # less shared memory: two programs a multiprocessor
        "dot_w8": default._replace(num_warps=8),
        "dot_bk2x": f(bm, bn, 2 * bk, w, st, "dot"),
        "dot_bk2x_s2": f(bm, bn, 2 * bk, w, 2, "dot"),
        "dot_bn2x_w8": f(bm, 2 * bn, bk, 8, st, "dot"),
        "dot_bnhalf": f(bm, max(16, bn // 2), bk, w, st, "dot"),  # smaller programs: more of them a multiprocessor
        # one stage: no ring, so less shared memory and, at 64 rows of the K-quants on sm_90, three (64 columns, 168
        # registers), four (32, 110) or seven (16, 72) programs a multiprocessor where two fit now (docs/BENCHMARKS.md,
        # "The K-quants' launch at 64 rows from its two stages")
        "dot_s1": default._replace(num_stages=1),
        "dot_bnhalf_s1": f(bm, max(16, bn // 2), bk, w, 1, "dot"),
        "dot_bnquarter_s1": f(bm, max(16, bn // 4), bk, w, 1, "dot"),
        "dot_split2x": default._replace(num_splits=qmatmul_configs.splits_times(steps, default.num_splits, 2)),
        # the rule before Q8_0's 128-column steps in two stages (64 columns, 3 stages)
        "dot_prev": f(bm, bn, 64, w, 3, "dot") if fmt == "Q8_0" else default,
    }


def dp4a_variants(m: int, n: int, k: int, fmt: str) -> dict[str, QMatmulConfig]:
    """The integer-dot path's launches (``"dp4a"``, under trial): its rule, each step's weight reads issued a step
    ahead (stages 2), 64 / 256 rows a program, 128-deep K steps (fewer registers), twice the K splits."""
    base = qm.dp4a_config(m, n, k, fmt)
    split2x = qm.dp4a_config(m, n, k, fmt, split_factor=2)
    out = {
        "dp4a": base,
        "dp4a_prefetch": base._replace(num_stages=2),
        "dp4a_bn64": qm.dp4a_config(m, n, k, fmt, block_n=64),
        "dp4a_bn256": qm.dp4a_config(m, n, k, fmt, block_n=256),
        "dp4a_bk128": _fit(m, n, k, fmt, base.block_m, base.block_n, 128, base.num_warps, 1, "dp4a"),
    }
    if split2x != base:
        out["dp4a_split2x"] = split2x
    if qmatmul_dp4a.WORDS[fmt] == 4:  # coalesced windows (qmatmul_dp4a.interleave): the rule, twice the splits
        out["dp4a_il"] = base
        if "dp4a_split2x" in out:
            out["dp4a_il_split2x"] = out["dp4a_split2x"]
        if m > 1:  # the splits of the one-row rule (programs a multiprocessor, steps a program) at more rows
            out["dp4a_il_prog"] = qm.dp4a_config(m, n, k, fmt, programs_rule=True)
            out["dp4a_il_bk128"] = out["dp4a_bk128"]
    return out


def mgpu_variants(m: int, n: int, k: int, fmt: str) -> dict[str, QMatmulMgpuConfig]:
    """The Mosaic GPU kernel's launches timed at this cell: its default, four ring slots, no K split (those that
    fit; none where the kernel does not take the format or shape)."""
    if qmm.unsupported_reason(fmt, n, k, jnp.bfloat16) is not None:
        return {}
    base = qmm.qmatmul_mgpu_config(m, n, k, fmt)
    out = {"mgpu": base, "mgpu_s4": base._replace(num_stages=4), "mgpu_nosplit": base._replace(num_splits=1)}
    fits = lambda c: qmm.smem_bytes(fmt, c.block_m, c.num_stages) <= qmm.smem_budget()
    firsts = {}
    for name, config in out.items():
        if fits(config):
            firsts.setdefault(config, name)
    return {name: config for config, name in firsts.items()}


def random_planes(key, fmt: str, n: int, k: int) -> tuple:
    """Planes of a random matrix drawn on the device (values about N(0, 0.02) in scale; the time does not depend
    on them)."""
    out = []
    for i, ((shape, dtype), plane) in enumerate(
        zip(plane_specs(fmt, n, k), block_formats.FORMATS[fmt].planes, strict=True)
    ):
        sub = jax.random.fold_in(key, i)
        if dtype == np.float16:
            out.append((3e-4 * jax.random.normal(sub, shape, jnp.float32)).astype(jnp.float16))
        else:
            lo, hi = (-127, 128) if dtype == np.int8 else (0, 64 if plane.name.startswith("sub") else 256)
            out.append(jax.random.randint(sub, shape, lo, hi, jnp.int32).astype(dtype))
    return tuple(out)


def _chain(y, x):
    """The next call's input from this call's ``[M, N]`` output: a row sum read by every variant alike."""
    return (x.astype(jnp.float32) + 1e-6 * jnp.sum(y, axis=1, keepdims=True)).astype(x.dtype)


GROUPS_MAJOR = "_gm"  # a variant named with this suffix reads its per-group planes groups-major
INTERLEAVED = "_il"  # a dp4a variant named with this reads words laid out by qmatmul_dp4a.interleave
DEQUANT = "dequant"  # this variant is block_formats.qmatmul_reference: the matrix dequantized, then one XLA dot


def product(fmt: str, name: str, config):
    """``(x, planes) -> [M, N]`` float32 of variant ``name``: through the kernel ``config`` launches (Triton's or
    Mosaic GPU's), its planes as :func:`layout` gives them."""
    if name == DEQUANT:
        return lambda x, planes: block_formats.qmatmul_reference(x, planes, fmt)
    if isinstance(config, QMatmulMgpuConfig):
        return lambda x, planes: qmm.qmatmul_mgpu(x, planes, fmt, config=config)
    if name.endswith(GROUPS_MAJOR):
        return lambda x, planes: qm.qmatmul_groups_major(x, planes, fmt, config=config)
    if qm.config_path(config) == "dp4a":
        tiled = INTERLEAVED in name
        return lambda x, planes: qm.qmatmul_words(x, planes, fmt, config=config, interleaved=tiled)
    return lambda x, planes: qm.qmatmul(x, planes, fmt, config=config)


def layout(fmt: str, name: str, planes: tuple, config=None) -> tuple:
    """``planes`` in the layout variant ``name`` reads (a transposed copy, or the dp4a path's int32 words, made
    before timing)."""
    if isinstance(config, QMatmulConfig) and qm.config_path(config) == "dp4a":
        words = jax.jit(qmatmul_dp4a.weight_words, static_argnums=1)(planes, fmt)
        return jax.jit(qmatmul_dp4a.interleave, static_argnums=1)(words, fmt) if INTERLEAVED in name else words
    return qmatmul_grouped.to_groups_major(planes, fmt) if name.endswith(GROUPS_MAJOR) else planes


def quantized_fn(fmt: str, name: str, config):
    call = product(fmt, name, config)
    return lambda x, *planes: _chain(call(x, planes), x)


def bf16_fn(x, w):
    y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return _chain(y, x)


def _wall_sampler(fn, arg_sets, est_s: float):
    """A smoke run's sampler: the wall clock of one jitted call (no profiler off a GPU)."""
    run = jax.jit(fn)
    jax.block_until_ready(run(*arg_sets[0]))

    def sample():
        t0 = time.perf_counter()
        jax.block_until_ready(run(*arg_sets[0]))
        return time.perf_counter() - t0

    return sample


def bench_cell(
    m: int, name: str, fmt: str, shape, bandwidth: float, rounds: int, smoke: bool, only: set | None = None
) -> dict:
    n, k = shape
    key = jax.random.key(zlib.crc32(f"{m} {name} {fmt}".encode()))
    q_bytes, d_bytes = sum(math.prod(s) * d.itemsize for s, d in plane_specs(fmt, n, k)), n * k * 2
    copies = 1 if smoke else max(1, math.ceil(common.ROTATE_BYTES / q_bytes))
    x = jax.random.normal(jax.random.fold_in(key, 99), (m, k), jnp.bfloat16)
    q_sets = [(x, *random_planes(jax.random.fold_in(key, c), fmt, n, k)) for c in range(copies)]
    d_copies = 1 if smoke else max(1, math.ceil(common.ROTATE_BYTES / d_bytes))
    dense = block_formats.dequantize(q_sets[0][1:], fmt, jnp.bfloat16)
    d_sets = [(x, dense if c == 0 else dense + 0) for c in range(d_copies)]  # distinct buffers
    ref = block_formats.qmatmul_reference(x.astype(jnp.float32), q_sets[0][1:], fmt)  # the weights unrounded
    sampler = _wall_sampler if smoke else common.jax_sampler
    est = lambda nbytes: max(nbytes / 3e12, 1.25e-4)  # at most 16 calls per timed program: compile time
    configs = variants(m, n, k, fmt)
    if smoke:
        configs = {v: c for v, c in configs.items() if v in SMOKE_VARIANTS}
    elif backend.mosaic_gpu_usable():
        configs |= mgpu_variants(m, n, k, fmt)
    if only:  # the default stays: every row's reference point beside bf16
        configs = {v: c for v, c in configs.items() if v in only or v == "default"}
    samplers, rows, checked = {"bf16": sampler(bf16_fn, d_sets, est(d_bytes))}, {}, {}
    for vname, config in configs.items():
        t0 = time.perf_counter()
        try:
            sets = [(x, *layout(fmt, vname, tuple(planes), config)) for _, *planes in q_sets]
            err = common.rel_err(product(fmt, vname, config)(x, sets[0][1:]), ref)
            samplers[vname] = sampler(quantized_fn(fmt, vname, config), sets, est(q_bytes))
            checked[vname] = {"config": list(config), "rel_err": err, "setup_s": time.perf_counter() - t0}
        except Exception as e:  # a variant that fails to compile or run is reported, the others still timed
            rows[vname] = {"config": list(config), "error": f"{type(e).__name__}: {str(e)[:400]}"}
    for vname, row in common.interleaved(samplers, rounds, baseline="bf16").items():
        nbytes = d_bytes if vname == "bf16" else q_bytes
        row.update(bytes=nbytes, floor_s=nbytes / bandwidth, of_floor=nbytes / bandwidth / row["time_s"])
        rows[vname] = row | checked.get(vname, {})
    del q_sets, d_sets, dense
    return rows


def summarize(cells: dict) -> dict:
    """Per M, format and variant: the layer's four matrices summed, and a projected 8B step (32 layers + head)."""
    out = {}
    for m_key, by_matrix in cells.items():
        for fmt in FORMATS:
            names = set.intersection(*(set(by_matrix.get(mat, {}).get(fmt, {})) for mat in LAYER))
            for v in sorted(names):
                rows = [by_matrix[mat][fmt][v] for mat in LAYER]
                if any("time_s" not in r for r in rows):
                    continue
                layer = sum(r["time_s"] for r in rows)
                floor = sum(r["floor_s"] for r in rows)
                entry = {"layer_s": layer, "layer_floor_s": floor, "of_floor": floor / layer}
                head = by_matrix.get("lm_head", {}).get(fmt, {}).get(v, {})
                if "time_s" in head:
                    entry["step_8b_s"] = LAYERS_8B * layer + head["time_s"]
                    entry["step_8b_floor_s"] = LAYERS_8B * floor + head["floor_s"]
                out.setdefault(m_key, {}).setdefault(fmt, {})[v] = entry
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--matrices", default=",".join(MATRICES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--variants", default="", help="time only these variants (and the default); all if empty")
    parser.add_argument("--deadline-s", type=float, default=520.0, help="skip the cells left after this long")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode: a check of this script")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    torch = None if args.smoke else torch_peers.load_torch()
    copy = torch_peers.copy_bandwidth(torch) if torch is not None else None
    if args.smoke:
        read, bandwidth, shapes, row_list = None, 3e12, SMOKE_MATRICES, SMOKE_ROWS
    else:
        read = common.read_bandwidth()
        bandwidth, shapes, row_list = read["tbps"] * 1e12, MATRICES, tuple(int(r) for r in args.rows.split(","))
    shapes = {name: s for name, s in shapes.items() if args.smoke or name in args.matrices.split(",")}
    only = {v for v in args.variants.split(",") if v}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": common.meta(torch) | {"smoke": args.smoke, "rounds": args.rounds},
        "bandwidth": {"bytes_per_s": bandwidth, "read": read, "copy": copy},
        "cells": {},
        "skipped": [],
    }
    for m in row_list:
        for name, shape in shapes.items():
            for fmt in args.formats.split(","):
                if time.perf_counter() - t_start > args.deadline_s:
                    report["skipped"].append(f"M={m} {name} {fmt}")
                    continue
                rounds = 2 if args.smoke else args.rounds
                rows = bench_cell(m, name, fmt, shape, bandwidth, rounds, args.smoke, only)
                report["cells"].setdefault(str(m), {}).setdefault(name, {})[fmt] = rows
                best = min((r["time_s"], v) for v, r in rows.items() if v != "bf16" and "time_s" in r)
                common.log(
                    f"M={m:<3d} {name:8s} {fmt}: bf16 {rows['bf16']['time_s'] * 1e6:8.1f} us, default "
                    f"{rows['default'].get('time_s', math.nan) * 1e6:8.1f} us, best {best[1]} {best[0] * 1e6:.1f} us"
                )
                report["summary"] = summarize(report["cells"])
                (out / "bench_qmatmul.json").write_text(json.dumps(report, indent=1))
    report["summary"] = summarize(report["cells"])
    (out / "bench_qmatmul.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    return report


def print_table(report: dict) -> None:
    bw = report["bandwidth"]["bytes_per_s"]
    common.log(f"read bandwidth {bw / 1e12:.2f} TB/s; skipped {len(report['skipped'])} cells")
    common.log(f"{'M':>3} {'matrix':8} {'fmt':5} {'variant':20} {'us':>9} {'floor':>8} {'of_fl':>6} {'vs bf16':>7} err")
    for m, by_matrix in report["cells"].items():
        for name, by_fmt in by_matrix.items():
            for fmt, rows in by_fmt.items():
                for v, r in rows.items():
                    if "time_s" not in r:
                        common.log(f"{m:>3} {name:8} {fmt:5} {v:20} ERROR {r.get('error', '')[:90]}")
                        continue
                    speed = r["speed_vs_bf16"]["median"]
                    err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
                    common.log(
                        f"{m:>3} {name:8} {fmt:5} {v:20} {r['time_s'] * 1e6:9.1f} {r['floor_s'] * 1e6:8.1f} "
                        f"{r['of_floor']:6.2f} {speed:7.2f} {err}"
                    )
    for m, by_fmt in report["summary"].items():
        for fmt, by_variant in by_fmt.items():
            target = TARGETS_8B_M1.get(fmt) if m == "1" else None
            for v, s in sorted(by_variant.items(), key=lambda kv: kv[1]["layer_s"]):
                step = (
                    f" 8B step {s['step_8b_s'] * 1e3:.3f} ms (floor {s['step_8b_floor_s'] * 1e3:.3f})"
                    if ("step_8b_s" in s)
                    else ""
                )
                goal = f" target {target * 1e3:.1f} ms" if target and step else ""
                common.log(
                    f"layer M={m} {fmt} {v:20} {s['layer_s'] * 1e6:9.1f} us ({s['of_floor']:.2f} of floor){step}{goal}"
                )


if __name__ == "__main__":
    main()
