"""The kernel for a shape and a machine, chosen in one place: Mosaic GPU where it measured faster and can run, else
the Triton kernel (interpret mode off GPU). Same arguments and results as either kernel.

* decode over a contiguous cache (:func:`decode_attention_auto`): a window or a soft cap goes to the Triton kernel
  (the Mosaic GPU decode kernel takes neither);
* multi-token attention over contiguous and paged plain caches (:func:`multi_token_attention_auto`,
  :func:`paged_multi_token_attention_auto`; windows and soft caps on either path).
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from pallas_kernels import backend, checks, decode, decode_mgpu

# The Mosaic GPU kernel wins with at least this many bytes of K and V and at most two (b, kv head) programs per
# multiprocessor (docs/BENCHMARKS.md, "Decode attention"; the measurements behind it: docs/notes/kernel_rules.md),
# at head_dim 128 and up: at head_dim 64 the Triton kernel measured faster (docs/notes/decode_kernel.md, v7).
MIN_CACHE_BYTES = 64 * 2**20
MIN_HEAD_DIM = 128


def prefer_mgpu(
    batch: int, num_kv_heads: int, max_len: int, head_dim: int, group: int, dtype, num_multiprocessors=None
) -> bool:
    """Whether :func:`decode_attention_auto` takes the Mosaic GPU kernel for this shape (the rule above)."""
    dtype = jnp.dtype(dtype)
    if (
        decode_mgpu.unsupported_reason(group * num_kv_heads, num_kv_heads, head_dim, dtype) is not None
        or max_len % 8
        or max_len < decode_mgpu.BLOCK_K
        or head_dim < MIN_HEAD_DIM
    ):
        return False  # the Mosaic GPU kernel cannot take it, or would need a padded copy of the cache
    sms = num_multiprocessors or backend.num_multiprocessors()
    kv_bytes = 2 * batch * num_kv_heads * max_len * head_dim * dtype.itemsize
    return kv_bytes >= MIN_CACHE_BYTES and batch * num_kv_heads <= 2 * sms


def decode_attention_auto(
    q, k, v, lengths, *, layer=None, scale=None, window=None, softcap=None, allow_mgpu: bool = True
):
    """Decode attention over a contiguous cache with the kernel that suits the shape and the machine:
    ``decode_mgpu.decode_attention_mgpu`` where Mosaic GPU can run (``backend.mosaic_gpu_usable``),
    ``allow_mgpu`` holds, no ``window`` or ``softcap`` is asked for and :func:`prefer_mgpu` says so; else
    ``decode.decode_attention`` (Triton on a GPU, interpret mode elsewhere). ``allow_mgpu=False`` keeps the
    Triton kernel (for benchmarks that compare)."""
    b, n, kh, s, d = checks.check_args(q, k, v, lengths, layer, chunked=True)
    plain = window is None and softcap is None
    if allow_mgpu and plain and backend.mosaic_gpu_usable() and prefer_mgpu(b, kh, s, d, n // kh, k.dtype):
        return decode_mgpu.decode_attention_mgpu(q, k, v, lengths, layer=layer, scale=scale)
    return decode.decode_attention(q, k, v, lengths, layer=layer, scale=scale, window=window, softcap=softcap)


# ------------------------------------------------------------------------------------ multi-token attention
# Mosaic GPU multi-token kernels where they can run: on the H100 the warp-specialised kernel with the ping-pong
# schedule measured 1.38x (8192-token prefill) and 1.38x (a 2048-token chunk after 30,720 positions) the Triton
# kernel's speed, and its paged variant 1.92x the Triton paged kernel's (docs/BENCHMARKS.md, "Multi-token
# attention"). Benchmarks that compare set this False (or the environment's JKV_MULTI_TOKEN_MGPU=0) before they
# trace.
MULTI_TOKEN_MGPU = os.environ.get("JKV_MULTI_TOKEN_MGPU", "1") != "0"
# The warp-specialised kernels' key blocks, the first that fits taken: 128 measured faster than 64 on prefill and
# on chunks over contiguous and paged caches (docs/BENCHMARKS.md, "Multi-token attention", fourth run).
WS_BLOCK_KS = (128, 64)


def multi_token_mgpu_kind(
    num_rows: int, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype, out_dtype=None,
    block_ok=None,
):  # fmt: skip
    """Which Mosaic GPU multi-token kernel suits a step of ``num_rows`` query rows over ``batch`` sequences:
    ``"ws"`` (two consumer warpgroups on a shared ring, taking turns at the tensor cores: a tile of
    ``2 * block_q`` tokens of one sequence) where the sequences bring on average enough tokens to fill its tiles
    and its buffers fit the device's shared memory (at head_dim 256 they do not on a Hopper GPU),
    ``"plain"`` (one warpgroup, ``block_q`` tokens) for short runs (verification, decode-heavy mixed steps) and
    where only it fits; ``None`` where neither takes these heads, head_dim and dtype. ``out_dtype``: the queries'
    (None: ``dtype``); ``block_ok``: as :func:`ws_config` takes it. Any machine (the caller asks
    :func:`backend.mosaic_gpu_usable`)."""
    kind, _ = _mgpu_choice(num_rows, batch, num_q_heads, num_kv_heads, head_dim, dtype, out_dtype, block_ok)
    return kind


def _mgpu_choice(num_rows, batch, num_q_heads, num_kv_heads, head_dim, dtype, out_dtype, block_ok):
    """``(kind, config)``: :func:`multi_token_mgpu_kind`'s answer and the launch it chose it with."""
    from pallas_kernels import multi_token_mgpu as mgpu
    from pallas_kernels.multi_token_mgpu_ws import CONSUMERS

    out_dtype = dtype if out_dtype is None else out_dtype
    if not mgpu.mgpu_supported(num_q_heads, num_kv_heads, head_dim, dtype):
        return None, None
    config = mgpu.mgpu_multi_token_config(num_q_heads, num_kv_heads, head_dim, dtype)
    if not mgpu.fits(config, head_dim, dtype, out_dtype):
        return None, None
    long_runs = num_rows >= CONSUMERS * config.block_q * max(batch, 1)
    ws = ws_config(num_q_heads, num_kv_heads, head_dim, dtype, out_dtype, block_ok)
    if long_runs and mgpu.fits(ws, head_dim, dtype, out_dtype, CONSUMERS):
        return "ws", ws
    return "plain", config


def ws_config(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype, out_dtype=None, block_ok=None):
    """The warp-specialised kernels' launch as dispatched: the default tiles with the ping-pong schedule (measured
    faster than without it on every case of bench/bench_prefill.py) and the first of :data:`WS_BLOCK_KS` whose
    ring fits the device's shared memory beside both consumers' tiles and that ``block_ok(block_k)`` accepts (the
    caller's layout: a contiguous cache of at least one block, pages dividing it); else the default block."""
    from pallas_kernels import multi_token_mgpu as mgpu
    from pallas_kernels.multi_token_mgpu_ws import CONSUMERS

    out_dtype = dtype if out_dtype is None else out_dtype
    base = mgpu.mgpu_multi_token_config(num_q_heads, num_kv_heads, head_dim, dtype)._replace(pingpong=True)
    for block_k in WS_BLOCK_KS:
        config = base._replace(block_k=block_k)
        if mgpu.fits(config, head_dim, dtype, out_dtype, CONSUMERS) and (block_ok is None or block_ok(block_k)):
            return config
    return base


def _mgpu_launch(allow_mgpu: bool, q, lengths, kv_heads: int, dtype, block_ok):
    """``(kind, config)`` of the Mosaic GPU kernel for this step (:func:`multi_token_mgpu_kind`; the
    warp-specialised kernels with :func:`ws_config`), or ``(None, None)`` where none may or can run here."""
    if not (allow_mgpu and MULTI_TOKEN_MGPU and backend.mosaic_gpu_usable()):
        return None, None
    num_rows, n, d = q.shape[0], q.shape[-2], q.shape[-1]
    return _mgpu_choice(num_rows, lengths.shape[0], n, kv_heads, d, dtype, q.dtype, block_ok)


def multi_token_attention_auto(
    q, k, v, q_starts, lengths, counts, *, layer=None, scale=None, window=None, softcap=None, config=None,
    allow_mgpu: bool = True,
):  # fmt: skip
    """Multi-token attention over a contiguous cache with the kernel that suits the step and the machine: the Mosaic
    GPU kernels (:func:`multi_token_mgpu_kind`; the warp-specialised one with :func:`ws_config`) where Mosaic GPU
    can run, the cache's positions are whole 8-row tiles of at least one block (no padded copy) and
    ``allow_mgpu`` holds; else ``multi_token.multi_token_attention`` (Triton on a GPU, interpret mode elsewhere).
    Same arguments and results as either; ``config`` is the Triton kernel's
    (``multi_token_args.multi_token_config``), unused on the Mosaic GPU path."""
    from pallas_kernels import multi_token
    from pallas_kernels.multi_token_tiles import ALIGN

    options = dict(layer=layer, scale=scale, window=window, softcap=softcap)
    positions = k.shape[-2]
    kind, launch = _mgpu_launch(allow_mgpu, q, lengths, k.shape[-3], k.dtype, lambda block_k: positions >= block_k)
    if kind is not None and positions % ALIGN == 0 and positions >= launch.block_k:
        if kind == "ws":
            from pallas_kernels.multi_token_mgpu_ws import multi_token_attention_mgpu_ws as kernel
        else:
            from pallas_kernels.multi_token_mgpu import multi_token_attention_mgpu as kernel
        return kernel(q, k, v, q_starts, lengths, counts, config=launch, **options)
    return multi_token.multi_token_attention(q, k, v, q_starts, lengths, counts, config=config, **options)


def paged_multi_token_attention_auto(
    q, k_pages, v_pages, block_tables, q_starts, lengths, counts, *, layer=None, scale=None, window=None,
    softcap=None, config=None, allow_mgpu: bool = True,
):  # fmt: skip
    """:func:`multi_token_attention_auto` over page pools: the Mosaic GPU paged kernels
    (``multi_token_mgpu_ws_paged`` for long runs, ``multi_token_mgpu_paged`` for short ones) where Mosaic GPU can
    run, the kernels take the heads, head_dim and dtype and the page size (a multiple of 8) divides their
    block; else ``multi_token_paged`` (Triton)."""
    from pallas_kernels.multi_token_paged import paged_multi_token_attention
    from pallas_kernels.multi_token_tiles import ALIGN

    options = dict(layer=layer, scale=scale, window=window, softcap=softcap)
    page_size = k_pages.shape[-2]
    operands = (k_pages, v_pages, block_tables, q_starts, lengths, counts)
    kind, launch = _mgpu_launch(
        allow_mgpu, q, lengths, k_pages.shape[-3], k_pages.dtype, lambda block_k: block_k % page_size == 0
    )
    if kind is not None and page_size % ALIGN == 0 and launch.block_k % page_size == 0:
        if kind == "ws":
            from pallas_kernels.multi_token_mgpu_ws_paged import multi_token_attention_mgpu_ws_paged as kernel
        else:
            from pallas_kernels.multi_token_mgpu_paged import multi_token_attention_mgpu_paged as kernel
        return kernel(q, *operands, config=launch, **options)
    return paged_multi_token_attention(q, *operands, config=config, **options)
