"""Decode-attention bandwidth on one GPU: jkv's Pallas kernel against its peers, measured in one run.

For bf16, N=32 query heads, K=8 kv heads, D=128 and each B x T (every sequence full, lengths = T), it times

* ``jkv``: ``pallas_kernels.decode.decode_attention`` (the Triton kernel) with its default launch parameters,
  then a sweep of block sizes, splits, warps and stages (the best is reported beside the default),
* ``jkv_auto``: ``pallas_kernels.dispatch.decode_attention_auto``, what ``jkv.attend`` runs at T = 1 for a
  contiguous cache: the Mosaic GPU kernel where ``prefer_mgpu`` picks it, else the Triton kernel,
* ``jkv_5d``: the same kernel reading one layer of a two-layer ``[L, B, K, S, D]`` cache with a traced layer
  index (shows that the layer is not copied out of the cache),
* ``xla_ref``: ``pallas_kernels.reference.decode_attention_reference`` (pure jnp) under ``jax.jit``,
* ``jax_gqa``: ``jax.experimental.pallas.ops.gpu.decode_attention.gqa`` (its own ``[B, S, K, D]`` layout, which
  it transposes inside the call; its default block sizes),
* ``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with q_len 1 and ``enable_gqa=True``
  (default backend choice; the flash / efficient / cuDNN backends are also timed one by one where they run),
* ``copy``: a 1 GiB device-to-device copy (``torch`` ``copy_``), the bandwidth ceiling.

Bandwidth formula: TB/s = bytes of K and V read (2 * B * K * T * D * 2) / median time per call; the copy counts
bytes read plus bytes written. Timing: ``bench/common.py``. Every variant is checked against the XLA reference
(relative error) before it is timed. Compile time is reported apart.

Usage: ``python bench/bench_attention.py --out DIR [--budget-s 330] [--no-sweep] [--shapes 1x4096 64x8192]``.
Writes ``DIR/bench_attention.json`` (after every shape) and ``DIR/bench_attention.png``; prints a table last.
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
import numpy as np

from bench import common, torch_peers
from jkv.caches.formats import quantize
from pallas_kernels import common as kernel_common
from pallas_kernels import decode, dequantize, dispatch, reference
from pallas_kernels.decode_q8 import q8_decode_attention, q8_decode_config

# ----------------------------------------------------------------------------------------------- shapes


def cta_configs(default, batch, seq, ctas, blocks) -> list[kernel_common.DecodeConfig]:
    """A focused stage A: splits giving about ``ctas`` programs in all, for each block size in ``blocks``."""
    out = []
    for block_k in blocks:
        for total in ctas:
            splits = max(1, min(seq // block_k, math.ceil(total / (batch * common.NUM_KV_HEADS))))
            stages = min(default.num_stages + (block_k < 128), kernel_common.max_stages(block_k, common.HEAD_DIM, 2))
            config = default._replace(block_k=block_k, num_splits=splits, num_stages=stages)
            if config != default and config not in out:
                out.append(config)
    return out


def sweep_configs(default: kernel_common.DecodeConfig, seq: int) -> list[kernel_common.DecodeConfig]:
    """Stage A of the sweep: block sizes x splits around the default (warps/stages tried on the winner later)."""
    d = default.num_splits
    candidates = (d // 2, d, 2 * d, 4 * d) + ((1,) if d <= 4 else ())
    splits = sorted({max(1, min(seq // 64, s)) for s in candidates})
    out = []
    for block_k in (32, 64, 128, 256) if d >= 8 else (64, 128, 256):  # short splits: small blocks too
        for s in splits:
            config = default._replace(block_k=block_k, num_splits=s)
            if config != default:
                out.append(config)
    return out


def stage_b_configs(best: kernel_common.DecodeConfig) -> list[kernel_common.DecodeConfig]:
    """Stage B: warps x stages on stage A's winner."""
    pairs = ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4))
    configs = [best._replace(num_warps=w, num_stages=s) for w, s in pairs]
    return [c for c in configs if c != best]


def bench_shape(torch, batch, seq, *, sweep: bool, quick: bool, stage_b: bool, deadline: float, log, ctas=None) -> dict:
    """Every row at one shape; ``ctas``: ``(program counts, block sizes)`` for a focused stage A of the sweep."""
    nbytes = common.kv_bytes(batch, seq)
    sets, copies, est_s = common.decode_inputs(batch, seq)
    ref_fn = jax.jit(reference.decode_attention_reference)
    ref = ref_fn(*sets[0])
    results = {}

    def record(name, fn, arg_sets, config=None, check_args=None):
        try:
            out = fn(*(check_args or arg_sets[0]))
            err = common.rel_err(out, ref)
            timing = common.time_jax(fn, arg_sets, est_s)
        except Exception as e:  # a peer that does not run here is reported, not fatal
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"  {name:34s} ERROR {results[name]['error']}")
            return None
        tbps = nbytes / timing["time_s"] / 1e12
        results[name] = {**timing, "tbps": tbps, "rel_err": err, **({"config": config._asdict()} if config else {})}
        us, compile_s = timing["time_s"] * 1e6, timing["compile_s"]
        log(f"  {name:34s} {us:9.1f} us {tbps:6.3f} TB/s  err {err:.1e}  compile {compile_s:.1f}s")
        return tbps

    # Peers and the default kernel first: they are the figures the report needs.
    default = kernel_common.decode_config(batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM, jnp.bfloat16)
    record("jkv", decode.decode_attention, sets, default)
    try:
        results["jkv"]["launches"] = common.launches(decode.decode_attention, sets[0])
        log(f"  jkv compiled program: {results['jkv']['launches']}")
    except Exception as e:
        log(f"  (could not count launches: {type(e).__name__}: {e})")
    sweep_args = (results, default, sets, batch, seq, sweep, stage_b, deadline, record, log, copies, nbytes, ctas)
    if quick:  # the kernel and torch only (plus the sweep)
        if torch is not None:
            results.update(torch_peers.bench_torch(torch, sets, ref, nbytes, est_s, log, only_default=True))
        return _sweep(*sweep_args)
    record("jkv_auto", dispatch.decode_attention_auto, sets)
    record("xla_ref", ref_fn, sets)
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_ops

        gqa_sets = [(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), n) for q, k, v, n in sets]
        gqa = jax.jit(lambda q, k, v, n: jax_ops.gqa(q, k, v, kv_seq_len=n))
        record("jax_gqa", gqa, gqa_sets)
        del gqa_sets
    except ImportError as e:
        results["jax_gqa"] = {"error": str(e)}
    if torch is not None:
        results.update(torch_peers.bench_torch(torch, sets, ref, nbytes, est_s, log))
    bench_q8(record, sets, results, batch, seq)
    if nbytes * 2 * copies < 8e9:  # the 5-D cache path: two layers, the traced index picks layer 1
        sets5 = [(q, jnp.stack([v, k]), jnp.stack([k, v]), n) for q, k, v, n in sets]
        fn5 = lambda q, k, v, n: decode.decode_attention(q, k, v, n, layer=jnp.int32(1) + 0 * n[0])
        record("jkv_5d", fn5, sets5, default)
        del sets5
    return _sweep(*sweep_args)


def _sweep(results, default, sets, batch, seq, sweep, stage_b, deadline, record, log, copies, nbytes, ctas) -> dict:
    if sweep:
        best_name, best_tbps = "jkv", results["jkv"].get("tbps", 0.0)
        now = time.perf_counter()
        stage_a_deadline = now + 0.6 * (deadline - now)  # stage B gets the rest
        for stage in ("A", "B") if stage_b else ("A",):
            config_of = kernel_common.DecodeConfig
            base = config_of(**results[best_name]["config"]) if "config" in results[best_name] else default
            if stage == "B":
                configs = stage_b_configs(base)
            elif ctas:
                configs = cta_configs(default, batch, seq, *ctas)
            else:
                configs = sweep_configs(default, seq)
            for config in configs:
                if time.perf_counter() > (stage_a_deadline if stage == "A" and stage_b else deadline):
                    log("  (time budget spent: sweep cut short)")
                    break
                name = "jkv[bk={},P={},w={},s={}]".format(*config)
                if name in results:
                    continue
                fn = lambda q, k, v, n, c=config: decode.decode_attention(q, k, v, n, **c._asdict())
                tbps = record(name, fn, sets, config)
                if tbps is not None and tbps > best_tbps:
                    best_name, best_tbps = name, tbps
        results["jkv_best"] = {"name": best_name, **results[best_name]}
    return {"batch": batch, "seq": seq, "kv_bytes": nbytes, "rotating_copies": copies, "results": results}


def bench_q8(record, sets, results, batch, seq) -> None:
    """Q8 cache rows (docs/quant.md): the fused kernel, and the seed's way (dequantize the layer, then attend).

    Same q and K/V as the bf16 rows, quantized with float16 scales; errors are against the bf16 reference.
    ``q8_*`` TB/s in ``results`` count bf16-equivalent bytes like every row; ``q8_tbps`` counts the Q8 bytes read.
    """
    q8_sets = [(q, *quantize(k), *quantize(v), n) for q, k, v, n in sets]
    deq = lambda codes, scales: dequantize.dequantize_q8(codes, scales, dtype=jnp.bfloat16)
    dequant_then_attend = lambda q, k, ks, v, vs, n: decode.decode_attention(q, deq(k, ks), deq(v, vs), n)
    config = q8_decode_config(batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM)
    record("q8_fused", q8_decode_attention, q8_sets, config)
    record("q8_dequant_then_attend", dequant_then_attend, q8_sets)
    for name in ("q8_fused", "q8_dequant_then_attend"):
        if "time_s" in results.get(name, {}):
            results[name]["q8_tbps"] = common.q8_bytes(batch, seq) / results[name]["time_s"] / 1e12


def q8_table(report: dict) -> str:
    """Q8 rows against the bf16 kernel (default launch parameters) of the same run: times and ratios."""
    lines = [
        "Q8 cache (f16 scales) vs bf16 kernel, same shapes and run; TB/s counts the Q8 bytes read",
        f"{'B x T':>10} {'bf16 us':>9} {'q8 us':>9} {'q8/bf16':>8} {'q8 TB/s':>8} {'seed us':>9} {'seed/bf16':>9}",
    ]
    for shape in report["shapes"]:
        r = shape["results"]
        t = lambda name, r=r: r.get(name, {}).get("time_s", float("nan"))
        bf, fused, seed = t("jkv"), t("q8_fused"), t("q8_dequant_then_attend")
        q8_tb = r.get("q8_fused", {}).get("q8_tbps", float("nan"))
        lines.append(
            f"{shape['batch']:>4} x {shape['seq']:<5} {bf * 1e6:9.1f} {fused * 1e6:9.1f} {fused / bf:8.2f} "
            f"{q8_tb:8.3f} {seed * 1e6:9.1f} {seed / bf:9.2f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- report


COLUMNS = ("jkv_auto", "jkv", "jkv_best", "jkv_5d", "torch_sdpa", "jax_gqa", "xla_ref")


def table(report: dict) -> str:
    copy = report.get("copy", {}).get("tbps", float("nan"))
    head = f"{'B x T':>10} " + " ".join(f"{c:>10}" for c in COLUMNS) + f" {'best/copy':>9} {'best/torch':>10}"
    lines = [f"TB/s (K+V bytes / median time); copy = {copy:.3f} TB/s (read + write)", head]
    for shape in report["shapes"]:
        r = shape["results"]
        tb = lambda name, r=r: r.get(name, {}).get("tbps", float("nan"))
        best = max(tb("jkv_best") if "jkv_best" in r else tb("jkv"), tb("jkv_auto"))
        cells = " ".join(f"{tb(c):10.3f}" for c in COLUMNS)
        lines.append(
            f"{shape['batch']:>4} x {shape['seq']:<5} {cells} {best / copy:9.0%} {best / tb('torch_sdpa'):10.2f}"
        )
    lines.append(
        "best configs: "
        + "; ".join(
            f"{s['batch']}x{s['seq']}: {s['results'].get('jkv_best', {}).get('name', '-')}" for s in report["shapes"]
        )
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = report["shapes"]
    rows = ("jkv_auto", "jkv", "jkv_best", "torch_sdpa", "jax_gqa", "xla_ref")
    tbps = {n: [s["results"].get(n, {}).get("tbps", 0.0) for s in shapes] for n in rows}
    names = [n for n in rows if any(tbps[n]) and not (n == "jkv_best" and tbps[n] == tbps["jkv"])]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(shapes)) + i * width, tbps[name], width, label=name)
    if "copy" in report:
        ax.axhline(report["copy"]["tbps"], color="k", ls="--", lw=1, label="device copy")
    ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, [f"{s['batch']}x{s['seq']}" for s in shapes])
    ax.set_xlabel("batch x sequence length (bf16, N=32, K=8, D=128)")
    ax.set_ylabel("TB/s (K+V bytes / time)")
    ax.set_title(f"Decode attention on {report['meta']['gpu']} ({report['meta']['date']})")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--shapes", nargs="*", default=[f"{b}x{t}" for b, t in common.SHAPES])
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop sweeping after this many seconds")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-stage-b", action="store_true", help="sweep block sizes x splits only")
    parser.add_argument("--sweep-shapes", nargs="*", default=None, help="sweep only these B x T (default: all)")
    parser.add_argument("--quick", action="store_true", help="the kernel, torch SDPA and the sweep only")
    parser.add_argument("--ctas", nargs="*", type=int, help="stage A: splits for about these many programs")
    parser.add_argument("--blocks", nargs="*", type=int, default=[64, 128], help="block sizes for --ctas")
    parser.add_argument("--replot", type=Path, help="only re-render the PNG and table of a saved JSON into --out")
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        plot(report, args.out / "bench_attention.png")
        print(table(report))
        return
    ctas = (args.ctas, args.blocks) if args.ctas else None
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch, log = torch_peers.load_torch(), common.log
    meta = common.meta(torch)
    report = {"meta": meta, "shapes": []}
    log(json.dumps(meta))
    if torch is not None:
        report["copy"] = torch_peers.copy_bandwidth(torch)
        log(f"device copy: {report['copy']['tbps']:.3f} TB/s (read + write)")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    for i, (batch, seq) in enumerate(shapes):
        log(f"B={batch} T={seq}: K+V {common.kv_bytes(batch, seq) / 1e6:.0f} MB")
        swept = lambda b, t: not args.no_sweep and (args.sweep_shapes is None or f"{b}x{t}" in args.sweep_shapes)
        sweep = swept(batch, seq)
        # Each remaining swept shape keeps an equal share of the remaining budget.
        share = max(1, sum(swept(b, t) for b, t in shapes[i:]))
        deadline = time.perf_counter() + (start + args.budget_s - time.perf_counter()) / share
        row = bench_shape(
            torch,
            batch,
            seq,
            sweep=sweep,
            quick=args.quick,
            stage_b=not args.no_stage_b,
            deadline=deadline,
            log=log,
            ctas=ctas,
        )
        report["shapes"].append(row)
        (args.out / "bench_attention.json").write_text(json.dumps(report, indent=1))
        jax.clear_caches()
    try:
        plot(report, args.out / "bench_attention.png")
    except Exception as e:
        log(f"plot failed: {type(e).__name__}: {e}")
    log(f"total {time.perf_counter() - start:.0f} s")
    log(table(report))
    log(q8_table(report))


if __name__ == "__main__":
    main()
