"""torch as the benchmarks' peer: its CUDA device, its copy rate, its callables timed as CUDA graphs (alone or as
samplers for ``common.interleaved``) and its ``scaled_dot_product_attention`` backends for one decode query."""

from __future__ import annotations

import math
import statistics

import jax.numpy as jnp
import numpy as np

from bench.common import TARGET_RUN_S, rel_err


def load_torch():
    """torch where it has a CUDA device, else None (the torch rows and the copy ceiling are then skipped)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


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
        with torch.cuda.graph(graphs[n], capture_error_mode="thread_local"):  # JAX's threads may touch CUDA
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


def torch_sampler(torch, fn, arg_sets, est_s: float, executions: int = 3):
    """:func:`jax_sampler` for a torch callable: CUDA graphs of n and 2n calls captured once, each sample the
    median of ``executions`` differences."""
    reps = _torch_reps(est_s)
    replay = _torch_replay(torch, fn, arg_sets, reps)
    return lambda: statistics.median((replay(2 * reps) - replay(reps)) / reps for _ in range(executions))


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
