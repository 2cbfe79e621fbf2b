"""Decode attention (T = 1) of every jkv cache kind against torch SDPA and jax's cuDNN attention, in one run.

Shapes (``bench/decode_kinds.py``; ``--shapes`` picks a subset or adds others): 1x4096, 1x131072, 16x8192,
128x2048, 256x1024 at Hq/Hkv/D 32/8/128; 4x4096 MHA 32/32/128; 32x2048 at 9/3/64; 8x4096 at 16/8/256; 16x8192 at
32/4/128 (GQA 8); 16x4096 at 32/32/96 (Phi-3-mini's MHA heads; the Q8 rows also in their other column form); and
a ragged batch ``32xr256-16384`` (32 lengths drawn in 256..16384, the same every run). Rows:

* ``jkv_auto``: ``pallas_kernels.dispatch.decode_attention_auto`` (what jkv runs for a contiguous bf16 cache),
  ``jkv_triton`` / ``jkv_mgpu``: its Triton (``decode``) and Mosaic GPU (``decode_mgpu``) kernels, default launch;
* ``paged_triton`` / ``paged_mgpu``: ``paged`` and ``decode_mgpu_paged`` on the same contents in pages of 16
  at permuted places of a pool;
* ``q8_triton`` / ``q8paged_triton``: ``decode_q8`` and ``paged_q8`` on the same K/V quantized (int8 codes,
  float16 scales per 32 values), contiguous and in the same pages; ``q8_mgpu``: ``decode_mgpu_q8`` (Mosaic GPU)
  on the contiguous Q8 cache; at a head_dim that is not a power of two also those kernels in the column form
  their default does not take (``decode_kinds.column_rows``: ``q8parts_triton`` / ``q8pagedparts_triton`` where
  they pad, ``q8pad_triton`` / ``q8pagedpad_triton`` where they read power-of-two parts); at a head_dim the bf16
  kernels pad (80, 48) ``jkv_s3_triton``, the contiguous kernel at 3 stages; ``fp8_triton`` / ``fp8paged_triton``:
  ``decode_fp8``'s kernels on the same K/V in FP8 (e4m3 values, a float32 scale per position), contiguous and
  in the same pages; ``fp8_mgpu``: ``decode_mgpu_q8``'s FP8 kernel (Mosaic GPU) on the contiguous FP8 cache;
* ``jax_cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on ``[B, S, K, D]`` K/V (transposed
  outside the timing), the lengths as ``key_value_seq_lengths`` where ragged;
* ``torch_cudnn`` / ``torch_flash``: ``scaled_dot_product_attention`` (``enable_gqa``) forced to that backend,
  where it runs. torch takes no lengths: on the ragged batch it reads every sequence to the longest (padded).

Method (``bench/common.py``): each row is first checked against the XLA reference on the first input set
(relative error; Q8/FP8 rows over the dequantized cache, padded rows against the full-length one), its first call
timed (compile included); a row that fails to lower, run or check is recorded with its error and the run goes on.
Then every row that passed is timed in ``--rounds`` interleaved rounds (``common.interleaved``: JAX rows as chained
programs read from profiler traces, torch rows as CUDA graphs), and its per-round speed against ``torch_cudnn``
(else ``jkv_auto``, else the first row timed) is reported. TB/s = K+V bytes the lengths hold (Q8/FP8: values and
scales) / median time. Ceilings measured in the same run: a 1 GiB read stream (``common.read_bandwidth``)
and a 1 GiB device copy (``torch_peers.copy_bandwidth``, read + write; needs torch). Before the shapes, the Mosaic GPU
rows (``--preflight``) run once in a child process (``bench/preflight.py``): one that crashes, hangs or misses
the reference there is recorded and not run here (a crash would poison this process's CUDA context).

``--smoke``: the shapes at CPU size (``decode_kinds.smoke_shape``), Triton kernels in interpret mode, jax's XLA
path in cuDNN's place, no torch, wall-clock samples; the Mosaic GPU rows and every kernel's GPU path are lowered
for CUDA instead of run (``--lower-only``: only that, at the shapes' real sizes, no arrays made).

Usage: ``python bench/bench_decode_kinds.py --out DIR [--rounds 5] [--budget-s 420] [--shapes 1x4096 ...]
[--rows jkv_mgpu torch_cudnn ...] [--launches jkv_triton@128,8,-,- ...] [--resume DIR/bench_decode_kinds.json]``.
``--launches`` adds launch-sweep rows (``decode_kinds.launch_rows``: a Triton row with its block, splits, warps and
stages fixed, ``,fused`` its splits merged inside the kernel) timed in the same rounds as the others. Writes
``DIR/bench_decode_kinds.json`` after every shape (``--resume`` keeps a time-limited run's shapes and adds the rest) and
``DIR/bench_decode_kinds.png`` (matplotlib, where importable; ``--replot JSON`` draws it later); prints a table
last.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench import common, preflight, torch_peers
from bench import decode_kinds as kinds
from bench.bench_prefill import smoke_time
from bench.decode_kinds_report import plot, shape_lines, table

NAN = float("nan")
# the kernels new to the GPU: preflighted in a child process
MGPU_ROWS = ("jkv_mgpu", "paged_mgpu", "q8_mgpu", "fp8_mgpu")
TORCH_ROWS = {"torch_cudnn": "CUDNN_ATTENTION", "torch_flash": "FLASH_ATTENTION"}  # torch SDPA backends


def wall_sampler(fn, arg_sets):
    """The smoke run's sample: wall time of one call (compiled already), the input sets rotated."""
    turn = itertools.count()

    def sample():
        args = arg_sets[next(turn) % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0

    return sample


def check(results, name, run, ref, extra=None) -> bool:
    """Run ``run()`` once (compiling it), record its relative error against ``ref`` and the first call's time;
    False (and the error recorded) where it fails or misses :data:`kinds.TOL`."""
    try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(run())
        first = time.perf_counter() - t0
        err = common.rel_err(out, ref)
    except Exception as e:  # a row that does not lower or run here is reported, not fatal
        results[name] = {"error": f"{type(e).__name__}: {str(e)[:1500]}", **(extra or {})}
        common.log(f"  checked {name}: {results[name]['error'][:300]}")
        return False
    results[name] = {"rel_err": err, "first_call_s": first, **(extra or {})}
    if not err <= kinds.TOL:
        results[name]["error"] = f"check failed: relative error {err:.3g} > {kinds.TOL}"
    common.log(f"  checked {name}: relative error {err:.1e}, first call {first:.1f} s")
    return "error" not in results[name]


def jax_part(shape, rows, sets, refs, est_s, results, samplers, *, smoke: bool, blocked) -> None:
    """Check jkv's kernels and jax's attention and make their samplers; in a smoke run, lower the Mosaic GPU rows
    (and every row's GPU path) for CUDA instead of running them there."""
    for name, row in rows.items():
        extra = {"fmt": row.fmt, "layout": row.layout}
        if name == "jkv_auto":
            extra["picks"] = kinds.auto_choice(shape)
            if extra["picks"] == "mgpu" and "jkv_mgpu" in blocked:
                blocked = {**blocked, name: f"takes jkv_mgpu's kernel, which failed: {blocked['jkv_mgpu']}"}
        if name in blocked:
            results[name] = {**extra, "error": blocked[name]}
            continue
        if row.refused:
            results[name] = {**extra, "error": f"refused: {row.refused}"}
            continue
        if smoke and row.mgpu:
            try:
                results[name] = {**extra, **kinds.lower_for_cuda(row.fn, sets[row.layout][0])}
            except Exception as e:
                results[name] = {**extra, "error": f"lowering for CUDA: {type(e).__name__}: {str(e)[:1500]}"}
            continue
        fn = jax.jit(row.fn)
        ref = refs[row.fmt]
        if not check(results, name, lambda fn=fn, row=row: fn(*sets[row.layout][0]), ref, extra):
            continue
        try:
            if smoke:
                samplers[name] = wall_sampler(fn, sets[row.layout])
                if name != "jax_xla":  # the GPU path of a kernel that just ran in interpret mode
                    results[name]["gpu_lowering"] = kinds.lower_for_cuda(row.fn, sets[row.layout][0])
            else:
                samplers[name] = common.jax_sampler(row.fn, sets[row.layout], est_s)
        except Exception as e:
            results[name]["error"] = f"timing setup: {type(e).__name__}: {str(e)[:1500]}"


def torch_part(torch, shape, sets, refs, est_s, results, samplers, only) -> None:
    """torch SDPA forced to cuDNN and to flash attention (q_len 1, ``enable_gqa``), where each runs."""
    from torch.nn.attention import SDPBackend

    tsets = torch_peers.torch_inputs(torch, sets["bf16"])
    padded = {"padded_to": shape.seq} if shape.lengths else {}
    for name in TORCH_ROWS:
        if only and name not in only:
            continue
        fn = torch_peers.torch_sdpa(getattr(SDPBackend, TORCH_ROWS[name]))

        def run(fn=fn):
            out = fn(*tsets[0])[:, :, 0]
            torch.cuda.synchronize()
            return jnp.asarray(out.float().cpu().numpy())

        if check(results, name, run, refs["full"], {"fmt": "bf16", "layout": "bf16", **padded}):
            try:
                samplers[name] = torch_peers.torch_sampler(torch, fn, tsets, est_s)
            except Exception as e:
                results[name]["error"] = f"CUDA graph: {type(e).__name__}: {str(e)[:1500]}"


def guarded(name, sampler, results):
    """``sampler``, except that a sample that raises records the error in the row and gives NaN from then on."""

    def sample():
        if "error" not in results[name]:
            try:
                return sampler()
            except Exception as e:
                results[name]["error"] = f"timing: {type(e).__name__}: {str(e)[:1500]}"
        return NAN

    return sample


def bench_shape(
    shape, torch, *, rounds: int, smoke: bool, read_tbps: float, log, only=None, blocked=None, launches=()
) -> dict:
    """Every row (``only``: those named; ``blocked``: rows not to run, with the reason; ``launches``: the launch
    rows of ``kinds.launch_rows`` besides) at one shape: checked, then timed in interleaved rounds."""
    rows = {name: row for name, row in kinds.jax_rows(shape, smoke).items() if not only or name in only}
    rows.update(kinds.launch_rows(launches, shape, smoke))
    layouts = {row.layout for row in rows.values() if row.refused is None}  # a refused row's inputs: not made
    sets, copies, est_s = kinds.shape_inputs(shape, 0 if smoke else common.ROTATE_BYTES, layouts)
    refs = kinds.references(shape, sets)
    results, samplers = {}, {}
    jax_part(shape, rows, sets, refs, est_s, results, samplers, smoke=smoke, blocked=blocked or {})
    if torch is not None:
        torch_part(torch, shape, sets, refs, est_s, results, samplers, only)
    baseline = next((b for b in ("torch_cudnn", "jkv_auto") if b in samplers), next(iter(samplers), None))
    if baseline is not None:
        samplers = {name: guarded(name, sampler, results) for name, sampler in samplers.items()}
        for name, r in common.interleaved(samplers, rounds, baseline=baseline).items():
            if "error" in results[name]:
                continue
            speed = r.pop(f"speed_vs_{baseline}")
            tbps = kinds.kv_bytes(shape, results[name]["fmt"]) / r["time_s"] / 1e12
            results[name].update(r, speed_vs_baseline=speed, tbps=tbps, of_read=tbps / read_tbps)
    report = {
        **shape._asdict(),
        "kv_bytes": {fmt: kinds.kv_bytes(shape, fmt) for fmt in ("bf16", "q8")},
        "page_size": kinds.PAGE_SIZE,
        "rotating_copies": copies,
        "baseline": baseline,
        "results": results,
    }
    del sets, refs, samplers
    for line in shape_lines(report):
        log(line)
    return report


def start_run(args, torch, log, previous=()) -> dict:
    """The run's metadata, its ceilings (read stream; copy where torch runs) and, on a GPU, the preflight of the
    rows named by ``--preflight`` (``bench/preflight.py``; a resumed run on the same GPU kind reuses the verdicts
    of the ``previous`` runs)."""
    from pallas_kernels import backend

    run = {"meta": {**common.meta(torch), "smoke": args.smoke}}
    log(json.dumps(run["meta"]))
    run["read"] = common.read_bandwidth(1 << 22, smoke_time) if args.smoke else common.read_bandwidth()
    if torch is not None:
        run["copy"] = torch_peers.copy_bandwidth(torch)
    log(f"read stream {run['read']['tbps']:.3f} TB/s, copy {run.get('copy', {}).get('tbps', NAN):.3f} TB/s")
    names = [name for name in args.preflight if not args.rows or name in args.rows]
    earlier = {
        k: v for r in previous if r["meta"]["gpu"] == run["meta"]["gpu"] for k, v in r.get("preflight", {}).items()
    }
    if names and all(name in earlier for name in names):
        run["preflight"] = {name: earlier[name] for name in names}
        log(f"preflight verdicts of the resumed run: {json.dumps(run['preflight'])[:3000]}")
    elif names and not args.smoke and backend.on_gpu():
        t0 = time.perf_counter()
        run["preflight"] = preflight.preflight(names)
        log(f"preflight ({time.perf_counter() - t0:.0f} s): {json.dumps(run['preflight'])[:3000]}")
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--shapes", nargs="*", default=list(kinds.SHAPE_NAMES), help="BxS[:N/K/D] or Bxr<lo>-<hi>")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no shape after this many seconds")
    parser.add_argument("--rows", nargs="*", help="only these rows (default: all), e.g. jkv_mgpu torch_cudnn")
    parser.add_argument("--resume", type=Path, help="a previous run's JSON: keep its shapes, run the others")
    parser.add_argument("--preflight", nargs="*", default=list(MGPU_ROWS), help="rows run in a child process first")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized shapes, interpret mode, no torch")
    parser.add_argument("--lower-only", action="store_true", help="only lower every GPU path for CUDA")
    parser.add_argument(
        "--launches", nargs="*", default=[], help="launch rows ROW@BLOCK,SPLITS,WARPS,STAGES[,fused] ('-': the default)"
    )
    parser.add_argument("--replot", type=Path, help="only draw the plot and table of a saved JSON into --out")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least one round is needed")
    column_rows = {**kinds.column_rows(96), **kinds.column_rows(160), **kinds.stage_rows(80)}
    known = [*kinds.jax_rows(kinds.parse_shape("1x64"), smoke=False), *column_rows, "jax_xla", *TORCH_ROWS]
    if unknown := [name for name in (args.rows or []) + args.preflight if name not in known]:
        parser.error(f"no rows {unknown}; expected some of {known}")
    for spec in args.launches:
        try:
            kinds.parse_launch(spec)
        except ValueError as e:
            parser.error(str(e))
    start, log = time.perf_counter(), common.log
    if args.lower_only:
        return kinds.lower_all(args.shapes, args.smoke, log, args.rows)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        plot(report := json.loads(args.replot.read_text()), args.out / "bench_decode_kinds.png", log)
        log(table(report))
        return report
    torch = None if args.smoke else torch_peers.load_torch()
    report = json.loads(args.resume.read_text()) if args.resume else {"runs": [], "shapes": []}
    report["shapes"] = [s for s in report["shapes"] if "error" not in s]  # a resumed run retries failed shapes
    report["runs"].append(run := start_run(args, torch, log, report["runs"]))
    blocked = {name: f"preflight: {why}" for name, why in run.get("preflight", {}).items() if why}
    done, path, report["not_run"] = {s["name"] for s in report["shapes"]}, args.out / "bench_decode_kinds.json", []
    for text in args.shapes:
        shape = kinds.parse_shape(text)
        shape = kinds.smoke_shape(shape) if args.smoke else shape
        if shape.name in done:
            continue
        if time.perf_counter() - start > args.budget_s:
            report["not_run"].append(text)
            log(f"{text}: not started (--budget-s {args.budget_s:.0f} spent; --resume {path} runs it)")
            continue
        t0 = time.perf_counter()
        lengths = f", lengths {min(shape.lengths)}..{max(shape.lengths)}" if shape.lengths else ""
        log(f"{shape.name}: B={shape.batch} S={shape.seq} N/K/D={shape.heads}{lengths}")
        try:
            row = bench_shape(
                shape,
                torch,
                rounds=args.rounds,
                smoke=args.smoke,
                read_tbps=run["read"]["tbps"],
                log=log,
                only=args.rows,
                blocked=blocked,
                launches=args.launches,
            )
        except Exception as e:  # e.g. out of memory building the inputs: the other shapes still run
            row = {**shape._asdict(), "error": f"{type(e).__name__}: {str(e)[:1500]}", "baseline": None, "results": {}}
            log(f"  shape failed: {row['error']}")
        report["shapes"].append({**row, "run": len(report["runs"]) - 1, "wall_s": time.perf_counter() - t0})
        path.write_text(json.dumps(report, indent=1))
        gc.collect()
        jax.clear_caches()
        if torch is not None:
            torch.cuda.empty_cache()
    path.write_text(json.dumps(report, indent=1))
    try:
        plot(report, args.out / "bench_decode_kinds.png", log)
    except Exception as e:  # the JSON is written already
        log(f"plot failed: {type(e).__name__}: {e}")
    log(f"total {time.perf_counter() - start:.0f} s")
    log(table(report))
    return report


if __name__ == "__main__":
    main()
