"""Multi-token attention over a cache (issue 20): jkv's kernels against cuDNN flash attention and torch SDPA.

Cases (bf16, Hq/Hkv/D 32/8/128), the acceptance shapes of issue 20:

* ``prefill-8k``: one 8192-token prompt into an empty cache (``lengths 0, counts 8192``);
* ``chunk-2k``: a 2048-token chunk of one sequence after 30,720 cached positions (``S = 32768``);
* ``verify-64x5``: speculative verification, 64 sequences of 5 queries after 2048 cached positions each.

Rows (each checked against a float32 XLA reference, relative error, before it is timed):

* ``mgpu``: ``pallas_kernels.multi_token_mgpu.multi_token_attention_mgpu`` on the flat ``q [T, N, D]`` and the
  contiguous ``[B, K, S, D]`` cache; ``mgpu_paged`` (chunk): ``multi_token_mgpu_paged`` on the same contents in
  page-16 pools ``[P, K, 16, D]`` at randomly permuted pages; ``mgpu_ws``: its warp-specialised variant
  (``multi_token_mgpu_ws``: two consumer warpgroups, one producer), and ``mgpu_ws_paged`` (chunk) on the paged
  ones (``multi_token_mgpu_ws_paged``: the producer copies the pages through the table); ``mgpu_ws_pp`` and
  ``mgpu_ws_paged_pp``: the same with the consumers' ping-pong schedule (``config.pingpong``);
* ``triton``: ``pallas_kernels.multi_token.multi_token_attention`` (imported lazily; skipped where absent), and
  ``triton_paged`` (the same pools and table) for the chunk where that module has a paged entry
  (:data:`PAGED_ENTRIES`, called as ``entry(q, k_pages, v_pages, block_tables, q_starts, lengths, counts)``);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on its own ``[B, T, N, D]`` layout (K/V
  transposed to ``[B, S, K, D]`` outside the timing). Its causal mask is top-left aligned, so where queries sit
  after cached positions (chunk, verify) the same work runs as two cuDNN calls, the queries over the cached prefix
  (no mask) and over the new keys (causal, square: top-left = bottom-right), merged with their log-sum-exps
  (``return_residual``; the merge is a few elementwise ops on ``[B, T, N]``, timed with it; cuDNN returns the
  log-sum-exp in bf16, which shows in this row's error). Every key a query attends is computed once, as in jkv;
* ``torch_flash``: ``torch.nn.functional.scaled_dot_product_attention`` forced to the flash backend with
  ``enable_gqa``, ``is_causal`` for the prefill and ``causal_lower_right`` (bottom-right aligned) otherwise, on
  ``[B, N, T, D]`` queries and the cache's readable positions (sliced outside the timing);
* ``decode`` (verify only): ``pallas_kernels.dispatch.decode_attention_auto`` for one query per sequence over the
  same batch (2049 positions): issue 20 asks verification to take at most 1.3x this.

FLOPs are counted exactly from the mask: the sum over queries of the keys each attends, x 4 x D x N (QK^T and PV,
2 FLOPs per multiply-add); TFLOP/s = FLOPs / median time. Timing: ``bench/common.py`` (chained calls read from
profiler traces, torch in CUDA graphs), compile time apart; then every row is timed again in ``--rounds``
interleaved rounds, ratios against cuDNN per round. ``--smoke`` (or ``JKV_PREFILL_SMOKE=1``): tiny shapes and the
XLA rows only (``xla``: ``jax.nn.dot_product_attention(implementation="xla")`` in cuDNN's place), a check of this
script on a CPU in seconds.

Usage: ``python bench/bench_prefill.py --out DIR [--cases prefill-8k chunk-2k verify-64x5] [--rounds 5]
[--configs 64/1/64/2 16/4/128/2] [--ws-configs 16/4/64/3]`` (Mosaic GPU launch parameters timed beside the
default: ``--configs`` for ``mgpu``, rows ``mgpu[...]``; ``--ws-configs`` for the warp-specialised kernel without
and with the ping-pong schedule, rows ``mgpu_ws[...]`` and ``mgpu_ws_pp[...]``).
Appends one JSON line per case to ``DIR/bench_prefill.jsonl``; prints a table last.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench import common, torch_peers
from bench.prefill_peers import bench_torch, dpa, dpa_sets, paged_sets

PAGED_ENTRIES = ("multi_token_attention_paged", "paged_multi_token_attention")  # the Triton module's paged entry
PAGED_ROWS = ("mgpu_paged", "mgpu_ws_paged", "mgpu_ws_paged_pp")


class Case(NamedTuple):
    batch: int
    cached: int  # positions in the cache before the step, per sequence
    new: int  # queries per sequence
    max_len: int  # S of the cache (a multiple of 8, >= cached + new)
    heads: tuple[int, int, int] = (common.NUM_Q_HEADS, common.NUM_KV_HEADS, common.HEAD_DIM)


CASES = {
    "prefill-8k": Case(1, 0, 8192, 8192),
    "chunk-2k": Case(1, 30720, 2048, 32768),
    "verify-64x5": Case(64, 2048, 5, 2056),
}
SMOKE_CASES = {
    "prefill-8k": Case(1, 0, 64, 64, (4, 2, 64)),
    "chunk-2k": Case(1, 96, 32, 128, (4, 2, 64)),
    "verify-64x5": Case(4, 40, 5, 48, (4, 2, 64)),
}


def flops(case: Case) -> int:
    """Exact FLOPs of the causal work: query i of a sequence attends ``cached + i + 1`` keys."""
    keys = case.batch * (case.new * case.cached + case.new * (case.new + 1) // 2)
    n, _, d = case.heads
    return 4 * d * n * keys


# ----------------------------------------------------------------------------------------------- inputs


def case_sets(case: Case, seed: int, rotate_bytes: float = common.ROTATE_BYTES) -> tuple[list, int]:
    """Rotating input sets ``(q [T, N, D], k, v [B, K, S, D], q_starts, lengths, counts)`` (bf16): enough copies
    to exceed ``rotate_bytes`` (the L2 cache). Returns ``(sets, copies)``."""
    n, kh, d = case.heads
    rows = case.batch * case.new
    nbytes = 2 * case.batch * kh * case.max_len * d * 2
    copies = max(1, math.ceil(rotate_bytes / nbytes))
    ints = lambda x: jnp.full((case.batch,), x, jnp.int32)
    starts = jnp.arange(case.batch, dtype=jnp.int32) * case.new
    sets = []
    for i in range(copies):
        kq, kk, kv = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), 3)
        q = jax.random.normal(kq, (rows, n, d), jnp.bfloat16)
        k = jax.random.normal(kk, (case.batch, kh, case.max_len, d), jnp.bfloat16)
        v = jax.random.normal(kv, (case.batch, kh, case.max_len, d), jnp.bfloat16)
        sets.append((q, k, v, starts, ints(case.cached), ints(case.new)))
    return sets, copies


def reference(case: Case):
    """Float32 XLA attention of the case's flat queries over the cache (one kv head at a time: T x S x G floats)."""
    n, kh, d = case.heads
    group, keys = n // kh, case.cached + case.new

    def fn(q, k, v, *_):
        q = q.reshape(case.batch, case.new, kh, group, d).astype(jnp.float32)  # [B, T, K, G, D]
        pos = case.cached + jnp.arange(case.new)
        mask = jnp.arange(keys)[None, :] <= pos[:, None]  # [T, S']

        def head(h):
            s = jnp.einsum("btgd,bsd->btgs", q[:, :, h], k[:, h, :keys].astype(jnp.float32)) * d**-0.5
            p = jax.nn.softmax(jnp.where(mask[None, :, None], s, -jnp.inf), axis=-1)
            return jnp.einsum("btgs,bsd->btgd", p, v[:, h, :keys].astype(jnp.float32))

        out = jax.lax.map(head, jnp.arange(kh))  # [K, B, T, G, D]
        return jnp.moveaxis(out, 0, 2).reshape(case.batch * case.new, n, d)

    return jax.jit(fn)


def smoke_time(fn, arg_sets, est_s: float) -> dict:
    """The smoke run's timing: compile, then the median wall time of three calls (no profiler, no chain)."""
    del est_s
    fn = jax.jit(fn)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    compile_s = time.perf_counter() - t0
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[0]))
        samples.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "method": "wall (smoke)", "time_s": sorted(samples)[1], "spread_s": 0.0}


def jkv_rows(case: Case, smoke: bool, configs=(), ws_configs=()) -> dict:
    """``name: (fn, set transform)`` of jkv's kernels that this process can run (Triton module imported lazily);
    ``configs``, ``ws_configs``: Mosaic GPU launch parameters ``"block_q/heads_per_tile/block_k/num_stages"``
    timed beside the default (rows ``mgpu[...]``; ``mgpu_ws[...]``, ``mgpu_ws_pp[...]`` and on the chunk
    ``mgpu_ws_paged_pp[...]``); ``auto`` and ``auto_paged``: ``pallas_kernels.dispatch``'s choice."""
    from pallas_kernels import backend

    rows = {}
    if smoke:
        return rows
    pages = lambda sets: paged_sets(sets, seed=1)  # the chunk's rows over pages: page-16 pools, a permuted table
    if backend.mosaic_gpu_usable():
        from pallas_kernels import dispatch
        from pallas_kernels import multi_token_mgpu as mgpu

        rows["mgpu"] = (mgpu.multi_token_attention_mgpu, None)
        from pallas_kernels.multi_token_mgpu_ws import multi_token_attention_mgpu_ws

        pingpong = dispatch.ws_config(*case.heads, jnp.bfloat16)  # the dispatched launch
        rows["mgpu_ws"] = (multi_token_attention_mgpu_ws, None)
        rows["mgpu_ws_pp"] = (functools.partial(multi_token_attention_mgpu_ws, config=pingpong), None)
        if case.batch == 1 and case.cached:  # the chunk: the same kernel through a permuted page-16 block table
            from pallas_kernels.multi_token_mgpu_paged import multi_token_attention_mgpu_paged

            rows["mgpu_paged"] = (multi_token_attention_mgpu_paged, pages)
            from pallas_kernels.multi_token_mgpu_ws_paged import multi_token_attention_mgpu_ws_paged

            rows["mgpu_ws_paged"] = (multi_token_attention_mgpu_ws_paged, pages)
            rows["mgpu_ws_paged_pp"] = (functools.partial(multi_token_attention_mgpu_ws_paged, config=pingpong), pages)
        parse = lambda text: mgpu.MgpuMultiTokenConfig(*(int(x) for x in text.split("/")))
        for text in configs:
            rows[f"mgpu[{text}]"] = (functools.partial(mgpu.multi_token_attention_mgpu, config=parse(text)), None)
        for text in ws_configs:
            for row, pp in (("mgpu_ws", False), ("mgpu_ws_pp", True)):
                config = parse(text)._replace(pingpong=pp)
                rows[f"{row}[{text}]"] = (functools.partial(multi_token_attention_mgpu_ws, config=config), None)
            if case.batch == 1 and case.cached:
                config = parse(text)._replace(pingpong=True)
                fn = functools.partial(multi_token_attention_mgpu_ws_paged, config=config)
                rows[f"mgpu_ws_paged_pp[{text}]"] = (fn, pages)
        rows["auto"] = (dispatch.multi_token_attention_auto, None)  # what the attention API runs
        if case.batch == 1 and case.cached:
            rows["auto_paged"] = (dispatch.paged_multi_token_attention_auto, pages)
    try:
        triton = importlib.import_module("pallas_kernels.multi_token")
    except ImportError:
        return rows
    rows["triton"] = (triton.multi_token_attention, None)
    package = importlib.import_module("pallas_kernels")  # the paged entry lives in its own module
    paged = next((getattr(m, e) for m in (triton, package) for e in PAGED_ENTRIES if hasattr(m, e)), None)
    if paged is not None and case.batch == 1 and case.cached:
        rows["triton_paged"] = (paged, pages)
    return rows


# ----------------------------------------------------------------------------------------------- timing


def bench_case(
    name: str, case: Case, torch, *, rounds: int, smoke: bool, log, configs=(), ws_configs=(), only=None
) -> dict:
    sets, copies = case_sets(case, seed=zlib.crc32(name.encode()), rotate_bytes=0 if smoke else common.ROTATE_BYTES)
    work = flops(case)
    est_s = work / 300e12 + 10e-6
    ref = reference(case)(*sets[0])
    results, samplers = {}, {}

    def record(row, fn, arg_sets, to_flat=lambda out: out):
        try:
            err = common.rel_err(to_flat(fn(*arg_sets[0])), ref)
            timing = (smoke_time if smoke else common.time_jax)(fn, arg_sets, est_s)
        except Exception as e:  # a row that does not lower or run here is reported, not fatal
            results[row] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
            log(f"  {row:14s} ERROR {results[row]['error'][:600]}")
            return
        tflops = work / timing["time_s"] / 1e12
        results[row] = {**timing, "tflops": tflops, "rel_err": err}
        log(
            f"  {row:14s} {timing['time_s'] * 1e6:10.1f} us {tflops:7.1f} TFLOP/s  err {err:.1e}  "
            f"compile {timing['compile_s']:.1f}s"
        )
        if rounds and not smoke:
            samplers[row] = common.jax_sampler(fn, arg_sets, est_s)

    flat = lambda out: out.reshape(case.batch * case.new, *case.heads[::2])
    for row, (fn, transform) in jkv_rows(case, smoke, configs, ws_configs).items():
        if only is None or row in only or row.split("[")[0] in only:
            record(row, fn, transform(sets) if transform else sets)
    dsets = dpa_sets(case, sets)
    record("xla" if smoke else "cudnn", dpa(case, "xla" if smoke else "cudnn"), dsets, flat)
    del dsets
    if smoke:
        record("xla_ref", reference(case), sets)
    if case.new <= 8 and not smoke:  # verification: the T = 1 decode kernel over the same batch
        from pallas_kernels import dispatch

        first = lambda q: q.reshape(case.batch, case.new, *q.shape[1:])[:, 0]
        dec = [(first(q), k, v, n + 1) for q, k, v, _, n, _ in sets]
        results["decode"] = common.time_jax(dispatch.decode_attention_auto, dec, est_s / case.new)
        log(f"  {'decode':14s} {results['decode']['time_s'] * 1e6:10.1f} us (T = 1, the same batch)")
        if rounds:
            samplers["decode"] = common.jax_sampler(dispatch.decode_attention_auto, dec, est_s / case.new)
    if torch is not None and not smoke:
        results["torch_flash"], sampler = bench_torch(torch, case, sets, ref, work, est_s, sample=rounds > 0, log=log)
        if sampler is not None:
            samplers["torch_flash"] = sampler
    out = {"case": name, **case._asdict(), "flops": work, "rotating_copies": copies, "results": results}
    if len(samplers) > 1 and "cudnn" in samplers:
        out["interleaved"] = inter = common.interleaved(samplers, rounds, baseline="cudnn")
        for row, r in inter.items():
            x = r["speed_vs_cudnn"]
            log(
                f"  interleaved {row:14s} {r['time_s'] * 1e6:10.1f} us  vs cudnn: median {x['median']:.3f} "
                f"({x['min']:.3f}-{x['max']:.3f})"
            )
    return out


def table(reports: list[dict]) -> str:
    """us per call (TFLOP/s) per case and row; jkv's speed against cuDNN (> 1: faster; interleaved medians where
    timed so): ``auto/cudnn`` the dispatch's kernel (what the attention API runs; ``mgpu`` where no ``auto`` row
    ran), ``paged/cudnn`` its paged kernel (the fastest paged Mosaic GPU row where no ``auto_paged`` ran); and the
    verification's time over the decode step's (issue 20: <= 1.3)."""
    rows = (
        "mgpu",
        "mgpu_ws",
        "mgpu_ws_pp",
        *PAGED_ROWS,
        "auto",
        "auto_paged",
        "triton",
        "triton_paged",
        "cudnn",
        "torch_flash",
        "xla",
        "xla_ref",
        "decode",
    )
    swept = sorted({r for rep in reports for r in rep["results"] if r.startswith(("mgpu[", "mgpu_ws"))} - set(rows))
    present = [r for r in (*rows[:1], *swept, *rows[1:]) if any(r in rep["results"] for rep in reports)]
    lines = [
        f"{'case':>12} "
        + " ".join(f"{r:>17}" for r in present)
        + f" {'auto/cudnn':>10} {'paged/cudnn':>11} {'verify/decode':>13}"
    ]
    for rep in reports:
        res, inter = rep["results"], rep.get("interleaved", {})
        t = lambda r, res=res, inter=inter: inter.get(r, res.get(r, {})).get("time_s", float("nan"))
        cell = lambda r, res=res, t=t: f"{t(r) * 1e6:8.1f} ({res.get(r, {}).get('tflops', float('nan')):6.1f})"
        fastest = lambda rows, t=t: min((x for x in map(t, rows) if not math.isnan(x)), default=math.nan)
        best = fastest(("mgpu", "mgpu_ws", "mgpu_ws_pp", "auto", "triton"))
        paged = t("auto_paged") if not math.isnan(t("auto_paged")) else fastest(PAGED_ROWS)
        auto = t("auto") if not math.isnan(t("auto")) else t("mgpu")  # runs without the auto row: the first kernel
        lines.append(
            f"{rep['case']:>12} "
            + " ".join(f"{cell(r):>17}" for r in present)
            + f" {t('cudnn') / auto:10.2f} {t('cudnn') / paged:11.2f} {best / t('decode'):13.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (0: none)")
    parser.add_argument("--configs", nargs="*", default=[], help="Mosaic GPU launch parameters bq/heads/bk/stages")
    parser.add_argument("--ws-configs", nargs="*", default=[], help="the same for mgpu_ws and mgpu_ws_pp")
    parser.add_argument("--rows", nargs="*", default=None, help="jkv rows to time (default: all; peers always)")
    parser.add_argument("--no-torch", action="store_true", help="leave torch SDPA out")
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("JKV_PREFILL_SMOKE") == "1")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch = None if args.smoke or args.no_torch else torch_peers.load_torch()
    log, cases = common.log, SMOKE_CASES if args.smoke else CASES
    path = args.out / "bench_prefill.jsonl"
    meta = {**common.meta(torch), "smoke": args.smoke}
    log(json.dumps(meta))
    reports, sweeps = [], dict(configs=args.configs, ws_configs=args.ws_configs, only=args.rows)
    for name in args.cases:
        case = cases[name]
        log(
            f"{name}: B={case.batch} cached={case.cached} new={case.new} S={case.max_len} heads={case.heads}, "
            f"{flops(case) / 1e9:.1f} GFLOP"
        )
        reports.append(bench_case(name, case, torch, rounds=args.rounds, smoke=args.smoke, log=log, **sweeps))
        with path.open("a") as f:
            f.write(json.dumps({"meta": meta, **reports[-1]}) + "\n")
        jax.clear_caches()
    log(f"total {time.perf_counter() - start:.0f} s")
    log(table(reports))


if __name__ == "__main__":
    main()
