"""Attention over jkv caches: ``attend`` / ``attend_write`` (``api``), references (``reference``), and the
kernel registry (``kernels``)."""

from jkv.attention.api import IMPLS, attend, attend_write, attend_write_qkv, default_impl, resolve_impl
from jkv.attention.reference import attend_reference, attention_reference, decode_attention_reference

__all__ = [
    "IMPLS",
    "attend",
    "attend_reference",
    "attend_write",
    "attend_write_qkv",
    "attention_reference",
    "decode_attention_reference",
    "default_impl",
    "resolve_impl",
]
