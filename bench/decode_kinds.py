"""The shapes, inputs and rows of bench/bench_decode_kinds.py: decode attention (T = 1) of every jkv cache kind and
its peers, on one shape set.

A shape is written ``BxS[:N/K/D]`` (every sequence full, capacity S) or ``Bxr{lo}-{hi}[:N/K/D]`` (ragged: B
lengths drawn uniformly from ``lo..hi`` with :data:`SEED`, the same every run; capacity S = the longest,
rounded up to 64); heads N/K/D default to 32/8/128.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable
from typing import NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench.bench_paged import paged_sets
from jkv.caches.formats import quantize
from pallas_kernels import (
    backend,
    checks,
    decode,
    decode_fp8,
    decode_mgpu,
    decode_mgpu_paged,
    decode_mgpu_q8,
    decode_q8,
    dispatch,
    paged,
    paged_q8,
    reference,
)
from pallas_kernels import common as common_kernels
from pallas_kernels import formats as kernel_formats

PAGE_SIZE = 16
TOL = 3e-2  # relative error a row may have against its reference (bf16 output)
SEED = 0  # of the ragged lengths and the page permutation: the same every run
HEADS = (common.NUM_Q_HEADS, common.NUM_KV_HEADS, common.HEAD_DIM)
SHAPE_NAMES = (
    "1x4096",
    "1x131072",
    "16x8192",
    "128x2048",
    "256x1024",
    "4x4096:32/32/128",
    "32x2048:9/3/64",
    "8x4096:16/8/256",
    "16x8192:32/4/128",
    "16x4096:32/32/96",  # Phi-3-mini's heads: a head_dim read in column parts
    "32xr256-16384",
)
LAYOUTS = ("bf16", "paged", "q8", "q8_paged", "fp8", "fp8_paged", "bshd")
# Bytes per position and kv head of K or V: bf16 values; int8 codes + a float16 scale per 32; e4m3 + a float32 scale.
VALUE_BYTES = {"bf16": lambda d: 2 * d, "q8": lambda d: d + d // 32 * 2, "fp8": lambda d: d + 4}
_SPEC = re.compile(r"^(\d+)x(?:(\d+)|r(\d+)-(\d+))(?::(\d+)/(\d+)/(\d+))?$")


class Shape(NamedTuple):
    name: str
    batch: int
    seq: int  # S: the cache's capacity per sequence
    heads: tuple[int, int, int]  # N, K, D
    lengths: tuple[int, ...] | None  # ragged lengths; None: every sequence holds S positions


def parse_shape(text: str) -> Shape:
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(f"shape {text!r} must read BxS[:N/K/D] or Bxr<lo>-<hi>[:N/K/D], e.g. 32xr256-16384")
    batch, seq, lo, hi, *heads = match.groups()
    heads = tuple(int(x) for x in heads) if heads[0] else HEADS
    if seq is not None:
        return Shape(text, int(batch), int(seq), heads, None)
    if not 1 <= int(lo) <= int(hi):
        raise ValueError(f"shape {text!r}: ragged lengths need 1 <= lo={lo} <= hi={hi}")
    lengths = np.random.default_rng(SEED).integers(int(lo), int(hi) + 1, size=int(batch))
    return Shape(text, int(batch), -(-int(lengths.max()) // 64) * 64, heads, tuple(int(x) for x in lengths))


def smoke_shape(shape: Shape) -> Shape:
    """The same heads at a CPU interpret-mode size: 2 sequences of 128 positions, or 3 ragged ones in 16..128."""
    n, kh, d = shape.heads
    spec = "3xr16-128" if shape.lengths else f"{min(shape.batch, 2)}x128"
    return parse_shape(f"{spec}:{n}/{kh}/{d}")


def kv_bytes(shape: Shape, fmt: str) -> int:
    """K + V bytes a kernel must read: the sequences' positions only (ragged: their sum), in format ``fmt``
    (:data:`VALUE_BYTES`)."""
    _, kh, d = shape.heads
    positions = sum(shape.lengths) if shape.lengths else shape.batch * shape.seq
    return 2 * positions * kh * VALUE_BYTES[fmt](d)


# ----------------------------------------------------------------------------------------------- inputs


def shape_inputs(shape: Shape, rotate_bytes: float, layouts=LAYOUTS) -> tuple[dict, int, float]:
    """Rotating input sets per layout (those in ``layouts``; ``bf16`` always): ``bf16`` (q, k, v [B, K, S, D],
    lengths), ``paged`` (the same contents in page-16 pools at permuted places, bench_paged's layout), ``q8`` /
    ``q8_paged`` (quantized with float16 scales; the pages at the same places), ``bshd`` (K/V as ``[B, S, K, D]``
    for jax's dot_product_attention, transposed here outside the timing). Returns ``(sets, copies, est_s)``."""
    sets, copies, est_s = common.decode_inputs(
        shape.batch, shape.seq, heads=shape.heads, lengths=shape.lengths, rotate_bytes=rotate_bytes
    )
    key = jax.random.key(SEED)
    out = {"bf16": sets}
    if "paged" in layouts:
        out["paged"] = paged_sets(sets, PAGE_SIZE, key)
    if {"q8", "q8_paged"} & set(layouts):
        out["q8"] = [(q, *quantize(k), *quantize(v), n) for q, k, v, n in sets]
    if "q8_paged" in layouts:
        out["q8_paged"] = paged_sets(out["q8"], PAGE_SIZE, key)
    if {"fp8", "fp8_paged"} & set(layouts):
        fp8 = kernel_formats.quantize_fp8
        out["fp8"] = [(q, *fp8(k), *fp8(v), n) for q, k, v, n in sets]
    if "fp8_paged" in layouts:
        out["fp8_paged"] = paged_sets(out["fp8"], PAGE_SIZE, key)
    if "bshd" in layouts:
        out["bshd"] = [(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), n) for q, k, v, n in sets]
    return out, copies, est_s


def abstract_inputs(shape: Shape) -> dict:
    """One set per layout of :func:`shape_inputs` as ``jax.ShapeDtypeStruct`` (for lowering at full size)."""
    (n, kh, d), b, s = shape.heads, shape.batch, shape.seq
    sd = jax.ShapeDtypeStruct
    q, ints, table = sd((b, n, d), jnp.bfloat16), sd((b,), jnp.int32), sd((b, s // PAGE_SIZE), jnp.int32)
    kv, pool = sd((b, kh, s, d), jnp.bfloat16), sd((b * s // PAGE_SIZE, kh, PAGE_SIZE, d), jnp.bfloat16)
    codes, scales = sd((b, kh, s, d), jnp.int8), sd((b, kh, s, d // 32), jnp.float16)
    pool_codes = sd((b * s // PAGE_SIZE, kh, PAGE_SIZE, d), jnp.int8)
    pool_scales = sd((b * s // PAGE_SIZE, kh, PAGE_SIZE, d // 32), jnp.float16)
    e4m3, e4m3_scales = sd((b, kh, s, d), kernel_formats.FP8_DTYPE), sd((b, kh, s, 1), jnp.float32)
    pool_e4m3 = sd((b * s // PAGE_SIZE, kh, PAGE_SIZE, d), kernel_formats.FP8_DTYPE)
    pool_e4m3_scales = sd((b * s // PAGE_SIZE, kh, PAGE_SIZE, 1), jnp.float32)
    return {
        "bf16": (q, kv, kv, ints),
        "paged": (q, pool, pool, table, ints),
        "q8": (q, codes, scales, codes, scales, ints),
        "q8_paged": (q, pool_codes, pool_scales, pool_codes, pool_scales, table, ints),
        "fp8": (q, e4m3, e4m3_scales, e4m3, e4m3_scales, ints),
        "fp8_paged": (q, pool_e4m3, pool_e4m3_scales, pool_e4m3, pool_e4m3_scales, table, ints),
        "bshd": (q, sd((b, s, kh, d), jnp.bfloat16), sd((b, s, kh, d), jnp.bfloat16), ints),
    }


def references(shape: Shape, sets: dict) -> dict:
    """The XLA references on the first input set: ``bf16`` (every bf16 row, paged ones included), ``q8`` / ``fp8``
    (over the dequantized cache: the kernel's own error, not the format's), ``full`` (every sequence read to S:
    what a padding peer computes)."""
    q, k, v, n = sets["bf16"][0]
    ref = jax.jit(reference.decode_attention_reference)
    out = {"bf16": ref(q, k, v, n)}
    if "q8" in sets:
        out["q8"] = jax.jit(reference.q8_decode_attention_reference)(*sets["q8"][0])
    if "fp8" in sets:
        out["fp8"] = jax.jit(reference.fp8_decode_attention_reference)(*sets["fp8"][0])
    out["full"] = ref(q, k, v, jnp.full_like(n, shape.seq)) if shape.lengths else out["bf16"]
    return out


# ----------------------------------------------------------------------------------------------- rows


def with_loop_form(form: str, fn: Callable) -> Callable:
    """``fn`` (a Q8 / FP8 decode call) run with ``decode_q8.LOOP_FORM`` set to ``form`` (read per call)."""

    def call(*args, **kwargs):
        with mock.patch.object(decode_q8, "LOOP_FORM", form):
            return fn(*args, **kwargs)

    return call


def column_rows(head_dim: int) -> dict:
    """At a head_dim that is not a power of two, the Q8 kernels in the column form their default does not take:
    read as one padded, column-masked tile (``q8pad_triton``, ``q8pagedpad_triton``) where they read power-of-two
    column parts, in parts (``q8parts_triton``, ``q8pagedparts_triton``) where they pad (decode_q8.PAD_MAX_COLUMNS)."""
    if head_dim & (head_dim - 1) == 0 or head_dim % checks.Q8_BLOCK:
        return {}
    name = "parts" if common_kernels.pow2_ceil(head_dim) <= decode_q8.PAD_MAX_COLUMNS else "pad"
    form = f"vperm+{name}"
    return {
        f"q8{name}_triton": Row("q8", with_loop_form(form, decode_q8.q8_decode_attention), fmt="q8"),
        f"q8paged{name}_triton": Row("q8_paged", with_loop_form(form, paged_q8.paged_q8_decode_attention), fmt="q8"),
    }


def stage_rows(head_dim: int) -> dict:
    """At a head_dim the bf16 kernels read as one padded tile (80, 48), the contiguous kernel at the 3 stages it
    took before ``common.pipeline_stages`` gave padded tiles more (``jkv_s3_triton``)."""
    if not common_kernels.pads(head_dim):
        return {}
    return {"jkv_s3_triton": Row("bf16", functools.partial(decode.decode_attention, num_stages=3))}


class Row(NamedTuple):
    layout: str  # which input sets it reads (shape_inputs)
    fn: Callable
    fmt: str = "bf16"  # bytes counted and reference: "bf16", "q8" or "fp8"
    mgpu: bool = False  # Mosaic GPU only: lowered for CUDA, not run, where it cannot run
    refused: str | None = None  # the kernel's own refusal of this shape (decode_mgpu.unsupported_reason): not a failure


def dot_product_attention(implementation: str, ragged: bool):
    """``jax.nn.dot_product_attention`` on ``q [B, N, D]`` and ``[B, S, K, D]`` K/V (GQA), the lengths passed as
    ``key_value_seq_lengths`` where ragged (cuDNN's padding mask), none otherwise."""

    def fn(q, k, v, n):
        lengths = n if ragged else None
        out = jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=lengths, implementation=implementation
        )
        return out[:, 0]

    return fn


def jax_rows(shape: Shape, smoke: bool) -> dict[str, Row]:
    """jkv's kernel for each cache kind (the contiguous dispatch and both of its kernels, paged page 16 in Triton
    and Mosaic GPU, Q8 and FP8 contiguous and paged) and jax's cuDNN attention (its XLA path in a smoke run)."""
    ragged = shape.lengths is not None
    n, kh, d = shape.heads
    refused = decode_mgpu.unsupported_reason(n, kh, d, jnp.bfloat16)
    # the Q8 format's own rule (a scale per 32 values), before any kernel's
    q8_format = f"head_dim {d} is not a multiple of the Q8 block ({checks.Q8_BLOCK})" if d % checks.Q8_BLOCK else None
    q8_refused = q8_format or decode_mgpu_q8.unsupported_reason(n, kh, d)
    fp8_refused = decode_mgpu_q8.unsupported_reason(n, kh, d, decode_mgpu_q8.FP8)
    return {
        "jkv_auto": Row("bf16", dispatch.decode_attention_auto),
        "jkv_triton": Row("bf16", decode.decode_attention),
        "jkv_mgpu": Row("bf16", decode_mgpu.decode_attention_mgpu, mgpu=True, refused=refused),
        "paged_triton": Row("paged", paged.paged_decode_attention),
        "paged_mgpu": Row("paged", decode_mgpu_paged.paged_decode_attention_mgpu, mgpu=True, refused=refused),
        "q8_triton": Row("q8", decode_q8.q8_decode_attention, fmt="q8", refused=q8_format),
        "q8_mgpu": Row("q8", decode_mgpu_q8.q8_decode_attention_mgpu, fmt="q8", mgpu=True, refused=q8_refused),
        "q8paged_triton": Row("q8_paged", paged_q8.paged_q8_decode_attention, fmt="q8", refused=q8_format),
        **column_rows(d),
        **stage_rows(d),
        "fp8_triton": Row("fp8", decode_fp8.fp8_decode_attention, fmt="fp8"),
        "fp8_mgpu": Row("fp8", decode_mgpu_q8.fp8_decode_attention_mgpu, fmt="fp8", mgpu=True, refused=fp8_refused),
        "fp8paged_triton": Row("fp8_paged", decode_fp8.paged_fp8_decode_attention, fmt="fp8"),
        ("jax_xla" if smoke else "jax_cudnn"): Row("bshd", dot_product_attention("xla" if smoke else "cudnn", ragged)),
    }


# Rows whose launch a ``--launches`` spec may set: block keys (pages per block for paged rows), splits, warps, stages.
LAUNCH_ROWS = {
    "jkv_triton": "block_k",
    "paged_triton": "pages_per_block",
    "q8_triton": "block_k",
    "q8paged_triton": "pages_per_block",
    "fp8_triton": "block_k",
}


def launch_rows(specs, shape: Shape, smoke: bool) -> dict[str, Row]:
    """Rows of a launch sweep: each spec ``ROW@B,S,W,T[,fused]`` is row ``ROW`` (one of :data:`LAUNCH_ROWS`) with
    its block (keys, or pages per block), splits, warps and stages fixed (``-`` keeps the default of one) and, with
    ``,fused``, its splits merged by the last to finish (``fused_merge``), named as the spec. Timed beside the
    default rows in the same rounds; the kernels still cap the stages to what shared memory holds."""
    base, rows = jax_rows(shape, smoke), {}
    for spec in specs:
        row, values, fused = parse_launch(spec)
        keys = (LAUNCH_ROWS[row], "num_splits", "num_warps", "num_stages")
        overrides = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        if fused:
            overrides["fused_merge"] = True
        rows[spec] = base[row]._replace(fn=functools.partial(base[row].fn, **overrides))
    return rows


def parse_launch(spec: str) -> tuple[str, tuple, bool]:
    """``ROW@B,S,W,T[,fused]`` -> ``(ROW, (B, S, W, T), fused)`` with ``-`` as None; a clear error for anything
    else."""
    row, _, launch = spec.partition("@")
    values = launch.split(",")
    fused = len(values) == 5 and values[-1] == "fused"
    values = values[:4] if fused else values
    ok = row in LAUNCH_ROWS and len(values) == 4 and all(v == "-" or (v.isdigit() and int(v) > 0) for v in values)
    if not ok:
        raise ValueError(
            f"launch {spec!r}: expected ROW@BLOCK,SPLITS,WARPS,STAGES[,fused] with ROW one of {sorted(LAUNCH_ROWS)}"
            " and each value a positive integer or '-' (the default)"
        )
    return row, tuple(None if v == "-" else int(v) for v in values), fused


def auto_choice(shape: Shape) -> str:
    """The kernel ``dispatch.decode_attention_auto`` takes for this shape on this machine."""
    n, kh, d = shape.heads
    mgpu = backend.mosaic_gpu_usable() and dispatch.prefer_mgpu(shape.batch, kh, shape.seq, d, n // kh, jnp.bfloat16)
    return "mgpu" if mgpu else ("triton" if backend.on_gpu() else "triton (interpret)")


@contextlib.contextmanager
def as_if_on_hopper():
    """Within: the kernels take their GPU paths (Triton without interpret mode, Mosaic GPU) whatever the host, so
    that they can be lowered for CUDA on a CPU; never run anything inside."""
    with (
        mock.patch.object(backend, "mosaic_gpu_usable", lambda: True),
        mock.patch.object(backend, "gpu_backend", lambda: backend.TRITON),
    ):
        yield


def lower_for_cuda(fn, args) -> dict:
    """Lower ``fn`` on abstract ``args`` for CUDA (:func:`as_if_on_hopper`): catches signature, configuration and
    Mosaic GPU lowering errors on any host. A fresh wrapper, so no trace made here is reused by a later run."""
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    t0 = time.perf_counter()
    with as_if_on_hopper():
        text = jax.jit(lambda *a: fn(*a)).trace(*abstract).lower(lowering_platforms=("cuda",)).as_text()
    kernels = [name for name in ("mosaic_gpu", "triton", "cudnn") if name in text]
    return {"lowered": "cuda", "kernels": kernels, "lower_s": time.perf_counter() - t0}


def lower_all(names, smoke: bool, log, only=None) -> dict:
    """Lower every JAX row's GPU path for CUDA at each shape's real size (abstract inputs, nothing allocated)."""
    out = {}
    for text in names:
        shape = parse_shape(text)
        shape = smoke_shape(shape) if smoke else shape
        inputs = abstract_inputs(shape)
        for name, row in jax_rows(shape, smoke=False).items():
            if name == "jax_cudnn" or (only and name not in only):
                continue  # cuDNN's lowering asks for a cuDNN library
            if row.refused is not None:  # the kernel's own refusal of this shape, as a timed run reports it
                out[f"{text} {name}"] = {"refused": row.refused}
                log(f"{text:20s} {name:18s} refused: {row.refused[:300]}")
                continue
            try:
                out[f"{text} {name}"] = r = lower_for_cuda(row.fn, inputs[row.layout])
                log(f"{text:20s} {name:18s} lowered ({', '.join(r['kernels'])}) {r['lower_s']:.1f}s")
            except Exception as e:
                out[f"{text} {name}"] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
                log(f"{text:20s} {name:18s} ERROR {out[f'{text} {name}']['error'][:600]}")
    return out
