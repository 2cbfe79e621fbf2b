"""Where an engine's decode-only step spends its time (issue 21): one profiled run of engine steps with every slot
busy decoding, grouped by kernel and by kind of kernel, beside the host's wall time per step.

``bench/bench_engine.py --profile-steps N`` runs it after its workloads, on an engine of the mixed workload's
shape. Per step it reports the wall time (host), the device span (first kernel start to last kernel end, over
the profiled steps), the busy time (kernels summed), and the time of each kind: ``matmul`` (cuBLAS / cuBLASLt /
CUTLASS GEMMs), ``jkv`` (jkv's Pallas kernels: attention, RMS norm, quantized products), ``fusion`` (XLA's
fused elementwise / reduction / gather / scatter kernels), ``copy`` (memcpy / memset) and ``other``; then the
``top`` kernels by time with their launches per step. Span minus busy is the device idle inside the steps
(launch gaps, waits on the host); wall minus span per step is time the device had nothing queued.
"""

from __future__ import annotations

import time

import jax

from bench import common
from jkv.serving import SamplingParams

KINDS = (
    ("jkv", ("jkv_",)),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "xmma")),
    ("copy", ("memcpy", "memset", "Memcpy", "Memset")),
    ("fusion", ("fusion", "loop_", "input_", "wrapped_", "triton_")),
)


def kind_of(kernel: str) -> str:
    """The kind of a GPU activity by its name (:data:`KINDS`; ``other`` where none matches)."""
    low = kernel.lower()
    for kind, marks in KINDS:
        if any(m.lower() in low for m in marks):
            return kind
    return "other"


def idle_gaps(events, steps: int, top: int = 8, min_ns: int = 2000) -> dict:
    """Where the device idles between kernels: the gaps of ``min_ns`` or more between one activity's end and the
    next one's start (``events``: ``(name, start_ns, end_ns)``, several streams merged), summed per pair of
    ``(kind of the kernel before, the kernel after)`` and divided by ``steps``. Returns ``{"idle_s", "gaps",
    "top": {"kind before -> kernel after": (seconds per step, gaps per step)}}``: a long wait for the host shows
    as few large gaps, launch overhead as many small ones."""
    ordered = sorted(events, key=lambda e: e[1])
    pairs, idle, count, reach, before = {}, 0, 0, None, None
    for name, begin, end in ordered:
        if reach is not None and begin - reach >= min_ns:
            key = f"{kind_of(before)} -> {name[:80]}"
            total, n = pairs.get(key, (0, 0))
            pairs[key] = (total + begin - reach, n + 1)
            idle, count = idle + begin - reach, count + 1
        if reach is None or end >= reach:
            reach, before = end, name
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "idle_s": idle * 1e-9 / steps,
        "gaps": count / steps,
        "top": {k: (t * 1e-9 / steps, n / steps) for k, (t, n) in ranked},
    }


def fill(engine, prompts, new_tokens: int) -> int:
    """Submit a prompt per slot and run prompt-only steps until every slot holds its prompt; returns how many."""
    n = min(engine.num_slots, len(prompts))
    for p in prompts[:n]:
        engine.submit(p, SamplingParams(max_new_tokens=new_tokens))
    engine.admit()
    return n


def profile_decode_steps(engine, prompts, new_tokens: int, steps: int, top: int = 15) -> dict:
    """Fill every slot, warm up, then profile ``steps`` engine steps (each slot decoding one token a step;
    ``new_tokens`` must exceed ``steps + 2`` so that no slot finishes inside the profile)."""
    if new_tokens <= steps + 2:
        raise ValueError(f"new_tokens={new_tokens} must exceed steps + 2 = {steps + 2}: slots would finish")
    busy_slots = fill(engine, prompts, new_tokens)
    for _ in range(2):  # the decode bucket compiled and both step buffers in use
        engine.step()
    jax.block_until_ready(engine.cache)
    walls = []

    def drive(_):
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
        return engine.cache

    start = time.perf_counter()
    events = common._trace(drive, None, 1, "/device:GPU")
    wall = (time.perf_counter() - start) / steps  # the trace's set-up and the last step's drain included
    engine.abort()  # the filled requests are not part of any workload
    kernels, calls = {}, {}
    for name, begin, end in events:
        kernels[name] = kernels.get(name, 0.0) + (end - begin) * 1e-9 / steps
        calls[name] = calls.get(name, 0) + 1 / steps
    span = (max(e for _, _, e in events) - min(b for _, b, _ in events)) * 1e-9 / steps if events else float("nan")
    kinds = {}
    for name, t in kernels.items():
        kind = kind_of(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])
    gaps = idle_gaps(events, steps)
    report = {
        "slots": busy_slots,
        "steps": steps,
        "host_step_s": sorted(walls)[len(walls) // 2] if walls else float("nan"),
        "wall_per_step_s": wall,
        "span_per_step_s": span,
        "busy_per_step_s": sum(kernels.values()),
        "launches_per_step": sum(calls.values()),
        "kinds_s": kinds,
        "top_kernels_s": dict(ranked[:top]),
        "top_calls_per_step": {k: calls[k] for k, _ in ranked[:top]},
        "idle_gaps": gaps,
    }
    common.log(
        f"profile: {busy_slots} slots decoding, {steps} steps: host {report['host_step_s'] * 1e3:.2f} ms/step "
        f"(median engine.step), device span {span * 1e3:.2f} ms, busy {report['busy_per_step_s'] * 1e3:.2f} ms, "
        f"{report['launches_per_step']:.0f} launches/step"
    )
    common.log(
        "  by kind: " + ", ".join(f"{k} {t * 1e3:.2f} ms" for k, t in sorted(kinds.items(), key=lambda x: -x[1]))
    )
    for name, t in ranked[:top]:
        common.log(f"  {t * 1e6:9.1f} us {calls[name]:6.1f}x  {kind_of(name):6s} {name[:110]}")
    common.log(f"  idle between kernels: {gaps['idle_s'] * 1e3:.2f} ms/step in {gaps['gaps']:.0f} gaps of 2 us or more")
    for pair, (t, n) in gaps["top"].items():
        common.log(f"  {t * 1e6:9.1f} us {n:6.1f}x  idle before {pair}")
    return report
