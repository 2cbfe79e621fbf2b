"""The contiguous-cache decode kernel for a shape and a machine: Mosaic GPU where it measured faster and can run,
else the Triton kernel (interpret mode off GPU). Same arguments and results as either kernel; a window or a soft
cap goes to the Triton kernel (the Mosaic GPU kernel takes neither).
"""

from __future__ import annotations

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
    b, n, kh, s, d = checks.check_args(q, k, v, lengths, layer)
    plain = window is None and softcap is None
    if allow_mgpu and plain and backend.mosaic_gpu_usable() and prefer_mgpu(b, kh, s, d, n // kh, k.dtype):
        return decode_mgpu.decode_attention_mgpu(q, k, v, lengths, layer=layer, scale=scale)
    return decode.decode_attention(q, k, v, lengths, layer=layer, scale=scale, window=window, softcap=softcap)
