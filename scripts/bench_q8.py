"""Q8 decode attention on one GPU: the fused Q8 kernel, the seed's way (dequantize, then attend) and the bf16
kernel, on the same shapes in one run.

For N=32 query heads, K=8 kv heads, D=128, bf16 queries and each B x T (every sequence full, lengths = T):

* ``bf16``: ``pallas_kernels.decode.decode_attention`` over a bf16 cache, default launch parameters;
* ``q8``: ``pallas_kernels.decode_q8.q8_decode_attention`` over the same K/V quantized (int8, float16 scales),
  default launch parameters; ``q8_wide``: the best configuration of a sweep run first on ``--sweep-shape``
  (the fusions other than "wide" and the transposed scale layout lost and were deleted: git history);
* ``seed`` (``--seed``): ``pallas_kernels.dequantize.dequantize_q8`` of K and V to bf16, then the bf16 kernel
  (the seed's approach: the dequantized layer is written to and read back from memory);
* ``copy``: a 1 GiB device-to-device copy (``jnp`` copy of a bf16 array; bytes read + written), the ceiling.

Timing: one jitted program runs ``n`` calls in a ``fori_loop``, each call's output ``[B, N, D]`` feeding the next
call's query (a data dependency: no call can be dropped, merged or hoisted); the time per call is the difference
between programs of ``2n`` and ``n`` calls (launch and dispatch cancel), median of 7. K/V rotate over enough
copies to exceed 4x the L2 cache. Bandwidth: bytes of the cache each variant must read (bf16: 2*B*K*T*D*2;
Q8: 2*B*K*T*(D + D/32*2)) over time. Every variant is checked against the float32 reference on the bf16 K/V.

Usage: ``python scripts/bench_q8.py --out DIR [--shapes 1x4096 64x8192] [--budget-s 150] [--deadline-s 300]``;
prints a table last and writes ``DIR/bench_q8.json``.

``python scripts/bench_q8.py --accuracy`` (any backend) instead measures the format's accuracy: the round trip,
decode attention against the unquantized cache, greedy generation with Q8 caches (scripts/q8_accuracy.py, whose
options it takes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jkv.caches.formats import quantize
from pallas_kernels import backend, decode_q8, dequantize, reference
from pallas_kernels import decode as kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import q8_accuracy

SHAPES = ((1, 4096), (1, 32768), (8, 16384), (32, 4096), (64, 8192))
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
ROTATE_BYTES = 200e6  # > 4x the 50 MB L2 of an H100
TARGET_RUN_S = 2e-3


def bf16_bytes(batch, seq):
    return 2 * batch * NUM_KV_HEADS * seq * HEAD_DIM * 2


def q8_bytes(batch, seq):
    return 2 * batch * NUM_KV_HEADS * seq * (HEAD_DIM + HEAD_DIM // 32 * 2)


def time_chained(fn, q, kv_sets, est_s: float, trials: int = 7) -> dict:
    """Median time of one ``fn(q, *kv)`` call; the output of each call is the next call's ``q``."""
    per_loop = len(kv_sets)
    reps = max(1, math.ceil(TARGET_RUN_S / (est_s * per_loop)))

    def program(loops):
        def run(q, kv_sets):
            def body(_, q):
                for kv in kv_sets:  # static unroll over the rotating copies
                    q = fn(q, *kv)
                return q

            return lax.fori_loop(0, loops, body, q)

        return jax.jit(run)

    t0 = time.perf_counter()
    short, long = program(reps), program(2 * reps)
    for run in (short, long):
        jax.block_until_ready(run(q, kv_sets))
    compile_s = time.perf_counter() - t0

    def wall(run):
        t = time.perf_counter()
        jax.block_until_ready(run(q, kv_sets))
        return time.perf_counter() - t

    samples = []
    for _ in range(trials):
        t_short, t_long = wall(short), wall(long)
        samples.append((t_long - t_short) / (reps * per_loop))
    return {"time_s": statistics.median(samples), "spread_s": max(samples) - min(samples), "compile_s": compile_s}


def copy_bandwidth(nbytes: int = 1 << 30, trials: int = 7) -> dict:
    """A loop of ``x = -x`` over a bf16 array: each step reads and writes it once."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    program = lambda n: jax.jit(lambda x: lax.fori_loop(0, n, lambda _, x: -x, x))
    short, long = program(10), program(20)
    for run in (short, long):
        jax.block_until_ready(run(x))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(short(x))
        t1 = time.perf_counter()
        jax.block_until_ready(long(x))
        samples.append((time.perf_counter() - 2 * t1 + t0) / 10)
    t = statistics.median(samples)
    return {"bytes": 2 * nbytes, "time_s": t, "tbps": 2 * nbytes / t / 1e12}


def rel_err(out, ref) -> float:
    out, ref = (np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) for x in (out, ref))
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def make_sets(batch, seq):
    key = jax.random.key(batch * 100003 + seq)
    copies = max(1, math.ceil(ROTATE_BYTES / q8_bytes(batch, seq)))
    q = jax.random.normal(key, (batch, NUM_Q_HEADS, HEAD_DIM), jnp.bfloat16)
    lengths = jnp.full((batch,), seq, jnp.int32)
    bf16, q8s = [], []
    for i in range(copies):
        kk, kv = jax.random.split(jax.random.fold_in(key, i + 1))
        k = jax.random.normal(kk, (batch, NUM_KV_HEADS, seq, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(kv, (batch, NUM_KV_HEADS, seq, HEAD_DIM), jnp.bfloat16)
        bf16.append((k, v, lengths))
        q8s.append((*quantize(k), *quantize(v), lengths))
    return q, bf16, q8s


def q8_fn(config: dict):
    """``decode_q8.q8_decode_attention`` with launch overrides; ``split_factor`` scales the default split count."""
    config = dict(config)
    factor = config.pop("split_factor", None)
    config.pop("fuse", None)  # "wide", the one fusion the kernel has

    def splits(k):
        b, kh, s, d = k.shape
        default = decode_q8.q8_decode_config(b, kh, s, d)
        return {} if factor is None else {"num_splits": max(1, round(default.num_splits * factor))}

    return lambda q, k, *kv: decode_q8.q8_decode_attention(q, k, *kv, **config, **splits(k))


def variants(tuned: dict, seed: bool):
    """bf16 kernel, Q8 defaults, the sweep's best configuration of each fusion, the seed's way (optional)."""
    out = {"bf16": (kernels.decode_attention, "bf16"), "q8": (decode_q8.q8_decode_attention, "q8")}
    for fuse, config in tuned.items():
        out[f"q8_{fuse}"] = (q8_fn(config), "q8")
    if seed:
        deq = lambda codes, scales: dequantize.dequantize_q8(codes, scales, dtype=jnp.bfloat16)
        out["seed"] = (lambda q, k, ks, v, vs, n: kernels.decode_attention(q, deq(k, ks), deq(v, vs), n), "q8")
    return out


def measure(name, fn, kind, q, sets, ref, nbytes, log) -> dict:
    try:
        err = rel_err(fn(q, *sets[0]), ref)
        timing = time_chained(fn, q, sets, nbytes / 2.5e12 + 5e-6)
    except Exception as e:  # reported, not fatal
        log(f"  {name:44s} ERROR {type(e).__name__}: {str(e)[:300]}")
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    tbps = nbytes / timing["time_s"] / 1e12
    us, compile_s = timing["time_s"] * 1e6, timing["compile_s"]
    log(f"  {name:44s} {us:9.1f} us {tbps:6.3f} TB/s err {err:.1e} compile {compile_s:.1f}s")
    return {**timing, "tbps": tbps, "rel_err": err, "kind": kind}


# Launch configurations of the sweep, most promising first (a spent budget cuts the tail): (block_k, warps, stages).
SWEEP_CONFIGS = ((64, 4, 3), (32, 2, 3), (128, 4, 3), (64, 2, 3), (128, 2, 3), (256, 4, 3))


def sweep(batch, seq, deadline, log, configs=SWEEP_CONFIGS, split_factors=()) -> tuple[dict, list]:
    """Best Q8 launch parameters at one shape: ``{"wide": config}``. Splits by heuristic, then ``split_factors``
    times the heuristic's count at the first configuration."""
    q, _, sets = make_sets(batch, seq)
    ref = reference.q8_decode_attention_reference(q, *sets[0])
    grid = [("wide", c, False) for c in configs]
    grid += [("wide", (*configs[0][:3], x), False) for x in split_factors]
    rows, best = [], {}
    for fuse, (bk, w, st, *factor), scales_t in grid:
        if time.perf_counter() > deadline:
            log("  (sweep budget spent)")
            break
        config = dict(fuse=fuse, block_k=bk, num_warps=w, num_stages=st)
        if factor:
            config["split_factor"] = factor[0]
        if scales_t:
            config["scales_t"] = True
        name = f"q8[{fuse}{',T' if scales_t else ''},bk={bk},w={w},s={st}{f',P=x{factor[0]}' if factor else ''}]"
        r = measure(name, q8_fn(config), "q8", q, sets, ref, q8_bytes(batch, seq), log)
        rows.append({"config": config, **r})
        key = fuse + ("_T" if scales_t else "")
        if "time_s" in r and (key not in best or r["time_s"] < best[key][0]):
            best[key] = (r["time_s"], config)
    return {k: c for k, (_, c) in best.items()}, rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--shapes", nargs="*", default=[f"{b}x{t}" for b, t in SHAPES])
    parser.add_argument("--sweep-shape", default="32x4096", help="B x T of the launch-parameter sweep ('' skips it)")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="variants timed at every shape: wide[/block_k/warps/stages]"
    )
    parser.add_argument("--sweep-configs", nargs="*", default=[], help="block_k/warps/stages, e.g. 64/4/3")
    parser.add_argument("--sweep-splits", nargs="*", default=[], help="factors of the default split count")
    parser.add_argument("--budget-s", type=float, default=150.0, help="seconds the sweep may take")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="seconds after which no shape starts")
    parser.add_argument("--seed", action="store_true", help="also time the seed's way (dequantize, then attend)")
    parser.add_argument("--accuracy", action="store_true", help="measure the format's accuracy instead of timing")
    q8_accuracy.add_arguments(parser)  # --accuracy's options (scripts/q8_accuracy.py)
    args = parser.parse_args(argv)
    if args.accuracy or args.generation_only:
        q8_accuracy.run(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)
    start = time.perf_counter()
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": jax.devices()[0].device_kind,
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        **backend.describe(),
    }
    log(json.dumps(meta))
    report = {"meta": meta, "copy": copy_bandwidth(), "shapes": []}
    log(f"device copy: {report['copy']['tbps']:.3f} TB/s (read + write)")
    tuned = {}
    if args.sweep_shape:
        b, t = (int(x) for x in args.sweep_shape.split("x"))
        log(f"sweep at B={b} T={t}")
        configs = [tuple(int(x) for x in c.split("/")) for c in args.sweep_configs] or SWEEP_CONFIGS
        split_factors = [float(x) for x in args.sweep_splits]
        best, rows = sweep(b, t, time.perf_counter() + args.budget_s, log, configs, split_factors)
        report["sweep"] = {"batch": b, "seq": t, "rows": rows, "best": best}
        log(f"best: {best}")
        # Every shape then times the best configuration of each fusion within 1.25x of the fastest one.
        timed = {repr(r["config"]): r["time_s"] for r in rows if "time_s" in r}
        fastest = min(timed.values(), default=0.0)
        tuned = {f: c for f, c in best.items() if timed[repr(c)] <= 1.25 * fastest}
        jax.clear_caches()
    for extra in args.extra:
        fuse, *launch = extra.split("/")
        tuned[extra.replace("/", "_")] = dict(
            fuse=fuse, **dict(zip(("block_k", "num_warps", "num_stages"), map(int, launch), strict=False))
        )
    for shape in args.shapes:
        batch, seq = (int(x) for x in shape.split("x"))
        log(
            f"B={batch} T={seq}: bf16 K+V {bf16_bytes(batch, seq) / 1e6:.0f} MB, Q8 {q8_bytes(batch, seq) / 1e6:.0f} MB"
        )
        if time.perf_counter() - start > args.deadline_s:
            log("  (deadline: shape skipped)")
            continue
        q, bf16_sets, q8_sets = make_sets(batch, seq)
        ref = reference.decode_attention_reference(q, *bf16_sets[0])
        results = {}
        for name, (fn, kind) in variants(tuned, args.seed).items():
            sets = {"bf16": bf16_sets, "q8": q8_sets}[kind]
            nbytes = bf16_bytes(batch, seq) if kind == "bf16" else q8_bytes(batch, seq)
            results[name] = measure(name, fn, kind, q, sets, ref, nbytes, log)
        results["q8"]["config"] = decode_q8.q8_decode_config(batch, NUM_KV_HEADS, seq, HEAD_DIM)._asdict()
        report["shapes"].append({"batch": batch, "seq": seq, "results": results})
        (args.out / "bench_q8.json").write_text(json.dumps(report, indent=1, default=str))
        del bf16_sets, q8_sets
        jax.clear_caches()
    log(f"total {time.perf_counter() - start:.0f} s")
    log(table(report))


def table(report) -> str:
    copy = report["copy"]["tbps"]
    names = sorted({n for s in report["shapes"] for n in s["results"] if n != "bf16"}, key=lambda n: (n != "q8", n))
    head = f"{'B x T':>11} {'bf16 us':>8} {'TB/s':>6}" + "".join(
        f" {n + ' us':>11} {'/bf16':>6} {'TB/s':>6}" for n in names
    )
    lines = [f"copy {copy:.3f} TB/s; TB/s = bytes each variant reads (bf16 or Q8) / time", head]
    for s in report["shapes"]:
        r = s["results"]
        t = lambda n, r=r: r.get(n, {}).get("time_s", float("nan"))
        tb = lambda n, r=r: r.get(n, {}).get("tbps", float("nan"))
        row = f"{s['batch']:>5} x {s['seq']:<5} {t('bf16') * 1e6:8.1f} {tb('bf16'):6.3f}"
        row += "".join(f" {t(n) * 1e6:11.1f} {t(n) / t('bf16'):6.2f} {tb(n):6.3f}" for n in names)
        lines.append(row)
    if report.get("sweep"):
        where = f"{report['sweep']['batch']}x{report['sweep']['seq']}"
        lines += [f"q8_{f} = {c} (best at {where})" for f, c in report["sweep"]["best"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
