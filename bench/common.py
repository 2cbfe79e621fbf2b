"""What the kernel benchmarks share: the shapes, input builders, timing (chained programs read from profiler
traces, CUDA graphs for torch, interleaved rounds), per-kernel breakdowns, the copy ceiling, torch SDPA peers and
the report's metadata.

Method: JAX calls are unrolled inside one jitted program, each call's output the next call's query so none is
merged or dropped, and the time per call comes from the device spans of a profiler trace (else the difference
between programs of 2n and n calls, so dispatch cancels); torch calls are captured in CUDA graphs of n and 2n
calls, timed with CUDA events. Inputs rotate over enough copies to exceed 4x the L2 cache. Variants compared
against each other are timed in interleaved rounds (:func:`interleaved`): timing order biases A/B comparisons.
"""

from __future__ import annotations

import datetime
import glob
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in the same process

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend

SHAPES = ((1, 4096), (1, 32768), (8, 4096), (8, 16384), (32, 4096), (64, 8192))
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
ROTATE_BYTES = 200e6  # > 4x the 50 MB L2 of an H100
TARGET_RUN_S = 2e-3  # device time of one timed program


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


def read_bandwidth(nbytes: int = 1 << 30, timer=None) -> dict:
    """A read stream over ``nbytes`` of bf16 (a row sum of ``[rows, 8192]``, writing 1/4096 of what it reads),
    timed as the kernels are (:func:`time_jax`; each call scaled by tanh of the last one's first sum, so none
    merges): the ceiling of a kernel that reads its input once and writes little. ``timer``: another
    ``time_jax``-like function (a smoke run's wall clock)."""
    rows = max(1, nbytes // 2 // 8192)
    x = jax.random.normal(jax.random.key(0), (rows, 8192), jnp.bfloat16)
    first = jnp.ones((rows,), jnp.float32)
    fn = lambda last, x: jnp.sum(x * jnp.tanh(last[0]).astype(x.dtype), axis=1, dtype=jnp.float32)
    timing = (timer or time_jax)(fn, [(first, x)], est_s=x.nbytes / 3e12)
    del x
    return {"bytes": rows * 8192 * 2, **timing, "tbps": rows * 8192 * 2 / timing["time_s"] / 1e12}


def decode_inputs(
    batch: int,
    seq: int,
    *,
    heads: tuple[int, int, int] = (NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM),
    lengths=None,
    rotate_bytes: float = ROTATE_BYTES,
) -> tuple[list, int, float]:
    """Rotating input sets ``(q [B, N, D], k, v [B, K, T, D], lengths)`` (bf16; ``heads`` = N, K, D; every
    sequence full unless ``lengths`` are given) for one shape: enough copies to exceed ``rotate_bytes``. Returns
    ``(sets, copies, est_s)``, ``est_s`` a first guess of one call's time (for the calls per timed program)."""
    num_q_heads, num_kv_heads, head_dim = heads
    key = jax.random.key(batch * 100003 + seq)
    nbytes = 2 * batch * num_kv_heads * seq * head_dim * 2
    copies = max(1, math.ceil(rotate_bytes / nbytes))
    est_s = nbytes / 2.5e12 + 5e-6
    lengths = jnp.full((batch,), seq, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    sets = []
    for i in range(copies):
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, i), 3)
        q = jax.random.normal(kq, (batch, num_q_heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(kk, (batch, num_kv_heads, seq, head_dim), jnp.bfloat16)
        v = jax.random.normal(kv, (batch, num_kv_heads, seq, head_dim), jnp.bfloat16)
        sets.append((q, k, v, lengths))
    return sets, copies, est_s


def q8_bytes(batch: int, seq: int) -> int:
    """K + V bytes of a Q8 cache (int8 codes and one float16 scale per 32 values)."""
    return 2 * batch * NUM_KV_HEADS * seq * (HEAD_DIM + HEAD_DIM // 32 * 2)


def rel_err(out, ref) -> float:
    out, ref = (np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) for x in (out, ref))
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def launches(fn, args) -> str:
    """Kernels in the compiled program of one call: XLA fusions and custom calls (the Pallas kernel)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    return f"{entry.count(' fusion(')} fusions + {entry.count(' custom-call(')} custom calls"


def add_xla_flags_option(parser, runs_as: str) -> None:
    """``--default-xla-flags`` on a benchmark that runs, unless given, with ``jkv.xla_flags.GPU_FLAGS`` added, as
    ``runs_as`` (e.g. "`jkv generate` does"); :func:`apply_xla_flags` acts on it."""
    parser.add_argument(
        "--default-xla-flags",
        action="store_true",
        help=f"leave XLA_FLAGS as given (default: add jkv.xla_flags.GPU_FLAGS, as {runs_as})",
    )


def apply_xla_flags(args) -> str:
    """Before JAX starts its backends: the recommended flags added unless ``args.default_xla_flags`` (GPU only; other
    backends ignore them); returns the ``XLA_FLAGS`` the run has, for its report."""
    if not args.default_xla_flags:
        from jkv import xla_flags

        xla_flags.apply_recommended(warn=False)
    return os.environ.get("XLA_FLAGS", "")


def meta(torch) -> dict:
    """The run's date, device, command line and software (``pallas_kernels.backend.describe``)."""
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": jax.devices()[0].device_kind,
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "torch": getattr(torch, "__version__", None),
        **backend.describe(),
    }


def log(msg: str) -> None:
    print(msg, flush=True)
