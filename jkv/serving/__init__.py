"""Serving: one sampling-parameter class, one key scheme, one pipelined engine loop, and a thin generator front.

sampling.py     SamplingParams, the per-request key scheme, the on-device draw
scheduler.py    the host side of a step: token budget, decode tokens first, prompt chunks, buckets, pages
mixed.py        the mixed step on the device: decode tokens, drafts and prompt chunks in one flat batch
steps.py        the cache kinds and the jitted cache-donating functions the engine dispatches
engine.py       Engine: requests, slots, the pipelined loop of mixed steps, cancellation
requests.py     a request's host state, a step's token layout, token hand-over (stop tokens, streaming)
prefixes.py     the engine's prefix-cache entries (pinned pages, or device copies)
options.py      EngineOptions: the engine's knobs as one frozen object; defaults from the device
metrics.py      Completion, EngineStats and RunSummary: what the engine reports
generator.py    Generator / generate_text: a batch of prompts through an engine of that many slots
prefix.py       the prefix cache (longest common prefix, LRU by bytes)
speculative.py  prompt-lookup drafts
"""

from jkv.serving.engine import Completion, Engine, EngineOptions, EngineStats
from jkv.serving.generator import GenerationResult, Generator, TextResult, Timing, generate_text
from jkv.serving.metrics import RunSummary
from jkv.serving.prefix import PrefixCache, common_prefix_length
from jkv.serving.requests import NonFiniteLogitsError
from jkv.serving.sampling import FINISH_REASONS, SamplingParams, sample
from jkv.serving.scheduler import Scheduler, token_buckets
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
    "RunSummary",
    "SamplingParams",
    "Scheduler",
    "TextResult",
    "Timing",
    "cache_kinds",
    "common_prefix_length",
    "generate_text",
    "make_cache",
    "prompt_lookup_draft",
    "sample",
    "token_buckets",
]
