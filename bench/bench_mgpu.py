"""Decode attention on one Hopper GPU: the Mosaic GPU kernel against the Triton one and torch SDPA, in one run.

Same shapes, inputs and methodology as ``bench/bench_attention.py`` (the helpers of ``bench/common.py``): bf16,
N=32, K=8, D=128, every sequence full; TB/s = K+V bytes (2 * B * K * T * D * 2) / median time per call; JAX calls
chained through their outputs in one jitted program, device spans from a profiler trace; torch in CUDA graphs;
K/V rotated over > 200 MB; every variant checked against the XLA reference before it is timed; a 1 GiB device
copy as the ceiling. Rows:

* ``triton``: ``pallas_kernels.decode.decode_attention``, default launch parameters,
* ``mgpu``: ``pallas_kernels.decode_mgpu.decode_attention_mgpu``, default launch parameters, then ``--sweep``
  configurations (block_k, splits, stages: ``SWEEP``) on the shapes named by ``--sweep-shapes``,
* ``auto``: ``pallas_kernels.dispatch.decode_attention_auto``, the kernel choice ``jkv`` makes for a contiguous
  cache (Mosaic GPU where ``prefer_mgpu`` says so, else Triton),
* ``torch_sdpa``: ``scaled_dot_product_attention`` with its default backend choice (cuDNN on an H100).

``--rounds R`` then times ``auto``, ``triton``, ``mgpu`` and ``torch_sdpa`` again at each shape in R rounds, the
order rotated each round (``common.interleaved``): drift over a run falls on every variant alike, and the
speed ratio against torch is taken per round (its median and range are reported).

Usage: ``python bench/bench_mgpu.py --out DIR [--budget-s 240] [--shapes 1x4096 ...] [--rounds 5]``. Writes
``DIR/bench_mgpu.json`` after every shape; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench import common, torch_peers
from pallas_kernels import backend, decode, decode_mgpu, dispatch, reference

# Sweep points tried beside the default on the swept shapes: "block_k/splits/stages", splits either a multiple of
# the default's ("x2") or enough programs for N per multiprocessor ("sm2": floor(N * SMs / (B * K))).
SWEEP = ("64/x0.5/2", "64/x2/2", "64/x1/3", "64/x0.5/3", "64/x2/3", "64/sm2/2")


def sweep_configs(default: decode_mgpu.MgpuConfig, batch: int, seq: int, points=SWEEP) -> list[decode_mgpu.MgpuConfig]:
    out = []
    for point in points:
        block_k, splits, stages = point.split("/")
        block_k, stages = int(block_k), int(stages)
        if splits.startswith("x"):
            splits = round(default.num_splits * float(splits[1:]))
        elif splits.startswith("sm"):
            splits = int(splits[2:]) * backend.num_multiprocessors() // (batch * common.NUM_KV_HEADS)
        splits = max(1, min(math.ceil(seq / block_k) // 2, int(splits)))
        config = default._replace(block_k=block_k, num_splits=splits, num_stages=stages)
        fits = decode_mgpu._ring_bytes(block_k, common.HEAD_DIM, 2, stages) <= 200_000
        if config != default and config not in out and fits:
            out.append(config)
    return out


def bench_shape(
    torch, batch, seq, *, sweep: bool, points=SWEEP, rounds: int = 0, round_points=(), deadline: float, log
) -> dict:
    nbytes = common.kv_bytes(batch, seq)
    sets, copies, est_s = common.decode_inputs(batch, seq)
    ref = jax.jit(reference.decode_attention_reference)(*sets[0])
    results = {}

    def record(name, fn, config=None):
        try:
            err = common.rel_err(fn(*sets[0]), ref)
            timing = common.time_jax(fn, sets, est_s)
        except Exception as e:  # a variant that does not lower or run is reported, not fatal
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            log(f"  {name:30s} ERROR {results[name]['error'][:1500]}")
            return None
        tbps = nbytes / timing["time_s"] / 1e12
        results[name] = {**timing, "tbps": tbps, "rel_err": err, **({"config": config._asdict()} if config else {})}
        us, compile_s = timing["time_s"] * 1e6, timing["compile_s"]
        log(f"  {name:30s} {us:9.1f} us {tbps:6.3f} TB/s  err {err:.1e}  compile {compile_s:.1f}s")
        return tbps

    default = decode_mgpu.mgpu_config(batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM, jnp.bfloat16)
    record("mgpu", decode_mgpu.decode_attention_mgpu, default)
    record("triton", decode.decode_attention)
    record("auto", dispatch.decode_attention_auto)
    if torch is not None:
        results.update(torch_peers.bench_torch(torch, sets, ref, nbytes, est_s, log, only_default=True))
    best_name = "mgpu" if "tbps" in results["mgpu"] else None
    if sweep and best_name:
        for config in sweep_configs(default, batch, seq, points):
            if time.perf_counter() > deadline:
                log("  (time budget spent: sweep cut short)")
                break
            name = sweep_name(config)
            if (tbps := record(name, sweep_fn(config), config)) is not None and tbps > results[best_name]["tbps"]:
                best_name = name
    if best_name:
        results["mgpu_best"] = {"name": best_name, **results[best_name]}
    shape = {"batch": batch, "seq": seq, "kv_bytes": nbytes, "rotating_copies": copies, "results": results}
    if rounds and torch is not None:
        extra = sweep_configs(default, batch, seq, round_points) if round_points else []
        shape["interleaved"] = interleave(torch, sets, est_s, rounds, log, extra)
    return shape


def sweep_fn(config: decode_mgpu.MgpuConfig):
    """The Mosaic GPU kernel with ``config``'s launch parameters."""
    return lambda q, k, v, n: decode_mgpu.decode_attention_mgpu(q, k, v, n, **config._asdict())


def sweep_name(config: decode_mgpu.MgpuConfig) -> str:
    return "mgpu[bk={},P={},s={}]".format(*config)


def interleave(torch, sets, est_s, rounds, log, extra=()) -> dict:
    """The default dispatch, both kernels, torch SDPA and the ``extra`` Mosaic GPU configurations timed round by
    round (``common.interleaved``)."""
    samplers = {
        "auto": common.jax_sampler(dispatch.decode_attention_auto, sets, est_s),
        "triton": common.jax_sampler(decode.decode_attention, sets, est_s),
        "mgpu": common.jax_sampler(decode_mgpu.decode_attention_mgpu, sets, est_s),
        "torch_sdpa": torch_peers.torch_sampler(
            torch, torch_peers.torch_sdpa(), torch_peers.torch_inputs(torch, sets), est_s
        ),
        **{sweep_name(c): common.jax_sampler(sweep_fn(c), sets, est_s) for c in extra},
    }
    out = common.interleaved(samplers, rounds, baseline="torch_sdpa")
    out["auto"]["breakdown"] = parts = common.kernel_breakdown(dispatch.decode_attention_auto, sets, est_s)
    kernels = ", ".join(f"{name[:40]} {t * 1e6:.1f}" for name, t in parts["kernels_s"].items())
    log(f"  auto per call: span {parts['span_s'] * 1e6:.1f} us = {kernels} + gaps {parts['gaps_s'] * 1e6:.1f} us")
    for name, r in out.items():
        ratio = r["speed_vs_torch_sdpa"]
        log(
            f"  interleaved {name:18s} {r['time_s'] * 1e6:9.1f} us (spread {r['spread_s'] * 1e6:.1f})  vs torch: "
            f"median {ratio['median']:.3f}, range {ratio['min']:.3f}-{ratio['max']:.3f}"
        )
    return out


def table(report: dict) -> str:
    copy = report.get("copy", {}).get("tbps", float("nan"))
    lines = [
        f"us per call (TB/s); copy = {copy:.3f} TB/s (read + write)",
        f"{'B x T':>10} {'triton':>15} {'mgpu':>15} {'auto':>15} "
        f"{'mgpu best':>15} {'torch_sdpa':>15} {'mgpu/torch':>10} {'best/torch':>10} {'auto/torch':>10} "
        f"{'mgpu/triton':>11}  best config",
    ]
    for shape in report["shapes"]:
        r = shape["results"]
        t = lambda name, r=r: r.get(name, {}).get("time_s", float("nan"))
        cell = lambda name, r=r, t=t: f"{t(name) * 1e6:7.1f} ({r.get(name, {}).get('tbps', float('nan')):5.2f})"
        # Ratios are speed ratios: > 1 means the Mosaic GPU kernel is faster.
        lines.append(
            f"{shape['batch']:>4} x {shape['seq']:<5} {cell('triton'):>15} {cell('mgpu'):>15} "
            f"{cell('auto'):>15} {cell('mgpu_best'):>15} {cell('torch_sdpa'):>15} "
            f"{t('torch_sdpa') / t('mgpu'):10.2f} {t('torch_sdpa') / t('mgpu_best'):10.2f} "
            f"{t('torch_sdpa') / t('auto'):10.2f} {t('triton') / t('mgpu'):11.2f}  "
            f"{r.get('mgpu_best', {}).get('name', '-')}"
        )
    if any("interleaved" in shape for shape in report["shapes"]):
        lines += ["", "interleaved rounds: median us (speed vs torch SDPA: median of the per-round ratios, range)"]
        lines.append(f"{'B x T':>10} " + " ".join(f"{n:>26}" for n in ("auto", "triton", "mgpu", "torch_sdpa")))
        for shape in report["shapes"]:
            if "interleaved" not in shape:
                continue
            cells = []
            for name in ("auto", "triton", "mgpu", "torch_sdpa"):
                r = shape["interleaved"][name]
                x = r["speed_vs_torch_sdpa"]
                cells.append(f"{r['time_s'] * 1e6:7.1f} ({x['median']:.3f} {x['min']:.2f}-{x['max']:.2f})")
            lines.append(f"{shape['batch']:>4} x {shape['seq']:<5} " + " ".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--shapes", nargs="*", default=[f"{b}x{t}" for b, t in common.SHAPES])
    parser.add_argument("--sweep-shapes", nargs="*", default=["1x4096", "1x32768", "8x4096"])
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop sweeping after this many seconds")
    parser.add_argument("--sweep", nargs="*", default=list(SWEEP), help="sweep points (see SWEEP)")
    parser.add_argument("--rounds", type=int, default=0, help="then time auto/triton/mgpu/torch interleaved")
    parser.add_argument("--round-points", nargs="*", default=[], help="sweep points added to the interleaved rounds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch, log = torch_peers.load_torch(), common.log
    meta = {**common.meta(torch), "backend": backend.MOSAIC_GPU}
    report = {"meta": meta, "shapes": []}
    log(json.dumps(meta))
    if torch is not None:
        report["copy"] = torch_peers.copy_bandwidth(torch)
        log(f"device copy: {report['copy']['tbps']:.3f} TB/s (read + write)")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    for i, (batch, seq) in enumerate(shapes):
        log(f"B={batch} T={seq}: K+V {common.kv_bytes(batch, seq) / 1e6:.0f} MB")
        swept = lambda b, t: f"{b}x{t}" in args.sweep_shapes
        share = max(1, sum(swept(b, t) for b, t in shapes[i:]))
        deadline = time.perf_counter() + (start + args.budget_s - time.perf_counter()) / share
        report["shapes"].append(
            bench_shape(
                torch,
                batch,
                seq,
                sweep=swept(batch, seq),
                points=args.sweep,
                rounds=args.rounds,
                round_points=args.round_points,
                deadline=deadline,
                log=log,
            )
        )
        (args.out / "bench_mgpu.json").write_text(json.dumps(report, indent=1))
        jax.clear_caches()
    log(f"total {time.perf_counter() - start:.0f} s")
    log(table(report))


if __name__ == "__main__":
    main()
