"""jkv: functional KV caches for LLM decoding in JAX, with Pallas GPU kernels beside pure-JAX references.

Axis letters, used in shape annotations and einsum strings across the package:

    B batch          T new tokens (this step)      S cache positions (max_len)
    N query heads    K kv heads                    G queries per kv head (N // K)
    D head_dim       L layers                      P pages

Contiguous caches are ``[L, B, K, S, D]`` with ``lengths: int32[B]``.
"""

from jkv import memory, quant
from jkv.attention import (
    attention_reference,
    decode_attention,
    decode_attention_reference,
    decode_attention_write,
    default_impl,
    prefill_attention,
)
from jkv.cache import CacheSpec, KVCache, KVSnapshot
from jkv.paged import PagedKVCache
from jkv.paged_q8 import Q8PagedKVCache
from jkv.quant import Q8KVCache, Q8Snapshot, dequantize, quantize
from jkv.rope import RopeStyle, apply_rope, inv_frequencies, llama3_inv_frequencies

__all__ = [
    "CacheSpec",
    "KVCache",
    "KVSnapshot",
    "PagedKVCache",
    "Q8KVCache",
    "Q8PagedKVCache",
    "Q8Snapshot",
    "RopeStyle",
    "apply_rope",
    "attention_reference",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_write",
    "default_impl",
    "dequantize",
    "inv_frequencies",
    "llama3_inv_frequencies",
    "memory",
    "prefill_attention",
    "quant",
    "quantize",
]
__version__ = "0.1.0"
