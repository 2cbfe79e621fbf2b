"""Decode-attention bandwidth on one GPU: jkv's Pallas kernel against its peers, measured in one run.

For bf16, N=32 query heads, K=8 kv heads, D=128 and each B x T (every sequence full, lengths = T), it times

* ``jkv``: ``pallas_kernels.decode_attention`` (the Triton kernel) with its default launch parameters, then a
  sweep of block sizes, splits, warps and stages (the best is reported beside the default),
* ``jkv_auto``: ``pallas_kernels.decode_attention_mgpu.decode_attention_auto``, what ``jkv.decode_attention``
  runs for a contiguous cache: the Mosaic GPU kernel where ``prefer_mgpu`` picks it, else the Triton kernel,
* ``jkv_5d``: the same kernel reading one layer of a two-layer ``[L, B, K, S, D]`` cache with a traced layer
  index (shows that the layer is not copied out of the cache),
* ``xla_ref``: ``pallas_kernels.decode_attention_reference`` (pure jnp) under ``jax.jit``,
* ``jax_gqa``: ``jax.experimental.pallas.ops.gpu.decode_attention.gqa`` (its own ``[B, S, K, D]`` layout, which
  it transposes inside the call; its default block sizes),
* ``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with q_len 1 and ``enable_gqa=True``
  (default backend choice; the flash / efficient / cuDNN backends are also timed one by one where they run),
* ``copy``: a 1 GiB device-to-device copy (``torch`` ``copy_``), the bandwidth ceiling.

Bandwidth formula: TB/s = bytes of K and V read (2 * B * K * T * D * 2) / median time per call; the copy counts
bytes read plus bytes written. Timing: JAX calls are unrolled inside one jitted program, each call's output the
next call's query so none is merged or dropped, and the time per call comes from the device spans of a profiler
trace (else the difference between programs of 2n and n calls, so dispatch cancels); torch calls are captured
in CUDA graphs of n and 2n calls, timed with CUDA events. Inputs rotate over enough copies to exceed 4x the L2
cache. Every variant is checked against the XLA reference (relative error) before it is timed. Compile time is
reported apart.

Usage: ``python scripts/bench_attention.py --out DIR [--budget-s 330] [--no-sweep] [--shapes 1x4096 64x8192]``.
Writes ``DIR/bench_attention.json`` (after every shape) and ``DIR/bench_attention.png``; prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jkv.caches.formats import quantize
from pallas_kernels import backend, q8
from pallas_kernels import decode_attention as kernels
from pallas_kernels import decode_attention_mgpu as mgpu

SHAPES = ((1, 4096), (1, 32768), (8, 4096), (8, 16384), (32, 4096), (64, 8192))
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
ROTATE_BYTES = 200e6  # > 4x the 50 MB L2 of an H100
TARGET_RUN_S = 2e-3  # device time of one timed program
CTAS = None  # set by --ctas: (program counts, block sizes) for a focused sweep


def kv_bytes(batch: int, seq: int) -> int:
    return 2 * batch * NUM_KV_HEADS * seq * HEAD_DIM * 2


# ----------------------------------------------------------------------------------------------- timing


def _chained(fn, reps: int):
    """One jitted program calling ``fn`` ``reps`` times over rotating K/V sets, in order, none merged or dropped.

    Each call's output ``[B, N, D]`` is the next call's query: a true data dependency, so XLA can neither
    common up nor drop calls (a barrier-only chain was seen to let it drop them). A peer that returns another
    dtype than ``q`` (jax's ``gqa`` returns float32) gets a cast back, one tiny op per call.
    """

    def run(arg_sets):
        out = arg_sets[0][0]
        for i in range(reps):
            _, *rest = arg_sets[i % len(arg_sets)]
            out = fn(out, *rest).astype(arg_sets[0][0].dtype)
        return out

    return jax.jit(run)


def _wall(run, arg_sets) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(run(arg_sets))
    return time.perf_counter() - t0


def device_spans(plane_prefix: str, events_of) -> list[float]:
    """Seconds from the first kernel's start to the last kernel's end of each traced execution.

    ``events_of`` yields ``(plane, line)`` pairs' events as ``(start_ns, end_ns)``; executions are told apart by
    gaps over 1 ms (inside one program the kernels follow each other within microseconds).
    """
    spans = sorted(events_of(plane_prefix))
    clusters, first, last = [], None, None
    for start, end in spans:
        if last is not None and start - last > 1e6:
            clusters.append((last - first) * 1e-9)
            first = None
        first = start if first is None else first
        last = end if last is None else max(last, end)
    if first is not None:
        clusters.append((last - first) * 1e-9)
    return clusters


def _trace(run, arg_sets, executions: int, plane_prefix: str) -> list[tuple[str, int, int]]:
    """``(name, start_ns, end_ns)`` of every GPU stream activity (CUPTI's kernels, memsets, memcpys) on the planes
    named ``plane_prefix...`` of a JAX profiler trace of ``executions`` runs of ``run``, 5 ms apart."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(executions):
            jax.block_until_ready(run(arg_sets))
            time.sleep(0.005)  # a gap the clustering sees
        jax.profiler.stop_trace()
        data = ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    return [
        (e.name, e.start_ns, e.start_ns + e.duration_ns)
        for plane in data.planes
        if plane.name.startswith(plane_prefix)
        for line in plane.lines
        if line.name.startswith("Stream")
        for e in line.events
    ]


def _profile(run, arg_sets, executions: int, plane_prefix: str) -> list[float]:
    """Device time of each of ``executions`` runs of ``run``, read from a JAX profiler trace (CUPTI on GPU)."""
    events = _trace(run, arg_sets, executions, plane_prefix)
    return device_spans(plane_prefix, lambda prefix: ((start, end) for _, start, end in events))


def kernel_breakdown(fn, arg_sets, est_s: float) -> dict:
    """Device time per call of each kernel ``fn`` launches (summed over the traced calls, divided by the
    calls), and the span per call, from one profiled execution of a chained program: how much of a call
    is the attention kernel, the merge, copies, and the gaps between them."""
    reps = _jax_reps(est_s)
    run = _chained(fn, reps)
    _wall(run, arg_sets)
    _wall(run, arg_sets)
    events = _trace(run, arg_sets, 1, "/device:GPU")
    per_kernel = {}
    for name, start, end in events:
        per_kernel[name] = per_kernel.get(name, 0.0) + (end - start) * 1e-9 / reps
    if not events:
        return {"span_s": float("nan"), "kernels_s": {}, "gaps_s": float("nan")}
    span = (max(e for _, _, e in events) - min(s for _, s, _ in events)) * 1e-9 / reps
    return {"span_s": span, "kernels_s": per_kernel, "gaps_s": span - sum(per_kernel.values())}


def time_jax(fn, arg_sets, est_s: float, trials: int = 5) -> dict:
    """Per-call device time of ``fn`` (median over traced executions of a chained program).

    Primary: the device span of each execution in a profiler trace, divided by the calls (host dispatch noise
    stays out; gaps between kernels stay in, as in a CUDA-graph replay). Fallback where the trace holds no GPU
    stream: wall clock of programs of 2n and n calls, differenced (dispatch cancels).
    """
    reps = _jax_reps(est_s)
    t0 = time.perf_counter()
    run = _chained(fn, reps)
    jax.block_until_ready(run(arg_sets))
    compile_s = time.perf_counter() - t0
    _wall(run, arg_sets)  # warm
    result = {"compile_s": compile_s, "calls_per_program": reps}
    try:
        spans = [t / reps for t in _profile(run, arg_sets, trials, "/device:GPU")]
    except Exception as e:  # no profiler here: fall back to the wall clock
        spans, result["profiler_error"] = [], f"{type(e).__name__}: {e}"[:200]
    if len(spans) == trials:
        return {**result, "method": "profiler", "time_s": statistics.median(spans), "spread_s": max(spans) - min(spans)}
    long = _chained(fn, 2 * reps)
    jax.block_until_ready(long(arg_sets))
    samples = [(_wall(long, arg_sets) - _wall(run, arg_sets)) / reps for _ in range(trials + 2)]
    return {
        **result,
        "method": "wall-difference",
        "time_s": statistics.median(samples),
        "spread_s": max(samples) - min(samples),
    }


def _torch_replay(torch, fn, arg_sets, reps: int):
    """``replay(n)``: seconds of one replay of a CUDA graph of ``n`` calls (``n`` is ``reps`` or ``2 * reps``;
    both graphs captured here after a warm-up off the capture, as CUDA graphs require), CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.current_stream().wait_stream(stream)
    graphs = {}
    for n in (reps, 2 * reps):
        graphs[n] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[n]):
            for i in range(n):
                fn(*arg_sets[i % len(arg_sets)])

    def replay(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs[n].replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    for n in graphs:
        replay(n)
    return replay


def _torch_reps(est_s: float) -> int:
    return int(min(32, max(3, math.ceil(TARGET_RUN_S / est_s))))


def time_torch(torch, fn, arg_sets, est_s: float, trials: int = 7) -> dict:
    reps = _torch_reps(est_s)
    replay = _torch_replay(torch, fn, arg_sets, reps)
    samples = [(replay(2 * reps) - replay(reps)) / reps for _ in range(trials)]
    return {"time_s": statistics.median(samples), "spread_s": max(samples) - min(samples), "compile_s": 0.0}


def _jax_reps(est_s: float) -> int:
    return int(min(64, max(8, math.ceil(TARGET_RUN_S / est_s))))


def jax_sampler(fn, arg_sets, est_s: float, executions: int = 3):
    """A callable giving one sample of ``fn``'s per-call device time (median of ``executions`` traced runs of a
    chained program compiled and warmed here once), for interleaving variants round by round."""
    reps = _jax_reps(est_s)
    run = _chained(fn, reps)
    _wall(run, arg_sets)  # compile
    _wall(run, arg_sets)  # warm
    return lambda: statistics.median(_profile(run, arg_sets, executions, "/device:GPU")) / reps


def torch_sampler(torch, fn, arg_sets, est_s: float, executions: int = 3):
    """:func:`jax_sampler` for a torch callable: CUDA graphs of n and 2n calls captured once, each sample the
    median of ``executions`` differences."""
    reps = _torch_reps(est_s)
    replay = _torch_replay(torch, fn, arg_sets, reps)
    return lambda: statistics.median((replay(2 * reps) - replay(reps)) / reps for _ in range(executions))


def interleaved(samplers: dict, rounds: int, baseline: str) -> dict:
    """Time the variants round by round, the order rotated each round (no variant always first or last), so
    drift over a run (clocks, temperature) falls on all of them alike. Returns each variant's median and
    spread, and its per-round speed ratio against ``baseline`` (baseline time / variant time; > 1: faster)."""
    names = list(samplers)
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(samplers[name]())
    out = {}
    for name, xs in samples.items():
        ratios = [b / x for b, x in zip(samples[baseline], xs, strict=True)]
        out[name] = {
            "time_s": statistics.median(xs),
            "spread_s": max(xs) - min(xs),
            "samples_s": xs,
            f"speed_vs_{baseline}": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        }
    return out


def copy_bandwidth(torch, nbytes: int = 1 << 30, trials: int = 20) -> dict:
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    del src, dst
    return {"bytes": 2 * nbytes, "time_s": t, "tbps": 2 * nbytes / t / 1e12}


# ----------------------------------------------------------------------------------------------- shapes


def rel_err(out, ref) -> float:
    out, ref = (np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) for x in (out, ref))
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def cta_configs(default, batch, seq, ctas, blocks) -> list[kernels.DecodeConfig]:
    """A focused stage A: splits giving about ``ctas`` programs in all, for each block size in ``blocks``."""
    out = []
    for block_k in blocks:
        for total in ctas:
            splits = max(1, min(seq // block_k, math.ceil(total / (batch * NUM_KV_HEADS))))
            stages = min(default.num_stages + (block_k < 128), kernels.max_stages(block_k, HEAD_DIM, 2))
            config = default._replace(block_k=block_k, num_splits=splits, num_stages=stages)
            if config != default and config not in out:
                out.append(config)
    return out


def sweep_configs(default: kernels.DecodeConfig, seq: int) -> list[kernels.DecodeConfig]:
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


def stage_b_configs(best: kernels.DecodeConfig) -> list[kernels.DecodeConfig]:
    """Stage B: warps x stages (x where the splits are merged) on stage A's winner."""
    pairs = ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4))
    fused = (True, False) if best.num_splits > 1 else (best.fused_combine,)
    configs = [best._replace(num_warps=w, num_stages=s, fused_combine=f) for w, s in pairs for f in fused]
    return [c for c in configs if c != best]


def launches(fn, args) -> str:
    """Kernels in the compiled program of one call: XLA fusions and custom calls (the Pallas kernel)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    return f"{entry.count(' fusion(')} fusions + {entry.count(' custom-call(')} custom calls"


def bench_shape(torch, batch, seq, *, sweep: bool, quick: bool, stage_b: bool, deadline: float, log) -> dict:
    key = jax.random.key(batch * 100003 + seq)
    nbytes = kv_bytes(batch, seq)
    copies = max(1, math.ceil(ROTATE_BYTES / nbytes))
    est_s = nbytes / 2.5e12 + 5e-6
    lengths = jnp.full((batch,), seq, jnp.int32)
    sets = []
    for i in range(copies):
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, i), 3)
        q = jax.random.normal(kq, (batch, NUM_Q_HEADS, HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(kk, (batch, NUM_KV_HEADS, seq, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(kv, (batch, NUM_KV_HEADS, seq, HEAD_DIM), jnp.bfloat16)
        sets.append((q, k, v, lengths))
    ref_fn = jax.jit(kernels.decode_attention_reference)
    ref = ref_fn(*sets[0])
    results = {}

    def record(name, fn, arg_sets, config=None, check_args=None):
        try:
            out = fn(*(check_args or arg_sets[0]))
            err = rel_err(out, ref)
            timing = time_jax(fn, arg_sets, est_s)
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
    default = kernels.decode_config(batch, NUM_KV_HEADS, seq, HEAD_DIM, jnp.bfloat16)
    record("jkv", kernels.decode_attention, sets, default)
    try:
        results["jkv"]["launches"] = launches(kernels.decode_attention, sets[0])
        log(f"  jkv compiled program: {results['jkv']['launches']}")
    except Exception as e:
        log(f"  (could not count launches: {type(e).__name__}: {e})")
    if default.num_splits > 1 and not quick:  # the merge of the splits in the kernel instead of XLA's
        fuse = lambda q, k, v, n: kernels.decode_attention(q, k, v, n, fused_combine=True)
        record("jkv_fused_combine", fuse, sets, default._replace(fused_combine=True))
    if quick:  # the kernel and torch only (plus the sweep)
        if torch is not None:
            results.update(bench_torch(torch, sets, ref, nbytes, est_s, log, only_default=True))
        return _sweep(results, default, sets, batch, seq, sweep, stage_b, deadline, record, log, copies, nbytes)
    record("jkv_auto", mgpu.decode_attention_auto, sets)
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
        results.update(bench_torch(torch, sets, ref, nbytes, est_s, log))
    bench_q8(record, sets, results, batch, seq)
    if nbytes * 2 * copies < 8e9:  # the 5-D cache path: two layers, the traced index picks layer 1
        sets5 = [(q, jnp.stack([v, k]), jnp.stack([k, v]), n) for q, k, v, n in sets]
        fn5 = lambda q, k, v, n: kernels.decode_attention(q, k, v, n, layer=jnp.int32(1) + 0 * n[0])
        record("jkv_5d", fn5, sets5, default)
        del sets5
    return _sweep(results, default, sets, batch, seq, sweep, stage_b, deadline, record, log, copies, nbytes)


def _sweep(results, default, sets, batch, seq, sweep, stage_b, deadline, record, log, copies, nbytes) -> dict:
    if sweep:
        best_name, best_tbps = "jkv", results["jkv"].get("tbps", 0.0)
        now = time.perf_counter()
        stage_a_deadline = now + 0.6 * (deadline - now)  # stage B gets the rest
        for stage in ("A", "B") if stage_b else ("A",):
            base = kernels.DecodeConfig(**results[best_name]["config"]) if "config" in results[best_name] else default
            if stage == "B":
                configs = stage_b_configs(base)
            elif CTAS:
                configs = cta_configs(default, batch, seq, *CTAS)
            else:
                configs = sweep_configs(default, seq)
            for config in configs:
                if time.perf_counter() > (stage_a_deadline if stage == "A" and stage_b else deadline):
                    log("  (time budget spent: sweep cut short)")
                    break
                name = "jkv[bk={},P={},w={},s={},fused={:d}]".format(*config)
                if name in results:
                    continue
                fn = lambda q, k, v, n, c=config: kernels.decode_attention(q, k, v, n, **c._asdict())
                tbps = record(name, fn, sets, config)
                if tbps is not None and tbps > best_tbps:
                    best_name, best_tbps = name, tbps
        results["jkv_best"] = {"name": best_name, **results[best_name]}
    return {"batch": batch, "seq": seq, "kv_bytes": nbytes, "rotating_copies": copies, "results": results}


def q8_bytes(batch: int, seq: int) -> int:
    """K + V bytes of a Q8 cache (int8 codes and one float16 scale per 32 values)."""
    return 2 * batch * NUM_KV_HEADS * seq * (HEAD_DIM + HEAD_DIM // 32 * 2)


def bench_q8(record, sets, results, batch, seq) -> None:
    """Q8 cache rows (docs/quant.md): the fused kernel, and the seed's way (dequantize the layer, then attend).

    Same q and K/V as the bf16 rows, quantized with float16 scales; errors are against the bf16 reference.
    ``q8_*`` TB/s in ``results`` count bf16-equivalent bytes like every row; ``q8_tbps`` counts the Q8 bytes read.
    """
    q8_sets = [(q, *quantize(k), *quantize(v), n) for q, k, v, n in sets]
    dequant_then_attend = lambda q, k, ks, v, vs, n: kernels.decode_attention(
        q, q8.dequantize(k, ks, dtype=jnp.bfloat16), q8.dequantize(v, vs, dtype=jnp.bfloat16), n
    )
    record("q8_fused", q8.decode_attention, q8_sets, q8.decode_config(batch, NUM_KV_HEADS, seq, HEAD_DIM))
    record("q8_dequant_then_attend", dequant_then_attend, q8_sets)
    for name in ("q8_fused", "q8_dequant_then_attend"):
        if "time_s" in results.get(name, {}):
            results[name]["q8_tbps"] = q8_bytes(batch, seq) / results[name]["time_s"] / 1e12


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


def torch_inputs(torch, sets) -> list:
    """The ``(q, k, v)`` of each JAX input set as torch tensors (``dlpack``: the same device buffers)."""
    return [tuple(torch.from_dlpack(x) for x in (q, k, v)) for q, k, v, _ in sets]


def torch_sdpa(which=None):
    """torch's ``scaled_dot_product_attention`` for one decode query per sequence (q_len 1, ``enable_gqa``) on
    ``[B, N, D]`` queries and ``[B, K, S, D]`` K/V; ``which``: an ``SDPBackend`` to force, None for torch's
    choice. Returns ``[B, N, 1, D]``."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        if which is None:
            return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)

    return fn


def bench_torch(torch, sets, ref, nbytes, est_s, log, only_default: bool = False) -> dict:
    from torch.nn.attention import SDPBackend

    tsets = torch_inputs(torch, sets)
    out = {}
    backends = {
        "torch_sdpa": None,
        "torch_sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "torch_sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "torch_sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    if only_default:
        backends = {"torch_sdpa": None}
    for name, which in backends.items():
        fn = torch_sdpa(which)
        try:
            got = fn(*tsets[0])[:, :, 0]
            torch.cuda.synchronize()
            err = rel_err(jnp.asarray(np.asarray(got.float().cpu())), ref)
            timing = time_torch(torch, fn, tsets, est_s)
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"  {name:34s} ERROR {out[name]['error'][:120]}")
            continue
        tbps = nbytes / timing["time_s"] / 1e12
        out[name] = {**timing, "tbps": tbps, "rel_err": err}
        log(f"  {name:34s} {timing['time_s'] * 1e6:9.1f} us {tbps:6.3f} TB/s  err {err:.1e}")
    del tsets
    torch.cuda.empty_cache()
    return out


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
    rows = ("jkv_auto", "jkv", "jkv_fused_combine", "jkv_best", "torch_sdpa", "jax_gqa", "xla_ref")
    tbps = {n: [s["results"].get(n, {}).get("tbps", 0.0) for s in shapes] for n in rows}
    names = [n for n in rows if any(tbps[n]) and not (n == "jkv_best" and tbps[n] == tbps["jkv"])]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        config = next((s["results"][name].get("config") for s in shapes if name in s["results"]), None) or {}
        label = f"{name} (in-kernel merge)" if name == "jkv" and config.get("fused_combine") else name
        ax.bar(np.arange(len(shapes)) + i * width, tbps[name], width, label=label)
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
    parser.add_argument("--shapes", nargs="*", default=[f"{b}x{t}" for b, t in SHAPES])
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
    global CTAS
    CTAS = (args.ctas, args.blocks) if args.ctas else None
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import torch
    except ImportError:
        torch = None
    log = lambda msg: print(msg, flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": jax.devices()[0].device_kind,
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "torch": getattr(torch, "__version__", None),
        **backend.describe(),
    }
    report = {"meta": meta, "shapes": []}
    log(json.dumps(meta))
    if torch is not None and torch.cuda.is_available():
        report["copy"] = copy_bandwidth(torch)
        log(f"device copy: {report['copy']['tbps']:.3f} TB/s (read + write)")
    else:
        torch = None
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    for i, (batch, seq) in enumerate(shapes):
        log(f"B={batch} T={seq}: K+V {kv_bytes(batch, seq) / 1e6:.0f} MB")
        swept = lambda b, t: not args.no_sweep and (args.sweep_shapes is None or f"{b}x{t}" in args.sweep_shapes)
        sweep = swept(batch, seq)
        # Each remaining swept shape keeps an equal share of the remaining budget.
        share = max(1, sum(swept(b, t) for b, t in shapes[i:]))
        deadline = time.perf_counter() + (start + args.budget_s - time.perf_counter()) / share
        row = bench_shape(
            torch, batch, seq, sweep=sweep, quick=args.quick, stage_b=not args.no_stage_b, deadline=deadline, log=log
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
