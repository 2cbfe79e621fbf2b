"""Decode attention on one Hopper GPU: the Mosaic GPU kernel against the Triton one and torch SDPA, in one run.

Same shapes, inputs and methodology as ``scripts/bench_attention.py`` (whose timing helpers it imports): bf16,
N=32, K=8, D=128, every sequence full; TB/s = K+V bytes (2 * B * K * T * D * 2) / median time per call; JAX calls
chained through their outputs in one jitted program, device spans from a profiler trace; torch in CUDA graphs;
K/V rotated over > 200 MB; every variant checked against the XLA reference before it is timed; a 1 GiB device
copy as the ceiling. Rows:

* ``triton``: ``pallas_kernels.decode_attention`` (the default dispatch), default launch parameters,
* ``mgpu``: ``pallas_kernels.decode_attention_mgpu``, default launch parameters, then ``--sweep`` configurations
  (block_k, splits, stages, early K refill: ``SWEEP``) on the shapes named by ``--sweep-shapes``,
* ``triton_pm``, ``mgpu_pm``: the same two kernels with their split partials merged by one Pallas kernel
  (``merge="pallas"``, ``pallas_kernels.decode_attention.merge_partials``) instead of XLA's fusions,
* ``auto``: ``pallas_kernels.decode_attention_mgpu.decode_attention_auto``, the kernel choice ``jkv`` makes for
  a contiguous cache (Mosaic GPU where ``prefer_mgpu`` says so, else Triton),
* ``torch_sdpa``: ``scaled_dot_product_attention`` with its default backend choice (cuDNN on an H100).

``--rounds R`` then times ``auto``, ``triton``, ``mgpu`` and ``torch_sdpa`` again at each shape in R rounds, the
order rotated each round (``bench_attention.interleaved``): drift over a run falls on every variant alike, and the
speed ratio against torch is taken per round (its median and range are reported).

Usage: ``python scripts/bench_mgpu.py --out DIR [--budget-s 240] [--shapes 1x4096 ...] [--rounds 5]``. Writes
``DIR/bench_mgpu.json`` after every shape; prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_attention as ba
import jax
import jax.numpy as jnp

from pallas_kernels import backend
from pallas_kernels import decode_attention as triton_kernel
from pallas_kernels import decode_attention_mgpu as mgpu

# Sweep points tried beside the default on the swept shapes: "block_k/splits/stages[/early|/late]", splits either
# a multiple of the default's ("x2") or enough programs for N per multiprocessor ("sm2": floor(N * SMs / (B * K)));
# "early" / "late": K slots refilled before the V wait or with the V slots (MgpuConfig.early_k), else the default's.
SWEEP = ("64/x0.5/2", "64/x2/2", "64/x1/3", "64/x0.5/3", "64/x2/3", "64/sm2/2", "64/x1/2/late", "64/x1/2/early")


def with_default(module, name: str, value, fn):
    """``fn`` with ``module.name`` (a default the kernels read when they trace, e.g. ``SPLIT_MERGE``) set to
    ``value`` for every call it makes, traced ones included."""

    def call(*args, **kwargs):
        before = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(module, name, before)

    return call


def pallas_merge(fn):
    """``fn`` with the split partials merged by the Pallas kernel (``merge="pallas"``)."""
    return with_default(triton_kernel, "SPLIT_MERGE", "pallas", fn)


def with_early_k(fn, early: bool):
    """``fn`` with the Mosaic GPU kernel's default ``early_k`` set to ``early``."""
    return with_default(mgpu, "EARLY_K", early, fn)


def sweep_configs(default: mgpu.MgpuConfig, batch: int, seq: int, points=SWEEP) -> list[mgpu.MgpuConfig]:
    out = []
    for point in points:
        block_k, splits, stages, *flags = point.split("/")
        block_k, stages = int(block_k), int(stages)
        if splits.startswith("x"):
            splits = round(default.num_splits * float(splits[1:]))
        elif splits.startswith("sm"):
            splits = int(splits[2:]) * backend.num_multiprocessors() // (batch * ba.NUM_KV_HEADS)
        splits = max(1, min(math.ceil(seq / block_k) // 2, int(splits)))
        config = default._replace(
            block_k=block_k,
            num_splits=splits,
            num_stages=stages,
            early_k=default.early_k if not flags else flags == ["early"],
        )
        if config != default and config not in out and mgpu._ring_bytes(block_k, ba.HEAD_DIM, 2, stages) <= 200_000:
            out.append(config)
    return out


def bench_shape(
    torch, batch, seq, *, sweep: bool, points=SWEEP, rounds: int = 0, round_points=(), deadline: float, log
) -> dict:
    key = jax.random.key(batch * 100003 + seq)
    nbytes = ba.kv_bytes(batch, seq)
    copies = max(1, math.ceil(ba.ROTATE_BYTES / nbytes))
    est_s = nbytes / 2.5e12 + 5e-6
    lengths = jnp.full((batch,), seq, jnp.int32)
    sets = []
    for i in range(copies):
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, i), 3)
        q = jax.random.normal(kq, (batch, ba.NUM_Q_HEADS, ba.HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(kk, (batch, ba.NUM_KV_HEADS, seq, ba.HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(kv, (batch, ba.NUM_KV_HEADS, seq, ba.HEAD_DIM), jnp.bfloat16)
        sets.append((q, k, v, lengths))
    ref = jax.jit(triton_kernel.decode_attention_reference)(*sets[0])
    results = {}

    def record(name, fn, config=None):
        try:
            err = ba.rel_err(fn(*sets[0]), ref)
            timing = ba.time_jax(fn, sets, est_s)
        except Exception as e:  # a variant that does not lower or run is reported, not fatal
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            log(f"  {name:30s} ERROR {results[name]['error'][:1500]}")
            return None
        tbps = nbytes / timing["time_s"] / 1e12
        results[name] = {**timing, "tbps": tbps, "rel_err": err, **({"config": config._asdict()} if config else {})}
        us, compile_s = timing["time_s"] * 1e6, timing["compile_s"]
        log(f"  {name:30s} {us:9.1f} us {tbps:6.3f} TB/s  err {err:.1e}  compile {compile_s:.1f}s")
        return tbps

    default = mgpu.mgpu_config(batch, ba.NUM_KV_HEADS, seq, ba.HEAD_DIM, jnp.bfloat16)
    record("mgpu", mgpu.decode_attention, default)
    record("triton", triton_kernel.decode_attention)
    record("mgpu_pm", pallas_merge(mgpu.decode_attention), default._replace(merge="pallas"))
    record("triton_pm", pallas_merge(triton_kernel.decode_attention))
    record("auto", mgpu.decode_attention_auto)
    if torch is not None:
        results.update(ba.bench_torch(torch, sets, ref, nbytes, est_s, log, only_default=True))
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


def sweep_fn(config: mgpu.MgpuConfig):
    """The Mosaic GPU kernel with ``config``'s launch parameters."""
    launch = dict(block_k=config.block_k, num_splits=config.num_splits, num_stages=config.num_stages)
    return with_early_k(lambda q, k, v, n: mgpu.decode_attention(q, k, v, n, **launch), config.early_k)


def sweep_name(config: mgpu.MgpuConfig) -> str:
    return "mgpu[bk={},P={},s={}{}]".format(*config[:3], ",early_k" if config.early_k else "")


def interleave(torch, sets, est_s, rounds, log, extra=()) -> dict:
    """The default dispatch, both kernels, torch SDPA and the ``extra`` Mosaic GPU configurations timed round by
    round (``ba.interleaved``)."""
    samplers = {
        "auto": ba.jax_sampler(mgpu.decode_attention_auto, sets, est_s),
        "triton": ba.jax_sampler(triton_kernel.decode_attention, sets, est_s),
        "mgpu": ba.jax_sampler(mgpu.decode_attention, sets, est_s),
        "torch_sdpa": ba.torch_sampler(torch, ba.torch_sdpa(), ba.torch_inputs(torch, sets), est_s),
        **{sweep_name(c): ba.jax_sampler(sweep_fn(c), sets, est_s) for c in extra},
    }
    out = ba.interleaved(samplers, rounds, baseline="torch_sdpa")
    out["auto"]["breakdown"] = parts = ba.kernel_breakdown(mgpu.decode_attention_auto, sets, est_s)
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
        f"{'B x T':>10} {'triton':>15} {'mgpu':>15} {'triton_pm':>15} {'mgpu_pm':>15} {'auto':>15} "
        f"{'mgpu best':>15} {'torch_sdpa':>15} {'mgpu/torch':>10} {'best/torch':>10} {'auto/torch':>10} "
        f"{'mgpu/triton':>11}  best config",
    ]
    for shape in report["shapes"]:
        r = shape["results"]
        t = lambda name, r=r: r.get(name, {}).get("time_s", float("nan"))
        cell = lambda name, r=r, t=t: f"{t(name) * 1e6:7.1f} ({r.get(name, {}).get('tbps', float('nan')):5.2f})"
        # Ratios are speed ratios: > 1 means the Mosaic GPU kernel is faster.
        lines.append(
            f"{shape['batch']:>4} x {shape['seq']:<5} {cell('triton'):>15} {cell('mgpu'):>15} {cell('triton_pm'):>15} "
            f"{cell('mgpu_pm'):>15} {cell('auto'):>15} {cell('mgpu_best'):>15} {cell('torch_sdpa'):>15} "
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
    parser.add_argument("--shapes", nargs="*", default=[f"{b}x{t}" for b, t in ba.SHAPES])
    parser.add_argument("--sweep-shapes", nargs="*", default=["1x4096", "1x32768", "8x4096"])
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop sweeping after this many seconds")
    parser.add_argument("--sweep", nargs="*", default=list(SWEEP), help="sweep points (see SWEEP)")
    parser.add_argument("--rounds", type=int, default=0, help="then time auto/triton/mgpu/torch interleaved")
    parser.add_argument("--round-points", nargs="*", default=[], help="sweep points added to the interleaved rounds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        torch = torch if torch.cuda.is_available() else None
    except ImportError:
        torch = None
    log = lambda msg: print(msg, flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": jax.devices()[0].device_kind,
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "torch": getattr(torch, "__version__", None),
        "backend": backend.MOSAIC_GPU,
        **backend.describe(),
    }
    report = {"meta": meta, "shapes": []}
    log(json.dumps(meta))
    if torch is not None:
        report["copy"] = ba.copy_bandwidth(torch)
        log(f"device copy: {report['copy']['tbps']:.3f} TB/s (read + write)")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    for i, (batch, seq) in enumerate(shapes):
        log(f"B={batch} T={seq}: K+V {ba.kv_bytes(batch, seq) / 1e6:.0f} MB")
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
