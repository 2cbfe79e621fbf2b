"""The server's Prometheus metrics, in a registry of its own (two servers in one process never share counters).

Counters and histograms are updated on the event loop as requests end and tokens arrive; the engine gauges (pages
in use, prefix-cache hit rate, queue length, running requests) are read by ``observe_engine`` on the engine's
thread, the only one that may touch the engine.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: from a millisecond (a step on a GPU) to a minute (a long queue on a CPU).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "jkv_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "jkv_request_finish", "Generation requests ended, by finish reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("jkv_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("jkv_generation_tokens", "Tokens generated for requests", registry=r)
        self.ttft = Histogram(
            "jkv_time_to_first_token_seconds",
            "From request arrival to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "jkv_inter_token_latency_seconds",
            "Between consecutive tokens of a request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.pages_in_use = Gauge("jkv_pages_in_use", "KV-cache pages held (paged caches; 0 otherwise)", registry=r)
        self.prefix_hit_rate = Gauge(
            "jkv_prefix_cache_hit_rate", "Prefix-cache lookups that hit, over all lookups (0 before any)", registry=r
        )
        self.queue_length = Gauge("jkv_queue_length", "Requests waiting for an engine slot", registry=r)
        self.running = Gauge("jkv_running_requests", "Requests holding an engine slot", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_engine(self, engine, inbox_waiting: int = 0) -> None:
        """Read the engine's gauges (call on the engine's thread)."""
        self.pages_in_use.set(pages_in_use(engine))
        self.prefix_hit_rate.set(prefix_hit_rate(engine))
        self.queue_length.set(engine.num_pending + inbox_waiting)
        self.running.set(engine.num_active)


def pages_in_use(engine) -> int:
    """Pages the engine's cache holds: its own count when it keeps one, else read from a paged cache's
    reference counts (a page with any reference: a slot's table entry or a prefix pin); 0 for contiguous caches."""
    counted = getattr(engine.stats, "pages_in_use", None)
    if counted is not None:
        return int(counted)
    refcounts = getattr(engine.cache, "refcounts", None)
    if refcounts is None:
        return 0
    return int((refcounts > 0).sum())


def prefix_hit_rate(engine) -> float:
    cache = engine.prefix_cache
    if cache is None:
        return 0.0
    lookups = cache.hits + cache.misses
    return cache.hits / lookups if lookups else 0.0
