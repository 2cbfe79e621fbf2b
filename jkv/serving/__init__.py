"""Serving: one sampling-parameter class, one key scheme, one pipelined engine loop, and a thin generator front.

sampling.py     SamplingParams, the per-request key scheme, the on-device draw
steps.py        the cache kinds, prefill buckets, the jitted cache-donating steps (prefill, decode, verify)
engine.py       Engine: slots, admission, the pipelined loop, retirement, prefix cache, speculation
options.py      EngineOptions: the engine's knobs as one frozen object; default slot count from device memory
metrics.py      Completion and EngineStats: what the engine reports
generator.py    Generator / generate_text: a batch of prompts through an engine of that many slots
prefix.py       the prefix cache (longest common prefix, LRU by bytes)
speculative.py  prompt-lookup drafts
"""

from jkv.serving.engine import Completion, Engine, EngineOptions, EngineStats, NonFiniteLogitsError
from jkv.serving.generator import GenerationResult, Generator, TextResult, Timing, generate_text
from jkv.serving.prefix import PrefixCache, common_prefix_length
from jkv.serving.sampling import FINISH_REASONS, SamplingParams, sample
from jkv.serving.speculative import prompt_lookup_draft
from jkv.serving.steps import CACHE_KINDS, PAGE_SIZE, cache_kinds, make_cache

__all__ = [
    "CACHE_KINDS",
    "FINISH_REASONS",
    "PAGE_SIZE",
    "Completion",
    "Engine",
    "EngineOptions",
    "EngineStats",
    "GenerationResult",
    "Generator",
    "NonFiniteLogitsError",
    "PrefixCache",
    "SamplingParams",
    "TextResult",
    "Timing",
    "cache_kinds",
    "common_prefix_length",
    "generate_text",
    "make_cache",
    "prompt_lookup_draft",
    "sample",
]
