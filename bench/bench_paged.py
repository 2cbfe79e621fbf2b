"""Paged vs contiguous decode attention on one GPU: the same K/V, the same kernel body, in one run.

For bf16, N=32 query heads, K=8 kv heads, D=128 and the decode-attention benchmark's B x T shapes (every
sequence full, lengths = T; bench/bench_attention.py), it times

* ``contig``: ``pallas_kernels.decode.decode_attention`` on the contiguous ``[B, K, T, D]`` cache, default launch;
* ``paged_16``, ``paged_32``, ``paged_64``: ``pallas_kernels.paged.paged_decode_attention`` on the same contents
  cut into pages of 16 / 32 / 64 positions, stored at randomly permuted places of a ``[P, K, page_size, D]`` pool (a
  fragmented pool: no two consecutive logical pages adjacent, except by chance), default launch;
* ``jax_paged_16``: ``jax.experimental.pallas.ops.gpu.paged_attention`` on the same pages (its own
  ``[K, P, page_size, D]`` layout, transposed outside the timed call; its default block sizes, ``k_splits`` 16 or
  the largest power of two dividing the pages per sequence), a peer;
* ``xla_paged_16``: the pure-jnp reference that gathers the pages into a contiguous cache and attends;
* ``q8_contig``: ``pallas_kernels.decode_q8.q8_decode_attention`` (fused dequant) on the same K/V quantized
  (int8 codes, float16 scales per 32 values), default launch;
* ``q8_paged_16``, ``q8_paged_32``, ``q8_paged_64``: ``pallas_kernels.paged_q8.paged_q8_decode_attention``
  on those codes and scales cut into pages at the same permuted places as the bf16 pages, default launch;
* ``paged_16_loop``, ..., ``q8_paged_16_loop``, ...: where the default preloads a split's block-table entries
  before its loop (``PagedConfig.preload``), the same kernels reading them block by block inside the loop;
* ``copy``: a 1 GiB device-to-device copy (torch), the bandwidth ceiling.

Formula: TB/s = bytes of K and V read (2 * B * K * T * D * 2 for bf16; 2 * B * K * T * (D + D / 32 * 2) for Q8) /
median time per call (the copy counts bytes read plus written). Ratios in parentheses are to ``contig`` (bf16); Q8
errors are against the bf16 reference (so they include the format's own error). Timing: bench/common.py.
Every variant is checked against the contiguous XLA reference first. Compile time apart.

``--sweep 1x4096 ...`` also sweeps the launch parameters of the contiguous and paged kernels on those shapes
(keys per block 32/64/128 x splits around the default, then stages 2/4 on the winner)
and reports each kernel's best beside its default.

Usage: ``python bench/bench_paged.py --out DIR [--budget-s 300] [--shapes 1x4096 64x8192] [--sweep 1x4096]``.
Writes
``DIR/bench_paged.json`` after every shape; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench import common, torch_peers
from jkv.caches.formats import quantize
from pallas_kernels import common as kernel_common
from pallas_kernels import decode, decode_q8, paged, paged_q8, reference

PAGE_SIZES = (16, 32, 64)


def pool(x, perm, page_size: int):
    """``[B, K, T, D]`` as pages ``[B * M, K, page_size, D]``, logical page j of b at physical ``perm[b * M + j]``."""
    batch, kv_heads, seq, head_dim = x.shape
    m = seq // page_size
    pages = x.reshape(batch, kv_heads, m, page_size, head_dim).swapaxes(1, 2)  # (B, M, K, ps, D)
    pages = pages.reshape(batch * m, kv_heads, page_size, head_dim)
    return jnp.zeros_like(pages).at[perm].set(pages)


def paged_sets(sets, page_size: int, key):
    """The contiguous sets cut into pages at randomly permuted pool positions: (q, *pools, tables, n) with one
    pool per cache array (K and V; codes and scales of each for Q8), all at the same places."""
    out = []
    for i, (q, *arrays, n) in enumerate(sets):
        batch, _, seq, _ = arrays[0].shape
        m = seq // page_size
        perm = jax.random.permutation(jax.random.fold_in(key, i), batch * m).astype(jnp.int32)
        out.append((q, *(pool(x, perm, page_size) for x in arrays), perm.reshape(batch, m), n))
    return out


def sweep_configs(default, block_ks, splits_of):
    """Stage A of a sweep: keys per block x splits around the default (stages and merge tried later)."""
    d = default.num_splits
    splits = sorted({max(1, s) for s in (d // 2, d, 2 * d, 4 * d)})
    return [c for c in (splits_of(default, bk, s) for bk in block_ks for s in splits) if c is not None and c != default]


def bench_shape(batch: int, seq: int, *, deadline: float, log, sweep: bool = False) -> dict:
    """Default launches of every kernel and the peers; with ``sweep``, the kernels' sweeps instead of the peers."""
    key = jax.random.key(batch * 100003 + seq)
    nbytes = common.kv_bytes(batch, seq)
    sets, copies, est_s = common.decode_inputs(batch, seq)
    ref = jax.jit(reference.decode_attention_reference)(*sets[0])
    results = {}

    def record(name, fn, arg_sets, config=None, check=None, nbytes=nbytes):
        if time.perf_counter() > deadline:
            results[name] = {"error": "skipped: time budget spent"}
            log(f"  {name:16s} skipped (time budget)")
            return None
        try:
            err = common.rel_err((check or fn)(*arg_sets[0]), ref)
            timing = common.time_jax(fn, arg_sets, est_s)
        except Exception as e:  # a variant that does not run here is reported, not fatal
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"  {name:16s} ERROR {results[name]['error']}")
            return None
        tbps = nbytes / timing["time_s"] / 1e12
        results[name] = {**timing, "tbps": tbps, "rel_err": err, **({"config": config._asdict()} if config else {})}
        log(
            f"  {name:16s} {timing['time_s'] * 1e6:9.1f} us (spread {timing['spread_s'] * 1e6:5.1f}) "
            f"{tbps:6.3f} TB/s  err {err:.1e}  compile {timing['compile_s']:.1f}s"
        )
        return timing["time_s"]

    def tune(prefix, default, fn_of, arg_sets, block_ks, splits_of):
        """Sweep launch parameters (stage A: block x splits; stage B: stages on the winner)."""
        best_name, best_t = prefix, results.get(prefix, {}).get("time_s", float("inf"))
        best = default
        for stage in ("A", "B"):
            if stage == "A":
                configs = sweep_configs(default, block_ks, splits_of)
            else:
                configs = [best._replace(num_stages=st) for st in (2, 4) if st != best.num_stages]
            for config in configs:
                name = f"{prefix}[" + ",".join(f"{k}={v}" for k, v in config._asdict().items()) + "]"
                t = record(name, fn_of(config), arg_sets, config)
                if t is not None and t < best_t:
                    best_name, best_t, best = name, t, config
        if "time_s" in results.get(best_name, {}):
            results[f"{prefix}_best"] = {"name": best_name, **results[best_name]}

    config = kernel_common.decode_config(batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM, jnp.bfloat16)
    record("contig", decode.decode_attention, sets, config)
    # Q8: the same K/V quantized (codes + float16 scales), the contiguous fused kernel and, below, its pages.
    q8_bytes = common.q8_bytes(batch, seq)
    q8_sets = [] if sweep else [(q, *quantize(k), *quantize(v), n) for q, k, v, n in sets]
    if q8_sets:
        q8_config = decode_q8.q8_decode_config(batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM)
        record("q8_contig", decode_q8.q8_decode_attention, q8_sets, q8_config, nbytes=q8_bytes)
    if sweep:
        tune(
            "contig",
            config,
            lambda c: lambda q, k, v, n: decode.decode_attention(q, k, v, n, **c._asdict()),
            sets,
            (32, 64, 128),
            lambda c, bk, s: c._replace(block_k=bk, num_splits=max(1, min(s, seq // bk))),
        )
    for page_size in PAGE_SIZES:
        psets = paged_sets(sets, page_size, jax.random.fold_in(key, page_size))
        m = seq // page_size
        config = paged.paged_config(batch, common.NUM_KV_HEADS, m, page_size, common.HEAD_DIM, jnp.bfloat16)
        record(f"paged_{page_size}", paged.paged_decode_attention, psets, config)
        if config.preload:  # the default preloads the split's table entries: time the in-loop reads beside it
            loop = lambda *a: paged.paged_decode_attention(*a, preload=False)
            record(f"paged_{page_size}_loop", loop, psets, config._replace(preload=False))
        if sweep:
            tune(
                f"paged_{page_size}",
                config,
                lambda c: lambda *a: paged.paged_decode_attention(*a, **c._asdict()),
                psets,
                (32, 64, 128),
                lambda c, bk, s, ps=page_size: (
                    None if bk < ps else c._replace(pages_per_block=bk // ps, num_splits=max(1, min(s, seq // bk)))
                ),
            )
        if page_size == 16 and not sweep:
            record("xla_paged_16", jax.jit(reference.paged_decode_attention_reference), psets)
            try:
                from jax.experimental.pallas.ops.gpu import paged_attention as jax_ops

                jsets = [(q, kp.swapaxes(0, 1), vp.swapaxes(0, 1), t, n) for q, kp, vp, t, n in psets]
                splits = max(1, min(16, m))  # its pages per sequence must divide evenly into its k_splits
                while m % splits:
                    splits //= 2
                peer = jax.jit(lambda q, kp, vp, t, n, s=splits: jax_ops.paged_attention(q, kp, vp, t, n, k_splits=s))
                # Its kernel applies no softmax scale: the check pre-scales q by D ** -0.5, the timed calls (the
                # same work) take q as it comes.
                scaled = lambda q, *a, peer=peer: peer(q * common.HEAD_DIM**-0.5, *a)
                record("jax_paged_16", peer, jsets, check=scaled)
                del jsets
            except ImportError as e:
                results["jax_paged_16"] = {"error": str(e)}
        del psets
        if q8_sets:
            qsets = paged_sets(q8_sets, page_size, jax.random.fold_in(key, page_size))
            config = paged_q8.paged_q8_config(batch, common.NUM_KV_HEADS, m, page_size, common.HEAD_DIM)
            record(f"q8_paged_{page_size}", paged_q8.paged_q8_decode_attention, qsets, config, nbytes=q8_bytes)
            if config.preload:
                loop = lambda *a: paged_q8.paged_q8_decode_attention(*a, preload=False)
                record(f"q8_paged_{page_size}_loop", loop, qsets, config._replace(preload=False), nbytes=q8_bytes)
            del qsets
    del q8_sets
    contig = results.get("contig", {}).get("time_s")
    q8_contig = results.get("q8_contig", {}).get("time_s")
    for name, r in results.items():
        if contig and "time_s" in r:
            r["vs_contig"] = r["time_s"] / contig
        if q8_contig and name.startswith("q8_paged") and "time_s" in r:
            r["vs_q8_contig"] = r["time_s"] / q8_contig
    return {"batch": batch, "seq": seq, "kv_bytes": nbytes, "rotating_copies": copies, "results": results}


BF16_COLUMNS = ("contig", "paged_16", "paged_32", "paged_64", "jax_paged_16", "xla_paged_16")
COLUMNS = (*BF16_COLUMNS, "q8_contig", *(f"q8_paged_{p}" for p in PAGE_SIZES))
BEST = ("contig_best", "paged_16_best", "paged_32_best", "paged_64_best")


def table(report: dict) -> str:
    copy = report.get("copy", {}).get("tbps", float("nan"))
    lines = [
        f"us per call (time / contig time); K+V bytes / time in TB/s on the last line of each shape; "
        f"copy = {copy:.3f} TB/s",
        f"{'B x T':>11} " + " ".join(f"{c:>16}" for c in COLUMNS),
    ]
    for shape in report["shapes"] + report.get("sweeps", []):
        r = shape["results"]
        cell = lambda c, r=r: (
            f"{r[c]['time_s'] * 1e6:8.1f} ({r[c].get('vs_contig', float('nan')):4.2f})" if "time_s" in r.get(c, {})
            else f"{'-':>15}"
        )  # fmt: skip
        tb = lambda c, r=r: f"{r.get(c, {}).get('tbps', float('nan')):16.3f}"
        lines.append(f"{shape['batch']:>4} x {shape['seq']:<6}" + " ".join(f"{cell(c):>16}" for c in COLUMNS))
        lines.append(f"{'TB/s':>12}" + " ".join(tb(c) for c in COLUMNS))
        loops = [
            f"{c[:-5]} {r[c]['time_s'] * 1e6:.1f} us ({r[c].get('vs_contig', float('nan')):.2f})"
            for c in r
            if c.endswith("_loop") and "time_s" in r[c]
        ]
        if loops:
            lines.append(f"{'':>12}  table entries read in the loop (default preloads them): " + ", ".join(loops))
        q8_ratios = [f"{c} {r[c]['vs_q8_contig']:.2f}" for c in COLUMNS if "vs_q8_contig" in r.get(c, {})]
        if q8_ratios:
            lines.append(f"{'':>12}  Q8 pages / q8_contig: " + ", ".join(q8_ratios))
        if "time_s" in r.get("contig_best", {}):
            t0 = r["contig_best"]["time_s"]
            best = [f"{c[:-5]} {r[c]['time_s'] * 1e6:.1f} us ({r[c]['time_s'] / t0:.2f})" for c in BEST if c in r]
            lines.append(f"{'best':>12}  " + "; ".join(best) + "  (ratios to the contiguous best)")
            lines.extend(f"{'':>14}{c}: {r[c]['name']}" for c in BEST if c in r)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--shapes", nargs="*", default=[f"{b}x{t}" for b, t in common.SHAPES])
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip what is left after this many seconds")
    parser.add_argument("--sweep", nargs="*", default=[], help="shapes (BxT) whose launch parameters to sweep")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch, log = torch_peers.load_torch(), common.log
    formula = "TB/s = 2*B*K*T*D*2 bytes (bf16), 2*B*K*T*(D+D/32*2) bytes (Q8) / median time per call"
    report = {"meta": {**common.meta(torch), "formula": formula}, "shapes": []}
    log(json.dumps(report["meta"]))
    if torch is not None:
        report["copy"] = torch_peers.copy_bandwidth(torch)
        log(f"device copy: {report['copy']['tbps']:.3f} TB/s")
    deadline = start + args.budget_s
    for key, shapes, sweep in (("shapes", args.shapes, False), ("sweeps", args.sweep, True)):
        report[key] = []
        for spec in shapes:  # every default first, then the sweeps, so a spent budget cuts only sweeps
            batch, seq = (int(x) for x in spec.split("x"))
            log(f"B={batch} T={seq}" + (" (sweep)" if sweep else ""))
            report[key].append(bench_shape(batch, seq, deadline=deadline, log=log, sweep=sweep))
            (args.out / "bench_paged.json").write_text(json.dumps(report, indent=1))
    log(table(report))


if __name__ == "__main__":
    main()
