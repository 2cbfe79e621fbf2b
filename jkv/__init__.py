"""jkv: functional KV caches for LLM decoding in JAX, with Pallas GPU kernels beside pure-JAX references.

Axis letters, used in shape annotations and einsum strings across the package:

    B batch          T new tokens (this step)      S cache positions (max_len)
    N query heads    K kv heads                    G queries per kv head (N // K)
    D head_dim       L layers                      P pages

A cache kind is a layout (``KVCache``: ``[L, B, K, S, X]``; ``PagedKVCache``: a page pool) times a format
(``Plain``, ``Q8``, ``FP8``); ``kinds()`` / ``make_cache`` name them.
"""

from jkv import caches, memory
from jkv.attention import (
    attend,
    attend_reference,
    attend_write,
    attend_write_qkv,
    attention_reference,
    decode_attention_reference,
    default_impl,
)
from jkv.caches import (
    FP8,
    PAGE_SIZE,
    Q8,
    CacheSpec,
    Format,
    KVCache,
    PagedKVCache,
    Plain,
    Snapshot,
    dequantize,
    kinds,
    make_cache,
    quantize,
)
from jkv.rope import RopeStyle, apply_rope, inv_frequencies, llama3_inv_frequencies

__all__ = [
    "FP8",
    "PAGE_SIZE",
    "Q8",
    "CacheSpec",
    "Format",
    "KVCache",
    "PagedKVCache",
    "Plain",
    "RopeStyle",
    "Snapshot",
    "apply_rope",
    "attend",
    "attend_reference",
    "attend_write",
    "attend_write_qkv",
    "attention_reference",
    "caches",
    "decode_attention_reference",
    "default_impl",
    "dequantize",
    "inv_frequencies",
    "kinds",
    "llama3_inv_frequencies",
    "make_cache",
    "memory",
    "quantize",
]
__version__ = "0.1.0"
